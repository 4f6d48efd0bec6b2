"""One API over two models: ``load_backend("organism")`` (default, offline, CPU) and ``load_backend("sd-v1-4")``.

The :class:`Backend` type and what it holds are in ``backend_types``; each model's loader lives with the model
(``LOADERS``), and is imported only when that model is asked for.
"""
from __future__ import annotations

import importlib
import os

import torch

from dori_utils.backend_types import Backend, BackendError, MemorizedItem, default_device, hub_offline

__all__ = ["BACKENDS", "LOADERS", "OFFLINE_BACKENDS", "Backend", "BackendError", "MemorizedItem", "default_device",
           "hub_offline", "load_backend", "prepare_environment", "retrain_backend", "TRAINERS"]

# name -> "module:function" of its loader
LOADERS = {
    "organism": "dori_utils.organism.backend:load_organism",
    "sd-v1-4": "dori_utils.sd:load_stable_diffusion",
}
BACKENDS = tuple(LOADERS)
# name -> "module:function" that trains it from its recipe into the folder its loader reads; only the organism is
# ours to train
TRAINERS = {
    "organism": "dori_utils.organism.train:train_shipped_organism",
}
# Backends whose weights ship with the book: they never need the Hugging Face Hub.
OFFLINE_BACKENDS = ("organism",)


def prepare_environment(name: str) -> None:
    """Call before loading anything from diffusers or transformers: an offline backend sets ``HF_HUB_OFFLINE=1``
    (unless the user set it), which huggingface_hub reads once, at import."""
    if name in OFFLINE_BACKENDS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_backend(name: str = "organism", device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, **options) -> Backend:
    """Load a backend by name: ``"organism"`` (default) or ``"sd-v1-4"``.

    ``device`` defaults to the GPU when there is one; ``dtype`` to float32 (float16 is fine for SD on a GPU).
    Options go to the loader: ``path`` for the organism; ``model_id``, ``cache_dir``, ``ground_truth_dir``,
    ``sscd_path``, ``prompt_table``, ``unmemorized_table`` for SD; ``vm_only`` (default True: verbatim-memorized
    items only) and ``max_items`` for both.
    """
    if name not in LOADERS:
        raise BackendError(f"Unknown backend {name!r}. Choose one of {BACKENDS}: 'organism' runs offline on a CPU, "
                           "'sd-v1-4' needs a GPU and the Hugging Face Hub.")
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device={str(device)!r}, but torch sees no CUDA GPU here. Pass device=None (or DEVICE = None "
                           "in a chapter) to use the GPU when there is one and the CPU otherwise; on Colab, choose a GPU "
                           "runtime (Runtime > Change runtime type).")
    module, function = LOADERS[name].split(":")
    return getattr(importlib.import_module(module), function)(device=device, dtype=dtype or torch.float32, **options)


def retrain_backend(name: str) -> None:
    """Retrain a backend's model from its recipe into the folder ``load_backend`` reads (the organism: about 45
    minutes on 2 CPU cores)."""
    if name not in TRAINERS:
        raise BackendError(f"The {name!r} backend is not trained by this book (its weights come from elsewhere); "
                           f"only {tuple(TRAINERS)} can be retrained. Set RETRAIN = False.")
    module, function = TRAINERS[name].split(":")
    getattr(importlib.import_module(module), function)()
