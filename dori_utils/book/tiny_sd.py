"""Tiny stand-ins for SD v1.4 and the files its backend reads: a random SD-1.x pipeline, an SSCD TorchScript file and
NeMo's table of non-memorized prompts. The tests run every chapter offline on them, and
``benchmarks/chapter_costs.py`` counts the UNet calls each chapter makes with them."""
from __future__ import annotations

import json
from pathlib import Path

import torch


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


def save_tiny_sd_pipeline(folder: Path) -> str:
    """A tiny random SD-1.x pipeline saved with ``save_pretrained`` under ``folder/pipeline``."""
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
