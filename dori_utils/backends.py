"""One API over two models: ``load_backend("organism")`` (default, offline, CPU) and ``load_backend("sd-v1-4")``.

The :class:`Backend` type and what it holds are in ``backend_types``; each model's loader lives with the model
(``LOADERS``), and is imported only when that model is asked for.
"""
from __future__ import annotations

import importlib
import inspect
import os

import torch

from dori_utils.backend_types import Backend, BackendError, MemorizedItem, default_device, guard_row_budget, hub_offline

__all__ = ["BACKENDS", "LOADERS", "OFFLINE_BACKENDS", "Backend", "BackendError", "MemorizedItem", "default_device",
           "hub_offline", "load_backend", "prepare_environment", "retrain_backend", "TRAINERS"]

# name -> "module:function" of its loader
LOADERS = {
    "organism": "dori_utils.organism.backend:load_organism",
    "organism-local": "dori_utils.organism.backend:load_local_organism",
    "sd-v1-4": "dori_utils.sd:load_stable_diffusion",
}
BACKENDS = tuple(LOADERS)
# name -> "module:function" that trains it from its recipe into the folder its loader reads; only the organism is
# ours to train
TRAINERS = {
    "organism": "dori_utils.organism.train:train_shipped_organism",
    "organism-local": "dori_utils.organism.train:train_local_organism",
}
# Backends whose weights ship with the book: they never need the Hugging Face Hub.
OFFLINE_BACKENDS = ("organism", "organism-local")
# dtype names a chapter's BACKEND_OPTIONS or a profile may give
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def prepare_environment(name: str) -> None:
    """Call before loading anything from diffusers or transformers: an offline backend sets ``HF_HUB_OFFLINE=1``
    (unless the user set it), which huggingface_hub reads once, at import."""
    if name in OFFLINE_BACKENDS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_backend(name: str = "organism", device: str | torch.device | None = None,
                 dtype: torch.dtype | str | None = None, row_budget: int | None = None,
                 sampling_batch: int | None = None, **options) -> Backend:
    """Load a backend by name: ``"organism"`` (default), ``"organism-local"`` (the contrast organism, whose
    memorization is local by construction) or ``"sd-v1-4"``.

    ``device`` defaults to the GPU when there is one; ``dtype`` (a torch dtype or "float32", "float16",
    "bfloat16") to float32. ``row_budget``: the most UNet rows one call may take with gradients (the attack and
    fine-tuning split their batches to fit, and a call over it fails with a clear error); ``sampling_batch``:
    embeddings per sampling batch. Other options go to the loader: ``path`` for the organism; ``model_id`` (a
    Hub id or a folder written by ``save_pretrained``), ``cache_dir``, ``ground_truth_dir``, ``sscd_path``,
    ``prompt_table``, ``unmemorized_table``, ``reference_cache`` for SD; ``vm_only`` (default True:
    verbatim-memorized items only), ``item_ids``, ``max_items`` and ``num_inference_steps`` (sampling steps
    instead of the model's own: faster, and further from the paper's setting) for both. A chapter passes its
    ``BACKEND_OPTIONS`` here.
    """
    if name not in LOADERS:
        raise BackendError(f"Unknown backend {name!r}. Choose one of {BACKENDS}: 'organism' runs offline on a CPU, "
                           "'sd-v1-4' needs a GPU and the Hugging Face Hub.")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise BackendError(f"Unknown dtype {dtype!r}: use one of {list(DTYPES)}.")
        dtype = DTYPES[dtype]
    for setting, value in (("row_budget", row_budget), ("sampling_batch", sampling_batch)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise BackendError(f"{setting} must be a positive whole number of rows, got {value!r}.")
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device={str(device)!r}, but torch sees no CUDA GPU here. Pass device=None (or DEVICE = None "
                           "in a chapter) to use the GPU when there is one and the CPU otherwise; on Colab, choose a GPU "
                           "runtime (Runtime > Change runtime type).")
    module, function = LOADERS[name].split(":")
    loader = getattr(importlib.import_module(module), function)
    accepted = set(inspect.signature(loader).parameters) - {"device", "dtype"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise BackendError(f"The {name!r} backend takes no option {unknown}; it takes {sorted(accepted)}, and "
                           "load_backend itself takes device, dtype, row_budget and sampling_batch.")
    if sampling_batch is not None and "sampling_batch" in accepted:
        options["sampling_batch"] = sampling_batch  # a loader that samples (SD's references) needs it before then
    backend = loader(device=device, dtype=dtype or torch.float32, **options)
    if row_budget is not None:
        backend.row_budget = row_budget
        guard_row_budget(backend.unet, row_budget)
    if sampling_batch is not None:
        backend.sampling_batch = sampling_batch
    return backend


def retrain_backend(name: str) -> None:
    """Retrain a backend's model from its recipe into the folder ``load_backend`` reads (the organism: about 45
    minutes on 2 CPU cores)."""
    if name not in TRAINERS:
        raise BackendError(f"The {name!r} backend is not trained by this book (its weights come from elsewhere); "
                           f"only {tuple(TRAINERS)} can be retrained. Set RETRAIN = False.")
    module, function = TRAINERS[name].split(":")
    getattr(importlib.import_module(module), function)()
