import json
import os
from pathlib import Path

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


def _tiny_tokenizer(folder: Path):
    """A character-level CLIP tokenizer: every letter and digit is a token, so no merges are needed."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> str:
    """A 7 MB SD-1.x pipeline (16 px images, 8 x 8 latents, 32-d text embeddings) in diffusers format."""
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd"))


def save_tiny_sd_pipeline(folder: Path) -> str:
    """A tiny random SD-1.x pipeline saved with ``save_pretrained`` under ``folder/pipeline`` (also used by
    benchmarks/chapter_costs.py, which counts the UNet calls the chapters make)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    tokenizer = _tiny_tokenizer(folder)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(folder / "pipeline")
    return str(folder / "pipeline")


class TinySSCD(torch.nn.Module):
    """Stands in for the SSCD TorchScript file: pooled convolution features, 8-d descriptors."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=5, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).relu().mean(dim=(2, 3))


def save_tiny_sscd(path: Path) -> Path:
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(TinySSCD()), str(path))
    return path


def write_unmemorized_table(path: Path, rows: int = 16) -> Path:
    """Non-memorized prompts in NeMo's schema (";"-separated, an unnamed row column); 16 are enough for every
    control set of the SD chapter tests (benchmarks/chapter_costs.py writes NeMo's 500)."""
    lines = [f"{i};a photo of object number {i} on a table;https://example.com/{i}.jpg;{1000 + i}" for i in range(rows)]
    path.write_text(";Caption;URL;Index\n" + "\n".join(lines) + "\n")
    return path
