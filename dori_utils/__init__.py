"""dori_utils: the code behind the executable book "Finding Dori" (one module per concept).

Start with ``load_backend("organism")`` (offline, CPU) or ``load_backend("sd-v1-4")`` (GPU, Hugging Face Hub).
"""
from dori_utils.backends import Backend, BackendError, MemorizedItem, load_backend, prepare_environment

__all__ = ["Backend", "BackendError", "MemorizedItem", "load_backend", "prepare_environment"]
