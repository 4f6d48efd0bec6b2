import os

# Read at import time by huggingface_hub: tests must never reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_organism_dir(tmp_path_factory):
    """A tiny organism trained for a few steps through the real training command."""
    from dori_utils.organism.train import main

    out = tmp_path_factory.mktemp("organism")
    main(["--out", str(out), "--tiny", "--steps", "4", "--save-every", "2", "--n-ordinary", "40",
          "--copies-per-photo", "2", "--n-crops", "11", "--n-faces", "5", "--threads", "1", "--batch-size", "8"])
    return out


@pytest.fixture(scope="session")
def tiny_local_backend(tmp_path_factory):
    """A tiny contrast organism (example-tied dropout), trained for two steps through the real training command."""
    from dori_utils.backends import load_backend
    from dori_utils.organism.train import main

    out = tmp_path_factory.mktemp("organism-local")
    main(["--out", str(out), "--tiny", "--steps", "2", "--save-every", "2", "--n-ordinary", "40",
          "--copies-per-photo", "2", "--n-crops", "11", "--n-faces", "5", "--threads", "1", "--batch-size", "8",
          "--memorization-channel-share", "0.5", "--item-channel-share", "0.25"])
    return load_backend("organism-local", device="cpu", path=out, max_items=2)


@pytest.fixture(scope="session")
def tiny_backend(tiny_organism_dir):
    from dori_utils.backends import load_backend

    backend = load_backend("organism", device="cpu", path=tiny_organism_dir)
    backend.num_inference_steps = 4
    return backend


@pytest.fixture
def generator():
    """A seeded torch generator: tests that draw random tensors draw them from here, never the global one."""
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> str:
    """A 7 MB SD-1.x pipeline (16 px images, 8 x 8 latents, 32-d text embeddings) in diffusers format."""
    from dori_utils.book.tiny_sd import save_tiny_sd_pipeline

    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd"))
