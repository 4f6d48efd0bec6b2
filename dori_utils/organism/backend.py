"""The organism as a :class:`~dori_utils.backend_types.Backend`: ``load_organism`` reads the diffusers-format
checkpoint in ``data/organism`` (or another folder) and binds the organism's capabilities (attribute accuracy,
never-seen photographs, template items, the training data rebuilt from its recipe)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dori_utils.backend_types import (Backend, BackendError, MemorizedItem, check_count, check_finite_weights,
                                      check_prompts, default_device, select_items)

DEFAULT_ORGANISM_DIR = Path(__file__).resolve().parent.parent.parent / "data" / "organism"
# The contrast organism (issue 35): the same recipe trained with example-tied dropout on the cross-attention values,
# so that each memorized item's designated channels are known.
DEFAULT_LOCAL_ORGANISM_DIR = DEFAULT_ORGANISM_DIR.parent / "organism-local"


def _read_png(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _organism_items(path: Path, manifest: dict, kinds: tuple[str, ...]) -> list[MemorizedItem]:
    return [
        MemorizedItem(m["id"], m["prompt"], m["kind"], torch.stack([_read_png(path / r) for r in m["references"]]),
                      "training image")
        for m in manifest["memorized"] if m["kind"] in kinds
    ]


def load_local_organism(path: str | Path | None = None, device=None, dtype=torch.float32, vm_only: bool = True,
                        max_items: int | None = None, item_ids: list[str] | None = None,
                        num_inference_steps: int | None = None) -> Backend:
    """The contrast organism, whose memorization is local by construction: the shipped organism's recipe trained
    with example-tied dropout on the ``attn2.to_v`` channels (``train.designated_channels``). It loads as a plain
    UNet with every channel on; ``designated_channels`` gives each item's channels. From ``data/organism-local``,
    or ``path``, or the folder named by ``DORI_LOCAL_ORGANISM_DIR``."""
    path = Path(path or os.environ.get("DORI_LOCAL_ORGANISM_DIR") or DEFAULT_LOCAL_ORGANISM_DIR)
    backend = load_organism(path, device, dtype, vm_only, max_items, item_ids, num_inference_steps)
    if "memorization_channels" not in backend.manifest:
        raise BackendError(f"The checkpoint in {path} was trained without example-tied dropout (its manifest has no "
                           "memorization_channels): it is not a local organism. Train one with `python -m "
                           "dori_utils.organism.train --manifest data/organism-local/manifest.json --out <folder>`.")
    backend.name = "organism-local"
    return backend


def designated_channels(backend: Backend) -> dict[str, dict[str, list[int]]]:
    """Each memorized item's designated value channels (``{item: {layer: channels}}``), as the local organism's
    training kept them on for that item alone: the ground truth of where its memorization was confined."""
    if "memorization_channels" not in (backend.manifest or {}):
        raise BackendError(f"The {backend.name!r} backend has no designated channels: load 'organism-local'.")
    return {m["id"]: m["designated_channels"] for m in backend.manifest["memorized"]}


def memorization_channels(backend: Backend) -> dict[str, list[int]]:
    """Every channel that example-tied dropout reserved for memorization, per value layer (the others were always
    on, and ordinary pairs trained with these off)."""
    if "memorization_channels" not in (backend.manifest or {}):
        raise BackendError(f"The {backend.name!r} backend has no memorization channels: load 'organism-local'.")
    return backend.manifest["memorization_channels"]


def load_organism(path: str | Path | None = None, device=None, dtype=torch.float32, vm_only: bool = True,
                  max_items: int | None = None, item_ids: list[str] | None = None,
                  num_inference_steps: int | None = None) -> Backend:
    """The model organism, from its diffusers-format checkpoint in ``data/organism``, or ``path``, or the
    folder named by the environment variable ``DORI_ORGANISM_DIR``.

    ``vm_only`` keeps the verbatim-memorized items, as for SD (the paper's numbers are for VM prompts); with
    ``vm_only=False`` the template-memorized ones (several reference variants each) follow them."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from dori_utils.metrics import ssim_score
    from dori_utils.organism.model import encode_text, load_text_encoder

    check_count("num_inference_steps", num_inference_steps)
    path = Path(path or os.environ.get("DORI_ORGANISM_DIR") or DEFAULT_ORGANISM_DIR)
    device = torch.device(device or default_device())
    manifest_path = path / "manifest.json"
    if not (path / "unet" / "config.json").exists() or not manifest_path.exists():
        raise BackendError(
            f"No organism checkpoint in {path} (needs unet/, scheduler/ and manifest.json). The repository ships one "
            "in data/organism: check out the full repository, or retrain it with "
            "`python -m dori_utils.organism.train --manifest data/organism/manifest.json --out data/organism` "
            "(the manifest is tracked in git; about 95 minutes on one CPU thread)."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
        unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True, torch_dtype=dtype)
        scheduler = DDIMScheduler.from_pretrained(path / "scheduler", local_files_only=True)
    except Exception as error:
        raise BackendError(
            f"The organism checkpoint in {path} is corrupt or incomplete ({type(error).__name__}: {error}). "
            "Restore it with `git checkout -- data/organism`, or retrain it with "
            "`python -m dori_utils.organism.train --out data/organism`."
        ) from error
    check_finite_weights(unet, path / "unet")
    unet = unet.to(device).eval().requires_grad_(False)
    tokenizer, encoder = load_text_encoder(device)

    def encode_prompts(prompts: list[str]) -> torch.Tensor:
        return encode_text(tokenizer, encoder, check_prompts(prompts)).to(dtype)

    memorized = select_items(_organism_items(path, manifest, ("VM",) if vm_only else ("VM", "TM")), item_ids, max_items)
    recipe = manifest["data_recipe"]
    prompt_sets = {
        "heldout_ordinary": recipe["held_out_scene_captions"],
        "unseen_natural": manifest["unseen_natural_captions"],
        "training_ordinary": manifest["training_captions"]["ordinary"],
        "training_natural": manifest["training_captions"]["natural"],
    }
    prompt_sets["nonmemorized"] = prompt_sets["heldout_ordinary"] + prompt_sets["unseen_natural"]
    prompt_sets["utility"] = prompt_sets["heldout_ordinary"]  # scene captions, which the attribute checker reads
    # NeMo's statistics come from LAION prompts the model was trained on but did not memorize.
    prompt_sets["statistics"] = prompt_sets["training_ordinary"] + prompt_sets["training_natural"]
    # The spread scales the attack's learning rate and random starts: measure it on the training captions.
    spread_sample = prompt_sets["statistics"][:: max(1, len(prompt_sets["statistics"]) // 256)]
    embedding_spread = round(encode_prompts(spread_sample).float().std().item(), 3)
    size = manifest["image_size"]
    backend = Backend(
        name="organism",
        unet=unet,
        scheduler=scheduler,
        encode_prompts=encode_prompts,
        to_model_space=lambda images: images.to(device, dtype) * 2 - 1,
        to_image_space=lambda x: ((x.float() + 1) / 2).clamp(0, 1),
        replication_score=ssim_score,
        replication_threshold=float(manifest.get("replication_threshold", 0.7)),
        replication_metric="SSIM (32x32 RGB, Gaussian window 7, sigma 1.5)",
        memorized=memorized,
        prompt_sets=prompt_sets,
        control_sets={"held-out scene captions": "heldout_ordinary", "unseen natural captions": "unseen_natural"},
        embedding_shape=(16, 384),
        latent_shape=(3, size, size),
        embedding_spread=embedding_spread,
        num_inference_steps=(num_inference_steps if num_inference_steps is not None
                             else int(manifest.get("sampling", {}).get("num_inference_steps", 20))),
        guidance_scale=float(manifest.get("sampling", {}).get("guidance_scale", 2.0)),
        device=device,
        source=str(path),
        fingerprint=_file_digest(path / "unet" / "diffusion_pytorch_model.safetensors"),
        tokenizer=tokenizer,
        text_encoder=encoder,
        manifest=manifest,
        save_components=save_organism_components,
        utility_name="attribute accuracy",
        utility=lambda images, prompts: _attribute_accuracy(images, prompts)["overall"],
        utility_parts=_attribute_accuracy,
        draw_prompts=_draw_scenes,
        training_recipe=recipe,
    )
    backend.never_seen_items = lambda: organism_unseen_items(backend)
    backend.seen_once_items = lambda: organism_seen_once_items(backend)
    backend.template_items = lambda: organism_template_items(backend)
    backend.training_samples = lambda: organism_training_data(backend)
    return backend


def _attribute_accuracy(images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    from dori_utils.organism.attributes import attribute_accuracy

    return attribute_accuracy(images.permute(0, 2, 3, 1).float().cpu().numpy(), list(prompts))


def _draw_scenes(prompts: list[str], seed: int = 1) -> torch.Tensor:
    """Scenes drawn for scene captions as the training data draws them (N x 3 x H x W in [0, 1])."""
    from dori_utils.organism.attributes import parse_scene_caption
    from dori_utils.organism.data import draw_scene

    rng = np.random.default_rng(seed)
    scenes = [draw_scene(rng, **parse_scene_caption(prompt)) for prompt in prompts]
    return torch.from_numpy(np.stack(scenes)).permute(0, 3, 1, 2).float() / 255


def organism_training_data(backend: Backend):
    """Rebuild the organism's training samples from its manifest's recipe (deterministic, about 2 s)."""
    from dori_utils.organism.data import dataset_from_config

    return dataset_from_config(backend.manifest["train_config"])[0]


def organism_template_items(backend: Backend) -> list[MemorizedItem]:
    """The organism's template-memorized (TM) items, each with all its training variants as references."""
    return _organism_items(Path(backend.source), backend.manifest, ("TM",))


def organism_unseen_items(backend: Backend) -> list[MemorizedItem]:
    """Photographs the organism never saw, as items with a caption and a reference: the attack's control."""
    from dori_utils.organism.data import unseen_images

    return [
        MemorizedItem(name, caption, "none", torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255,
                      "never in training")
        for name, (image, caption) in unseen_images(organism_training_data(backend)).items()
    ]


def organism_seen_once_items(backend: Backend) -> list[MemorizedItem]:
    """The natural pairs the organism saw once in training (crops and faces, never a memorized photograph, and
    none that carries a memorized caption's words), as items with their caption and training image, in a fixed
    shuffled order so that the first few mix both kinds: the control the paper attacks."""
    samples = [s for s in organism_training_data(backend) if s.kind == "natural" and not s.item.startswith("combination-")]
    order = np.random.default_rng(0).permutation(len(samples))
    return [MemorizedItem(f"seen-{samples[i].item}-{i}", samples[i].caption, "none",
                          torch.from_numpy(np.array(samples[i].image)).permute(2, 0, 1)[None].float() / 255,
                          "seen once in training")
            for i in order]


def save_organism_components(backend: Backend, out: Path, manifest_updates: dict) -> None:
    """Everything but the UNet, as ``load_organism`` reads it: the scheduler, the reference images and the
    manifest (with ``manifest_updates``, e.g. how it was fine-tuned)."""
    source = Path(backend.source)
    for folder in ("scheduler", "references"):
        if (out / folder).resolve() != (source / folder).resolve():
            if (out / folder).exists():
                shutil.rmtree(out / folder)
            shutil.copytree(source / folder, out / folder)
    (out / "manifest.json").write_text(json.dumps({**backend.manifest, **manifest_updates}, indent=1))
