"""The types every backend shares: :class:`Backend`, :class:`MemorizedItem` and :class:`BackendError`.

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
  learning rate and its random initialisations (about 1 for CLIP, about 0.4 for MiniLM);
- capabilities that only some models have (a utility measure, never-seen images, the training data), so that
  chapters ask the backend instead of testing its name.

The loaders live with their models (``organism/backend.py``, ``sd.py``); ``backends.load_backend`` picks one.
This module imports neither, so nothing imports in a circle.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


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
    # Where the weights come from and what identifies them (cache keys follow the fingerprint).
    source: str = ""  # a checkpoint folder or a Hub id
    fingerprint: str = ""
    # Components other modules need; None where the model has none (the organism denoises pixels: no VAE).
    tokenizer: object = None
    text_encoder: torch.nn.Module | None = None
    vae: torch.nn.Module | None = None
    manifest: dict | None = None  # the organism's manifest.json (training recipe, sampling, items)
    reference_seeds: tuple[int, ...] = ()  # seeds of the references, where they are the model's own generations
    # Memory settings (profiles set them): the most UNet rows one call may take with gradients (the attack and
    # fine-tuning split their batches to fit; None: no limit), and embeddings per sampling batch (no gradients).
    row_budget: int | None = None
    sampling_batch: int = 32
    # Writes everything but the UNet in the model's own format (see save_pretrained).
    save_components: Callable[["Backend", Path, dict], None] | None = None
    # Prompt sets that memorize nothing, by the label a chapter shows (label -> key of prompt_sets), the first
    # the closest to the memorized prompts: the controls of chapter 0's threshold and detectors.
    control_sets: dict[str, str] = dataclasses.field(default_factory=lambda: {"non-memorized prompts": "nonmemorized"})
    # What only some models have; a chapter asks the backend, never its name.
    utility_name: str | None = None  # e.g. "attribute accuracy"
    utility: Callable[[torch.Tensor, list[str]], float] | None = None  # images N x 3 x H x W in [0, 1], their prompts
    utility_parts: Callable[[torch.Tensor, list[str]], dict[str, float]] | None = None  # its parts, "overall" among them
    # Images that depict their prompts exactly, where the data are synthetic: they validate the utility measure.
    draw_prompts: Callable[[list[str]], torch.Tensor] | None = None
    never_seen_items: Callable[[], list[MemorizedItem]] = list  # images outside the training data: the attack's control
    # images seen in training but not duplicated, in a fixed mixed order: the paper's control (LAION images that SD
    # saw and did not memorize)
    seen_once_items: Callable[[], list[MemorizedItem]] = list
    template_items: Callable[[], list[MemorizedItem]] = list  # template-memorized (TM) items, all variants as references
    training_samples: Callable[[], list] | None = None  # the training pairs, where the book has them
    training_recipe: dict | None = None  # how the training set was built (sizes, shares), where the book built it
    _empty: torch.Tensor | None = None

    def empty_embedding(self) -> torch.Tensor:
        """The empty prompt's embedding, 1 x L x D (the unconditional branch of guidance)."""
        if self._empty is None:
            self._empty = self.encode_prompts([""])
        return self._empty

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's dtype, read off its weights: what sampling and the attack cast their inputs to. Never stored
        beside the weights, so a copy with another UNet (``with_unet``, fine-tuning in float32) cannot disagree."""
        return next(self.unet.parameters()).dtype

    @property
    def attack_learning_rate(self) -> float:
        """The paper's Adam learning rate of 0.1 for CLIP embeddings, scaled by this encoder's spread."""
        return 0.1 * self.embedding_spread

    def with_unet(self, unet: torch.nn.Module, fingerprint: str) -> "Backend":
        """A copy of this backend with another UNet (e.g. fine-tuned); ``fingerprint`` identifies its weights."""
        return dataclasses.replace(self, unet=unet, fingerprint=fingerprint, _empty=None)

    def save_pretrained(self, out_dir: str | Path, manifest_updates: dict | None = None) -> Path:
        """Write the model in its own diffusers format, loadable by its loader: ``unet/`` (safetensors) and the
        rest (SD: scheduler, VAE, text encoder, tokenizer; the organism: scheduler, references, manifest with
        ``manifest_updates`` merged in)."""
        if self.save_components is None:
            raise NotImplementedError(f"The {self.name} backend cannot be saved.")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(out / "unet", safe_serialization=True)
        self.save_components(self, out, manifest_updates or {})
        return out

    def memorized_item(self, item_id: str) -> MemorizedItem:
        for item in self.memorized:
            if item.id == item_id:
                return item
        raise KeyError(f"No memorized item {item_id!r}; known: {[m.id for m in self.memorized]}")


def check_count(name: str, value, allow_none: bool = True) -> None:
    """A count setting (items, steps, a batch) is a whole number >= 1; papermill and YAML can hand in a string."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be at least 1, a whole number{' (or None)' if allow_none else ''}; "
                         f"got {value!r} ({type(value).__name__}).")


def check_prompts(prompts) -> list[str]:
    """A list of prompt strings, at least one: a bare string would be encoded one character at a time."""
    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a list of strings, got one string ({prompts[:40]!r}): pass [prompt].")
    prompts = list(prompts)
    if len(prompts) == 0:
        raise ValueError("encode_prompts needs at least one prompt")
    wrong = [p for p in prompts if not isinstance(p, str)]
    if wrong:
        raise TypeError(f"prompts must be strings; got {type(wrong[0]).__name__} ({wrong[0]!r}).")
    return prompts


def check_finite_weights(module: torch.nn.Module, source) -> None:
    """Loaded weights with NaN or inf (a damaged file whose header still parses) would only show as NaN images."""
    bad = [name for name, tensor in module.state_dict().items()
           if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise BackendError(f"The weights loaded from {source} hold NaN or infinite values in {len(bad)} tensor(s) "
                           f"(first: {bad[0]}): the file is damaged. Restore or re-download it.")


def select_items(items: list[MemorizedItem], item_ids, max_items: int | None) -> list[MemorizedItem]:
    """The items named by ``item_ids`` (in that order; None: all), then the first ``max_items`` of them."""
    check_count("max_items", max_items)
    if item_ids is not None:
        by_id = {item.id: item for item in items}
        unknown = [str(i) for i in item_ids if str(i) not in by_id]
        if unknown:
            raise BackendError(f"item_ids {unknown} are not memorized items of this backend; known ids: "
                               f"{list(by_id)[:20]}{' ...' if len(by_id) > 20 else ''}")
        items = [by_id[str(i)] for i in item_ids]
    return items[:max_items] if max_items is not None else items


def guard_row_budget(unet: torch.nn.Module, row_budget: int) -> None:
    """Make any UNet call with gradients over ``row_budget`` rows fail at once, with the setting to change,
    instead of running out of GPU memory inside torch. Copies of the UNet (fine-tuning) keep the guard."""
    def check(module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        if torch.is_grad_enabled() and sample is not None and len(sample) > row_budget:
            raise RuntimeError(
                f"A UNet call with gradients took {len(sample)} rows, over the row budget of {row_budget} "
                "(BACKEND_OPTIONS['row_budget']). The book's methods split their batches to fit the budget: a call "
                "of your own should too, or raise the budget if the GPU has the memory.")

    unet.register_forward_pre_hook(check, with_kwargs=True)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
