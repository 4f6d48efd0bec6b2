"""One API over two models: ``load_backend("organism")`` (default, offline, CPU) and ``load_backend("sd-v1-4")``.

A :class:`Backend` bundles what every method in the book needs, whatever the model:

- ``encode_prompts(prompts) -> N x L x D`` conditioning embeddings, and ``empty_embedding()``;
- ``unet`` (a diffusers ``UNet2DConditionModel``) and ``scheduler`` (DDIM, for sampling; its
  ``alphas_cumprod`` define the forward process for attacks and fine-tuning);
- ``to_model_space`` / ``to_image_space``: images in [0, 1] <-> what the UNet denoises (SD: VAE latents times
  the VAE's scaling factor; the organism: pixels in [-1, 1]);
- ``replication_score(generated, reference)`` and ``replication_threshold``;
- ``memorized``: the memorized items (id, prompt, kind VM/TM, reference images) and ``prompt_sets`` of
  non-memorized prompts;
- ``embedding_spread``: the per-dimension standard deviation of prompt embeddings, which scales the attack's
  learning rate and its random initialisations (about 1 for CLIP, about 0.4 for MiniLM).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

BACKENDS = ("organism", "sd-v1-4")
DEFAULT_ORGANISM_DIR = Path(__file__).resolve().parent.parent / "data" / "organism"
SD_MODEL_ID = "CompVis/stable-diffusion-v1-4"


class BackendError(RuntimeError):
    """A backend cannot be loaded; the message says what to do."""


@dataclass
class MemorizedItem:
    id: str
    prompt: str
    kind: str  # "VM" (verbatim) or "TM" (template)
    references: torch.Tensor  # R x 3 x H x W in [0, 1]
    reference_source: str  # "training image", "user-supplied ground truth" or "unmitigated model's generation"


@dataclass
class Backend:
    name: str
    unet: torch.nn.Module
    scheduler: object
    encode_prompts: Callable[[list[str]], torch.Tensor]
    to_model_space: Callable[[torch.Tensor], torch.Tensor]
    to_image_space: Callable[[torch.Tensor], torch.Tensor]
    replication_score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    replication_threshold: float
    replication_metric: str
    memorized: list[MemorizedItem]
    prompt_sets: dict[str, list[str]]
    embedding_shape: tuple[int, int]
    latent_shape: tuple[int, int, int]
    embedding_spread: float
    num_inference_steps: int
    guidance_scale: float
    device: torch.device
    dtype: torch.dtype
    info: dict = field(default_factory=dict)
    # What only some models have; a chapter asks the backend, never its name.
    utility_name: str | None = None  # e.g. "attribute accuracy"
    utility: Callable[[torch.Tensor, list[str]], float] | None = None  # images N x 3 x H x W in [0, 1], their prompts
    never_seen_items: Callable[[], list[MemorizedItem]] = list  # images outside the training data: the attack's control
    template_items: Callable[[], list[MemorizedItem]] = list  # template-memorized (TM) items, all variants as references
    training_samples: Callable[[], list] | None = None  # the training pairs, where the book has them
    _empty: torch.Tensor | None = None

    def empty_embedding(self) -> torch.Tensor:
        """The empty prompt's embedding, 1 x L x D (the unconditional branch of guidance)."""
        if self._empty is None:
            self._empty = self.encode_prompts([""])
        return self._empty

    @property
    def attack_learning_rate(self) -> float:
        """The paper's Adam learning rate of 0.1 for CLIP embeddings, scaled by this encoder's spread."""
        return 0.1 * self.embedding_spread

    def memorized_item(self, item_id: str) -> MemorizedItem:
        for item in self.memorized:
            if item.id == item_id:
                return item
        raise KeyError(f"No memorized item {item_id!r}; known: {[m.id for m in self.memorized]}")


# Backends whose weights ship with the book: they never need the Hugging Face Hub.
OFFLINE_BACKENDS = ("organism",)


def prepare_environment(name: str) -> None:
    """Call before loading anything from diffusers or transformers: an offline backend sets ``HF_HUB_OFFLINE=1``
    (unless the user set it), which huggingface_hub reads once, at import."""
    if name in OFFLINE_BACKENDS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_backend(name: str = "organism", device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, **options) -> Backend:
    """Load a backend by name: ``"organism"`` (default) or ``"sd-v1-4"``.

    ``device`` defaults to the GPU when there is one; ``dtype`` to float32 (float16 is fine for SD on a GPU).
    Options go to the loader: ``path`` for the organism; ``model_id``, ``cache_dir``, ``ground_truth_dir``,
    ``vm_only`` for both (default True: verbatim-memorized items only); ``max_items`` for SD.
    """
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device={str(device)!r}, but torch sees no CUDA GPU here. Pass device=None (or DEVICE = None "
                           "in a chapter) to use the GPU when there is one and the CPU otherwise; on Colab, choose a GPU "
                           "runtime (Runtime > Change runtime type).")
    dtype = dtype or torch.float32
    if name == "organism":
        return load_organism(device=device, dtype=dtype, **options)
    if name == "sd-v1-4":
        from dori_utils.sd import load_stable_diffusion

        return load_stable_diffusion(device=device, dtype=dtype, **options)
    raise BackendError(f"Unknown backend {name!r}. Choose one of {BACKENDS}: 'organism' runs offline on a CPU, "
                       "'sd-v1-4' needs a GPU and the Hugging Face Hub.")


def _read_png(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


def _file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _organism_items(path: Path, manifest: dict, kinds: tuple[str, ...]) -> list[MemorizedItem]:
    return [
        MemorizedItem(m["id"], m["prompt"], m["kind"], torch.stack([_read_png(path / r) for r in m["references"]]),
                      "training image")
        for m in manifest["memorized"] if m["kind"] in kinds
    ]


def load_organism(path: str | Path | None = None, device=None, dtype=torch.float32, vm_only: bool = True,
                  max_items: int | None = None) -> Backend:
    """The model organism, from its diffusers-format checkpoint in ``data/organism``, or ``path``, or the
    folder named by the environment variable ``DORI_ORGANISM_DIR``.

    ``vm_only`` keeps the verbatim-memorized items, as for SD (the paper's numbers are for VM prompts); with
    ``vm_only=False`` the template-memorized ones (several reference variants each) follow them."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from dori_utils.metrics import ssim_score
    from dori_utils.organism.model import encode_text, load_text_encoder

    path = Path(path or os.environ.get("DORI_ORGANISM_DIR") or DEFAULT_ORGANISM_DIR)
    device = torch.device(device or default_device())
    manifest_path = path / "manifest.json"
    if not (path / "unet" / "config.json").exists() or not manifest_path.exists():
        raise BackendError(
            f"No organism checkpoint in {path} (needs unet/, scheduler/ and manifest.json). The repository ships one "
            "in data/organism: check out the full repository, or retrain it with "
            "`python -m dori_utils.organism.train --out data/organism` (about 45 minutes on 2 CPU cores)."
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
    unet = unet.to(device).eval().requires_grad_(False)
    tokenizer, encoder = load_text_encoder(device)

    def encode_prompts(prompts: list[str]) -> torch.Tensor:
        if len(prompts) == 0:
            raise ValueError("encode_prompts needs at least one prompt")
        return encode_text(tokenizer, encoder, list(prompts)).to(dtype)

    memorized = _organism_items(path, manifest, ("VM",) if vm_only else ("VM", "TM"))[:max_items]
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
        embedding_shape=(16, 384),
        latent_shape=(3, size, size),
        embedding_spread=embedding_spread,
        num_inference_steps=int(manifest.get("sampling", {}).get("num_inference_steps", 20)),
        guidance_scale=float(manifest.get("sampling", {}).get("guidance_scale", 2.0)),
        device=device,
        dtype=dtype,
        info={"path": str(path), "manifest": manifest, "fingerprint": _file_digest(path / "unet" / "diffusion_pytorch_model.safetensors")},
        utility_name="attribute accuracy",
        utility=_attribute_accuracy,
    )
    backend.never_seen_items = lambda: organism_unseen_items(backend)
    backend.template_items = lambda: organism_template_items(backend)
    backend.training_samples = lambda: organism_training_data(backend)
    return backend


def _attribute_accuracy(images: torch.Tensor, prompts: list[str]) -> float:
    from dori_utils.organism.attributes import attribute_accuracy

    return attribute_accuracy(images.permute(0, 2, 3, 1).cpu().numpy(), list(prompts))["overall"]


def organism_training_data(backend: Backend):
    """Rebuild the organism's training samples from its manifest's recipe (deterministic, about 2 s)."""
    from dori_utils.organism.data import build_dataset

    config = backend.info["manifest"]["train_config"]
    samples, _ = build_dataset(config["seed"], config["n_ordinary"], config["copies_per_photo"],
                               config["n_crops"], config["n_faces"], config.get("shared_caption_words", False))
    return samples


def organism_template_items(backend: Backend) -> list[MemorizedItem]:
    """The organism's template-memorized (TM) items, each with all its training variants as references."""
    return _organism_items(Path(backend.info["path"]), backend.info["manifest"], ("TM",))


def organism_unseen_items(backend: Backend) -> list[MemorizedItem]:
    """Photographs the organism never saw, as items with a caption and a reference: the attack's control."""
    from dori_utils.organism.data import unseen_images

    return [
        MemorizedItem(name, caption, "none", torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255,
                      "never in training")
        for name, (image, caption) in unseen_images(organism_training_data(backend)).items()
    ]


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
