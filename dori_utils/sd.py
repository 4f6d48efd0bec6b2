"""The Stable Diffusion v1.4 backend: ``load_backend("sd-v1-4")``.

Components come from the model id's subfolders (``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
``scheduler``), from the Hugging Face Hub or from a local directory written by
``StableDiffusionPipeline.save_pretrained``. Defaults follow NeMo's generation: DDIM, 50 steps, guidance 7.

Memorized items are the rows of NeMo's memorized table (VM only by default). Their reference images are:

- ``ground_truth_dir`` given: the user's training images (``<dir>/<laion_index>/*.png|jpg``), labelled
  "user-supplied ground truth";
- otherwise: the unmitigated model's own generations for the prompt with ``reference_seeds``, labelled
  "unmitigated model's generation", computed at load time for the kept items only (``item_ids``,
  ``max_items``) with a progress bar, and cached on disk per item (``reference_cache``), keyed by the UNet's
  weights, the dtype, the prompt, the seeds, the steps and the guidance, so that every chapter and every later
  run reuses them. They are stored as 8-bit images, like a training image in a PNG file. A verbatim-memorized
  prompt regenerates its training image, so these stand in for the LAION images, whose links are often dead. Evaluate with seeds outside ``reference_seeds``: a generation
  compared with itself scores 1. ``reference_seeds=()`` skips them (empty references), for methods that
  need prompts only.

Replication is SSCD, loaded on first use so that loading the backend needs no SSCD download.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from dori_utils import data
from dori_utils.backend_types import (Backend, BackendError, MemorizedItem, check_count, check_finite_weights,
                                      check_prompts, default_device, hub_offline)
from dori_utils.metrics import SSCD_URL, load_sscd, sscd_scorer

# The Dori paper's attack learning rate (0.1) was set for CLIP embeddings, so CLIP's spread is 1 by definition.
SD_MODEL_ID = "CompVis/stable-diffusion-v1-4"
CLIP_EMBEDDING_SPREAD = 1.0
VAE_BATCH = 8  # images per VAE pass: 512 px activations of larger batches crowd a small GPU


def _load_error(model_id: str, error: Exception) -> BackendError:
    lines = str(error).strip().splitlines()
    cause = f"{type(error).__name__}: {lines[0][:300].rstrip('.')}" if lines else type(error).__name__
    if Path(model_id).expanduser().exists():
        return BackendError(
            f"{model_id} is not a complete Stable Diffusion checkpoint ({cause}). It needs the subfolders unet/, "
            "vae/, text_encoder/, tokenizer/ and scheduler/, as StableDiffusionPipeline.save_pretrained(path) "
            "writes them."
        )
    offline = " HF_HUB_OFFLINE=1 is set, so only the local cache was searched." if hub_offline() else ""
    return BackendError(
        f"Could not load Stable Diffusion from {model_id!r} ({cause}).{offline} To fix it: with network access, "
        f"log in (`hf auth login`) and accept the license on https://huggingface.co/{SD_MODEL_ID} if asked; "
        "if the model is already downloaded, point HF_HOME (or cache_dir=) at that cache; or pass model_id= a "
        "local directory saved with StableDiffusionPipeline.save_pretrained. Use load_backend('organism') to "
        "run offline on a CPU."
    )


def _load_components(model_id: str, dtype: torch.dtype, cache_dir, local_files_only: bool):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    options = dict(cache_dir=cache_dir, local_files_only=local_files_only)
    with warnings.catch_warnings():
        # diffusers passes an argument that huggingface_hub deprecated; its warning is noise in the notebooks.
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks")
        try:
            # The UNet first: it fails fast when nothing is there, whereas a missing tokenizer loads as an empty one.
            # Loading in the target dtype (rather than casting after) keeps diffusers' float32-only modules right.
            unet = UNet2DConditionModel.from_pretrained(model_id, subfolder="unet", torch_dtype=dtype, **options)
            vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae", torch_dtype=dtype, **options)
            text_encoder = CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder", dtype=dtype, **options)
            tokenizer = CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer", **options)
            scheduler = DDIMScheduler.from_pretrained(model_id, subfolder="scheduler", **options)
            if len(tokenizer) <= 2 or tokenizer.model_max_length > 10_000:
                raise OSError("the tokenizer subfolder has no vocabulary or no model_max_length")
        except Exception as error:  # any failure here means "no usable checkpoint"; the message says what to do
            raise _load_error(str(model_id), error) from None
    return unet, vae, text_encoder, tokenizer, scheduler


def _memorized_table(prompt_table, vm_only: bool, max_items: int | None, item_ids=None) -> pd.DataFrame:
    if isinstance(prompt_table, pd.DataFrame):
        table = prompt_table
    elif prompt_table is None:
        table = data.load_nemo_memorized()
    else:  # a table of the user's own may have any number of rows
        table = data.load_nemo_memorized(prompt_table, expected_rows=None)
    if vm_only:
        table = table[table["kind"] == "VM"]
    if item_ids is not None:
        known = table["id"].astype(str).tolist()
        unknown = [str(i) for i in item_ids if str(i) not in known]
        if unknown:
            kept = " (VM rows only: pass vm_only=False for TM rows)" if vm_only else ""
            raise BackendError(f"item_ids {unknown} are not in the memorized table{kept}; its first ids: {known[:10]}")
        table = table.set_index(table["id"].astype(str)).loc[[str(i) for i in item_ids]].reset_index(drop=True)
    return table.head(max_items) if max_items is not None else table


def _unmemorized_prompts(unmemorized_table) -> list[str]:
    if isinstance(unmemorized_table, pd.DataFrame):
        return unmemorized_table["prompt"].tolist()
    if unmemorized_table is None:
        return data.load_nemo_unmemorized()["prompt"].tolist()
    return data.load_nemo_unmemorized(unmemorized_table, expected_rows=None)["prompt"].tolist()


def save_sd_components(backend: Backend, out: Path, manifest_updates: dict) -> None:
    """Everything but the UNet in the layout of a diffusers pipeline folder, so ``model_id=out`` loads it."""
    backend.scheduler.save_pretrained(out / "scheduler")
    for name in ("vae", "text_encoder", "tokenizer"):
        getattr(backend, name).save_pretrained(out / name)


def unet_fingerprint(unet: torch.nn.Module) -> str:
    """A digest of the UNet's weights (a sample of every parameter tensor): two checkpoints under one name, or a
    fine-tuned copy, never share a cache entry."""
    digest = hashlib.sha256()
    for name, parameter in unet.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def reference_key(backend: Backend, prompt: str, seeds) -> str:
    record = [backend.fingerprint, str(backend.dtype), prompt, [int(s) for s in seeds], backend.num_inference_steps,
              backend.guidance_scale, type(backend.scheduler).__name__]
    return hashlib.sha256(json.dumps(record).encode()).hexdigest()[:24]


def reference_generations(backend: Backend, prompts: list[str], seeds, cache_dir: str | Path | None = None) -> torch.Tensor:
    """The backend's own images for each prompt and seed, 8-bit: P x S x 3 x H x W in [0, 1], on the CPU. With
    ``cache_dir``, each prompt's images are read from there when they were computed before, and written there
    when not."""
    from safetensors.torch import load_file, save_file

    from dori_utils.sampling import generate_for_prompts

    paths = [Path(cache_dir).expanduser() / f"{reference_key(backend, p, seeds)}.safetensors" if cache_dir else None
             for p in prompts]
    cached = {}
    for i, path in enumerate(paths):
        if path is not None and path.exists():
            try:
                cached[i] = load_file(str(path))["images"].float() / 255
            except Exception:  # a broken file is computed again (another process may have removed it first)
                path.unlink(missing_ok=True)
    missing = [i for i in range(len(prompts)) if i not in cached]
    if missing:
        print(f"generating reference images for {len(missing)} of {len(prompts)} prompts x {len(seeds)} seeds"
              + (f" (cached in {cache_dir})" if cache_dir else ""))
    # as many prompts per call as a sampling batch holds, each saved once generated, so that an interruption
    # keeps what was computed
    per_call = max(1, backend.sampling_batch // len(seeds))
    groups = [missing[g : g + per_call] for g in range(0, len(missing), per_call)]
    for group in tqdm(groups, desc="reference images", disable=len(groups) < 2):
        images = generate_for_prompts(backend, [prompts[i] for i in group], list(seeds)).images
        images = images.mul(255).round().to(torch.uint8)
        for i, generated in zip(group, images.view(len(group), len(seeds), *images.shape[1:])):
            if paths[i] is not None:
                paths[i].parent.mkdir(parents=True, exist_ok=True)
                # a name of this process's own: two processes filling the same entry both succeed
                partial = paths[i].with_name(f".{paths[i].name}.{os.getpid()}.part")
                save_file({"images": generated.contiguous()}, str(partial))
                partial.replace(paths[i])
            cached[i] = generated.float() / 255
    return torch.stack([cached[i] for i in range(len(prompts))]) if prompts else torch.empty(0)


def _lazy_sscd_score(sscd_path: str | None, device: torch.device):
    score = None

    def replication_score(generated: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        nonlocal score
        if score is None:
            score = sscd_scorer(load_sscd(sscd_path or SSCD_URL, device=device))
        return score(generated, reference)

    return replication_score


def load_stable_diffusion(
    model_id: str = SD_MODEL_ID,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | None = None,
    ground_truth_dir: str | Path | None = None,
    vm_only: bool = True,
    max_items: int | None = None,
    sscd_path: str | None = None,
    prompt_table: str | Path | pd.DataFrame | None = None,
    unmemorized_table: str | Path | pd.DataFrame | None = None,
    reference_seeds=(0, 1, 2, 3),
    local_files_only: bool | None = None,
    item_ids: list[str] | None = None,
    reference_cache: str | Path | None = data.DEFAULT_CACHE_DIR / "sd-references",
    num_inference_steps: int = 50,
    sampling_batch: int = 32,
) -> Backend:
    """Stable Diffusion v1.4 (or any SD-1.x checkpoint in diffusers format) as a :class:`Backend`.

    ``prompt_table`` / ``unmemorized_table``: NeMo's tables as a local path, URL or DataFrame (default: the
    pinned upstream files, downloaded once). ``sscd_path``: a local SSCD TorchScript file (default: download
    on first use). ``local_files_only`` defaults to ``HF_HUB_OFFLINE``. ``item_ids``: the LAION indices to keep
    (in that order), before ``max_items``. See the module docstring for how reference images are chosen and
    cached (``reference_cache=None``: not cached).
    """
    check_count("num_inference_steps", num_inference_steps, allow_none=False)
    check_count("sampling_batch", sampling_batch, allow_none=False)
    check_count("max_items", max_items)
    device = torch.device(device) if device is not None else default_device()
    local_files_only = hub_offline() if local_files_only is None else local_files_only
    unet, vae, text_encoder, tokenizer, scheduler = _load_components(model_id, dtype, cache_dir, local_files_only)
    for module, part in ((unet, "unet"), (vae, "vae"), (text_encoder, "text_encoder")):
        check_finite_weights(module, f"{model_id} ({part})")
    unet, vae, text_encoder = (m.to(device).eval().requires_grad_(False) for m in (unet, vae, text_encoder))
    scaling_factor = vae.config.scaling_factor
    latent_size = unet.config.sample_size
    image_size = latent_size * 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_prompts(prompts: list[str]) -> torch.Tensor:
        tokens = tokenizer(check_prompts(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
        return text_encoder(tokens.input_ids.to(device)).last_hidden_state.to(dtype)

    # The VAE runs without gradients: the book's methods optimise embeddings or UNet weights, never pixels.
    @torch.no_grad()
    def to_model_space(images: torch.Tensor) -> torch.Tensor:
        chunks = images.to(device, dtype).split(VAE_BATCH)
        return torch.cat([vae.encode(x * 2 - 1).latent_dist.mean * scaling_factor for x in chunks])

    @torch.no_grad()
    def to_image_space(latents: torch.Tensor) -> torch.Tensor:
        chunks = latents.to(device, dtype).split(VAE_BATCH)
        return torch.cat([((vae.decode(z / scaling_factor).sample.float() + 1) / 2).clamp(0, 1) for z in chunks])

    table = _memorized_table(prompt_table, vm_only, max_items, item_ids)
    nonmemorized = _unmemorized_prompts(unmemorized_table)
    backend = Backend(
        name="sd-v1-4",
        unet=unet,
        scheduler=scheduler,
        encode_prompts=encode_prompts,
        to_model_space=to_model_space,
        to_image_space=to_image_space,
        replication_score=_lazy_sscd_score(sscd_path, device),
        replication_threshold=0.7,
        replication_metric="SSCD sscd_disc_mixup cosine similarity (images resized to 320x320 without cropping, "
                           "ImageNet mean/std normalisation), max over reference images",
        memorized=[],
        prompt_sets={"nonmemorized": nonmemorized, "statistics": nonmemorized, "utility": nonmemorized},
        control_sets={"non-memorized LAION prompts": "nonmemorized"},
        embedding_shape=(tokenizer.model_max_length, text_encoder.config.hidden_size),
        latent_shape=(unet.config.in_channels, latent_size, latent_size),
        embedding_spread=CLIP_EMBEDDING_SPREAD,
        num_inference_steps=num_inference_steps,
        sampling_batch=sampling_batch,  # before the reference images, which are sampled in batches of this size
        guidance_scale=7.0,
        device=device,
        source=str(model_id),
        fingerprint=f"{model_id}@{unet_fingerprint(unet)}",
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        save_components=save_sd_components,
    )
    ids, prompts = table["id"].astype(str).tolist(), table["prompt"].tolist()
    if ground_truth_dir is not None:
        ground_truth = data.load_ground_truth_folder(ground_truth_dir, ids, size=image_size)
        references, source = [ground_truth[i] for i in ids], "user-supplied ground truth"
    elif len(reference_seeds) and ids:
        references = list(reference_generations(backend, prompts, reference_seeds, reference_cache))
        source, backend.reference_seeds = "unmitigated model's generation", tuple(reference_seeds)
    else:
        references, source = [torch.empty(0, 3, image_size, image_size)] * len(ids), "none"
    backend.memorized = [
        MemorizedItem(item_id, prompt, kind, refs, source)
        for item_id, prompt, kind, refs in zip(ids, prompts, table["kind"], references)
    ]
    return backend
