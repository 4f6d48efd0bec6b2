"""Sampling with classifier-free guidance from prompt embeddings, seeded per image.

One loop for every backend: the UNet sees the unconditional and conditional halves in one batch (so hooks
see both guidance branches), and each image's initial noise comes from its own CPU ``torch.Generator``
seeded with its seed, so a seed gives the same image on any device and in any batch.

A ``row_context`` lets one batch hold embeddings that need different model edits (NeMo blocks other neurons
for every prompt): it is called with the index of the embedding behind each row of the UNet's batch, and the
context manager it returns is open during that UNet call.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from tqdm import tqdm

from dori_utils.backend_types import check_count


@dataclass
class Samples:
    images: torch.Tensor  # N x 3 x H x W in [0, 1], on the CPU
    # N x steps: ||out(x_t, c) - out(x_t, empty)||_2 at each sampling step, where out is the UNet's own prediction:
    # the noise for SD, as in Wen et al.; the velocity for the organism, whose noise prediction's text-conditional
    # part, sqrt(abar) (v_c - v_empty), vanishes at the zero-SNR first step.
    wen_per_step: torch.Tensor

    @property
    def wen_scores(self) -> torch.Tensor:
        """N: Wen et al.'s score, the mean of the per-step norms over the sampling steps."""
        return self.wen_per_step.mean(dim=1)


def initial_noise(backend, seeds: list[int]) -> torch.Tensor:
    shape = backend.latent_shape
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(backend.device, backend.dtype)


@torch.no_grad()
def generate(
    backend,
    embeddings: torch.Tensor,
    seeds: list[int],
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int | None = None,
    on_step=None,
    stop_after: int | None = None,
    row_context=None,
    progress: bool = False,
) -> Samples:
    """Generate one image per (embedding, seed) pair.

    ``embeddings`` is N x L x D (a prompt's embedding or any tensor of that shape, e.g. a Dori trigger);
    ``seeds`` has N entries. ``on_step(step_index, timestep)`` is called before each denoising step, so
    hooks can tell the timestep without counting calls. ``batch_size``: embeddings per batch (default
    ``backend.sampling_batch``; each makes two UNet rows, the guidance branches). ``stop_after`` ends each batch
    after that many steps (for methods that only look at the first steps) and returns the partly denoised
    images. ``row_context``:
    see the module's docstring.
    """
    if embeddings.ndim != 3 or embeddings.shape[1:] != backend.embedding_shape:
        raise ValueError(f"embeddings must be N x {backend.embedding_shape[0]} x {backend.embedding_shape[1]}, "
                         f"got {tuple(embeddings.shape)}")
    if len(seeds) != len(embeddings):
        raise ValueError(f"need one seed per embedding: {len(seeds)} seeds for {len(embeddings)} embeddings")
    if len(embeddings) == 0:
        raise ValueError("no embeddings to generate from")
    if not torch.isfinite(embeddings).all():
        raise ValueError("embeddings hold NaN or infinite values: check the prompts or the attack they came from")
    steps = backend.num_inference_steps if num_inference_steps is None else num_inference_steps
    check_count("num_inference_steps", steps, allow_none=False)
    check_count("stop_after", stop_after)
    check_count("batch_size", batch_size)
    guidance = backend.guidance_scale if guidance_scale is None else guidance_scale
    batch_size = batch_size or getattr(backend, "sampling_batch", 32)
    empty = backend.empty_embedding()
    images, wen = [], []
    scheduler = backend.scheduler
    for start in tqdm(range(0, len(embeddings), batch_size), desc="sampling", disable=not progress):
        cond = embeddings[start : start + batch_size].to(backend.device, backend.dtype)
        x = initial_noise(backend, seeds[start : start + batch_size]) * scheduler.init_noise_sigma
        uncond = empty.expand_as(cond)
        scheduler.set_timesteps(steps)
        norms = []
        timesteps = scheduler.timesteps[:stop_after] if stop_after is not None else scheduler.timesteps
        rows = torch.arange(start, start + len(cond))
        edit = (lambda: row_context(torch.cat([rows, rows]))) if row_context is not None else contextlib.nullcontext
        for i, t in enumerate(timesteps):
            if on_step is not None:
                on_step(i, int(t))
            model_in = scheduler.scale_model_input(torch.cat([x, x]), t)
            with edit():
                out_uncond, out_cond = backend.unet(model_in, t, torch.cat([uncond, cond])).sample.chunk(2)
            norms.append((out_cond - out_uncond).float().flatten(1).norm(dim=1))
            guided = out_uncond + guidance * (out_cond - out_uncond)
            x = scheduler.step(guided, t, x).prev_sample
        if not torch.isfinite(x).all():
            raise FloatingPointError(
                f"Sampling produced NaN or infinite values (embeddings {start}-{start + len(cond) - 1}): the model's "
                "weights or an edit applied to them (pruning, fine-tuning) are broken, or float16 overflowed; try "
                "float32.")
        images.append(backend.to_image_space(x).float().cpu())
        wen.append(torch.stack(norms, dim=1).cpu())
    return Samples(torch.cat(images), torch.cat(wen))


def generate_for_prompts(backend, prompts: list[str], seeds: list[int], **kwargs) -> Samples:
    """Every prompt with every seed, prompt-major: image ``p * len(seeds) + s``."""
    embeddings = backend.encode_prompts(prompts)
    return generate_for_embeddings(backend, embeddings, seeds, **kwargs)


def generate_for_embeddings(backend, embeddings: torch.Tensor, seeds: list[int], row_context=None, **kwargs) -> Samples:
    """Every embedding with every seed, embedding-major (``row_context`` sees the index into ``embeddings``)."""
    repeated = embeddings.repeat_interleave(len(seeds), dim=0)
    if row_context is not None:
        kwargs["row_context"] = lambda rows: row_context(rows // len(seeds))
    return generate(backend, repeated, list(seeds) * len(embeddings), **kwargs)
