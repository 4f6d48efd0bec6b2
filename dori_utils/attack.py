"""The Dori attack: optimise a conditioning embedding until the model denoises towards a memorized image.

Per step, each embedding gets a fresh batch of (noise, timestep) pairs, eps ~ N(0, I) and t ~ U{0, T-1}, drawn
from its own generator (so results do not depend on how many embeddings share a UNet call); the
loss is the denoising MSE ||eps - eps_theta(x_t, t, y)||^2 on the noised target x_t in model space (for a
v-prediction model such as the organism, the same MSE on the velocity target: ``noising.prediction_target``),
and Adam updates y. Many embeddings are optimised at once: their losses are summed, and since Adam works element by
element, that equals running one Adam per embedding.

The paper's settings for SD v1.4: the full 77 x 768 CLIP output, Adam, learning rate 0.1, batch 8, 50 steps.
For another text encoder the learning rate is scaled by the embedding's per-dimension spread
(``backend.attack_learning_rate``), since the same step is a larger move for a narrower encoder.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from dori_utils.backend_types import check_count
from dori_utils.noising import add_noise, prediction_target


@dataclass
class AttackResult:
    embeddings: torch.Tensor  # N x L x D, the final triggers (CPU)
    initial: torch.Tensor  # N x L x D, where each run started (CPU)
    losses: torch.Tensor  # steps x N, the denoising loss of each embedding at each step
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> N x L x D

    @property
    def displacement(self) -> torch.Tensor:
        """||y_adv - y_0||_2 per embedding: how far the attack moved it."""
        return (self.embeddings - self.initial).flatten(1).norm(dim=1)


def random_embeddings(backend, n: int, seed: int = 0) -> torch.Tensor:
    """N(0, s^2 I) starting points, s = the backend's embedding spread (the paper draws N(0, I) for CLIP)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, *backend.embedding_shape), generator=generator) * backend.embedding_spread


def dori_attack(
    backend,
    targets: torch.Tensor,
    init: torch.Tensor,
    steps: int = 50,
    batch_size: int = 8,
    learning_rate: float | None = None,
    seed: int = 0,
    snapshot_steps: tuple[int, ...] = (),
    chunk_size: int | None = None,
    row_context=None,
    progress: bool = False,
) -> AttackResult:
    """Optimise ``init`` (N x L x D) so the UNet denoises towards ``targets`` (N x 3 x H x W images in [0, 1]).

    Works under any pruning context (hooks or masked weights), since it only calls ``backend.unet``.
    ``snapshot_steps`` keeps copies of the embeddings after those steps (0 = the start), e.g. for MR against
    attack steps. ``chunk_size`` bounds how many embeddings go through the UNet at once (gradients are
    accumulated); by default as many as ``backend.row_budget`` holds, else 64 on a GPU and 5 on a CPU, where
    batches of 40 rows ran fastest (2 cores). No UNet call takes more than ``backend.row_budget`` rows. In
    float16 the loss is scaled (``torch.amp.GradScaler``) so that small gradients do not underflow.
    ``row_context(indices)`` wraps each UNet call with the index of the embedding behind each batch row, so that
    one attack can run every prompt under its own pruning (NeMo's per-prompt neurons: ``nemo.per_item_blocking``).
    """
    if init.ndim != 3 or tuple(init.shape[1:]) != tuple(backend.embedding_shape):
        raise ValueError(f"init must be N x {backend.embedding_shape[0]} x {backend.embedding_shape[1]}, got {tuple(init.shape)}")
    if len(targets) != len(init):
        raise ValueError(f"need one target image per embedding: {len(targets)} targets, {len(init)} embeddings")
    if len(init) == 0:
        raise ValueError("no embeddings to attack: init is empty")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    check_count("batch_size", batch_size, allow_none=False)
    check_count("chunk_size", chunk_size)
    if not targets.is_floating_point() or not torch.isfinite(targets).all() or targets.min() < 0 or targets.max() > 1:
        raise ValueError(f"targets must be finite float images in [0, 1] (got {targets.dtype}, range "
                         f"{targets.min().item()}..{targets.max().item()}): divide uint8 images by 255.")
    if not torch.isfinite(init).all():
        raise ValueError("init holds NaN or infinite values: check the embeddings it came from")
    lr = backend.attack_learning_rate if learning_rate is None else learning_rate
    budget = backend.row_budget
    chunk_size = chunk_size or (max(1, budget // batch_size) if budget else 64 if backend.device.type == "cuda" else 5)
    device, dtype = backend.device, backend.dtype
    with torch.no_grad():
        x0 = torch.cat([backend.to_model_space(targets[i : i + chunk_size].to(device)) for i in range(0, len(targets), chunk_size)])
    if tuple(x0.shape[1:]) != tuple(backend.latent_shape):
        raise ValueError(f"targets of shape {tuple(targets.shape[1:])} become {tuple(x0.shape[1:])} in model space, but "
                         f"the UNet denoises {tuple(backend.latent_shape)}: resize the target images to the model's "
                         "image size")
    embedding = init.detach().clone().to(device, torch.float32).requires_grad_(True)
    optimizer = torch.optim.Adam([embedding], lr=lr)
    # float16 gradients of about 1e-6 underflow: scale the loss (and skip a step whose scaled gradients overflow)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    scheduler = backend.scheduler
    n_train = len(scheduler.alphas_cumprod)
    # One generator per embedding: its (noise, timestep) pairs do not depend on which chunk it lands in, so the
    # chunk size (a memory setting) never changes a result.
    generators = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(len(embedding))]
    snapshots = {0: init.detach().cpu().clone()} if 0 in snapshot_steps else {}
    losses = []
    for step in tqdm(range(1, steps + 1), desc="Dori attack", disable=not progress):
        optimizer.zero_grad(set_to_none=True)
        step_losses = []
        for start in range(0, len(embedding), chunk_size):
            n = min(chunk_size, len(embedding) - start)
            pairs = [_noise_pairs(generators[i], batch_size, x0.shape[1:], n_train) for i in range(start, start + n)]
            noise = torch.cat([noise for noise, _ in pairs]).to(device, dtype)
            t = torch.cat([t for _, t in pairs]).to(device)
            owner = torch.arange(n).repeat_interleave(batch_size)  # row -> embedding within the chunk
            per_embedding = torch.zeros(n, device=device)
            # a row budget below one embedding's pairs splits its pairs over UNet calls; the gradient adds up
            for rows in torch.arange(n * batch_size).split(budget or n * batch_size):
                clean = x0[start + owner[rows]]
                noisy = add_noise(scheduler, clean, noise[rows], t[rows])
                target = prediction_target(scheduler, clean, noise[rows], t[rows])
                condition = embedding[start + owner[rows]].to(dtype)
                try:
                    with row_context(start + owner[rows]) if row_context is not None else contextlib.nullcontext():
                        prediction = backend.unet(noisy.to(dtype), t[rows], condition).sample
                except torch.cuda.OutOfMemoryError as error:
                    raise torch.cuda.OutOfMemoryError(
                        f"The attack ran out of GPU memory with {len(rows)} UNet rows at once (chunk_size={chunk_size} "
                        f"embeddings x batch_size={batch_size} noise pairs, row budget {budget}). Lower chunk_size (a "
                        "chapter's ATTACK_CHUNK) or BACKEND_OPTIONS['row_budget']; neither changes a result.") from error
                row_loss = (prediction.float() - target.float()).pow(2).flatten(1).mean(1) / batch_size
                part = torch.zeros(n, device=device).index_add(0, owner[rows].to(device), row_loss)
                scaler.scale(part.sum()).backward()
                per_embedding += part.detach()
            step_losses.append(per_embedding.cpu())
        scaler.step(optimizer)
        scaler.update()
        losses.append(torch.cat(step_losses))
        if step in snapshot_steps:
            snapshots[step] = embedding.detach().cpu().clone()
    return AttackResult(embedding.detach().cpu().to(init.dtype), init.detach().cpu(), torch.stack(losses), snapshots)


def _noise_pairs(generator: torch.Generator, n: int, shape, n_train: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` (noise, timestep) pairs for one embedding at one step, from that embedding's own generator."""
    return torch.randn((n, *shape), generator=generator), torch.randint(0, n_train, (n,), generator=generator)


@torch.no_grad()
def denoising_loss(backend, targets: torch.Tensor, embeddings: torch.Tensor, n_pairs: int = 32, seed: int = 0) -> torch.Tensor:
    """The attack's loss per embedding on a fixed set of (noise, timestep) pairs, for before/after comparisons."""
    x0 = backend.to_model_space(targets.to(backend.device))
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((n_pairs, *x0.shape[1:]), generator=generator).to(backend.device, backend.dtype)
    scheduler = backend.scheduler
    t = torch.linspace(0, len(scheduler.alphas_cumprod) - 1, n_pairs).long().to(backend.device)
    losses = []
    for clean, y in zip(x0, embeddings.to(backend.device, backend.dtype)):
        clean = clean.expand_as(noise)
        noisy = add_noise(scheduler, clean, noise, t)
        prediction = backend.unet(noisy, t, y.expand(n_pairs, -1, -1)).sample
        losses.append((prediction.float() - prediction_target(scheduler, clean, noise, t).float()).pow(2).mean())
    return torch.stack(losses).cpu()
