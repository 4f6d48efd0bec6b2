"""Adversarial fine-tuning (the paper's §5): train the whole UNet so that Dori's triggers draw a harmless surrogate.

The recipe, per memorized image x_mem:

1. **Surrogate** (``make_surrogates``, once, before training): the *pruned* model's generation from the original
   prompt: similar content, not a copy. Of a few seeds we keep the most similar candidate whose replication
   score stays under a ceiling (the chapter: 0.5, under the threshold of 0.7), and report the scores, so one can
   check that no surrogate is itself a replication. ``pruned_surrogates`` escalates the pruning for the items
   whose surrogate is still above the ceiling: Wanda's global mask at 10%, then 30%, then 50% with all of NeMo's
   value neurons blocked too. Each item gets the mildest pruning that draws a non-copy (the organism's
   memorization survives Wanda 10%, and even 50%, for some images). Where no pruning draws a non-copy that keeps
   the image's content (the organism: it draws a copy or a grey frame), ``transformed_surrogates`` makes the
   surrogate from the training image itself by a rigid transform (mirrored, upside down, rotated): the same content
   in other pixels, by construction. This is the book's adaptation, not the paper's recipe.
2. **Each epoch** (``adversarial_finetune``): run the Dori attack against the *current* model towards x_mem to
   collect triggers per image: ``triggers_per_item`` embeddings, of which ``random_starts`` start from
   N(0, s^2 I) (s = the backend's embedding spread) and the rest from the original prompt. The random starts are
   persistent: each epoch continues them from where the previous epoch's attack left them, so a short attack per
   epoch adds up to a long one (a choice of ours, to afford the attack on a CPU). The prompt starts restart from
   the prompt every epoch, as the paper's main attack does. The original prompt embedding itself (a 0-step
   trigger) is always in the adversarial set.
3. **Updates**: ``steps_per_epoch`` AdamW steps on the full UNet with L = L_DM + L_adv (unweighted, as the paper):
   L_DM is the standard diffusion loss on ordinary caption-image pairs (10% of captions replaced by the empty
   caption, as in the organism's training); L_adv = ||eps - eps_theta(x~_t, t, y_adv)||^2 pulls the triggers to
   the surrogate x~. Both use eps ~ N(0, I), t ~ U{0, T-1}, and regress on the backend's own target (noise for
   SD, velocity for the organism: ``noising.prediction_target``).

``use_triggers=False`` is the ablation the paper implies: the same updates, with the original prompt embedding as
the only adversarial embedding (plain fine-tuning towards the surrogate, no attack in the loop).

Fine-tuning starts from the unmitigated model (not the pruned one; the paper does not say) and always works on a
float32 copy of the UNet: the loaded backend is never changed. The result holds a new :class:`Backend` (via
``dataclasses.replace``) with the fine-tuned UNet in eval mode without gradients, like a loaded one.

Our default sizes are for the organism on 2 CPU cores (the whole chapter in about 5 minutes): 3 epochs of
15 updates, 2 triggers per item (1 from the prompt, 1 random start), 10 attack steps per epoch at a batch of 4
(noise, timestep) pairs (the paper's attack: 8), L_DM batch 16, L_adv batch 32, AdamW at lr 1e-3 (the organism's
own training rate), no weight decay, gradient clipping at 1. For SD v1.4 on a Colab GPU (untested here): batches
of 1, gradient checkpointing, ``attack_chunk=1`` and ``optimizer="adafactor"`` at lr 1e-5 (AdamW's two float32
states for 860M parameters do not fit next to the model on a 15 GB card).

``save_finetuned`` writes the backend's own format, so ``load_backend`` loads the result:

- organism: ``unet/`` (``save_pretrained``, safetensors), ``scheduler/``, ``references/`` and ``manifest.json``
  copied from the source checkpoint, the manifest amended with a ``finetune`` entry;
  ``load_backend("organism", path=out_dir)``;
- SD: ``unet/`` plus the unchanged ``vae/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/``;
  ``load_backend("sd-v1-4", model_id=out_dir)``.

Both also get ``finetune.json`` (configuration, loss curves, timings, cache key), which ``finetune_cached``
reads to skip a fine-tuning that was already done.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from dori_utils import attack
from dori_utils.metrics import best_reference_score
from dori_utils.noising import add_noise, prediction_target
from dori_utils.files import check_writable

FINETUNE_FILE = "finetune.json"


# --------------------------------------------------------------------------------------------- surrogates

@dataclass
class Surrogates:
    images: torch.Tensor  # N x 3 x H x W in [0, 1]: the chosen surrogate per item
    scores: torch.Tensor  # N: its replication score against the item's references
    seeds: list[int]  # the seed that drew each surrogate
    candidate_scores: torch.Tensor  # N x S: every candidate's score (under the pruning that was kept)
    threshold: float  # the backend's replication threshold
    max_score: float  # the score a surrogate had to stay under
    source: list[str] = field(default_factory=list)  # how each surrogate was made: the pruning, or the transform

    @property
    def all_below_threshold(self) -> bool:
        """No surrogate is itself a replication."""
        return bool((self.scores <= self.threshold).all())

    @property
    def all_below_max(self) -> bool:
        return bool((self.scores <= self.max_score).all())


def closest_under(scores: torch.Tensor, max_score: float) -> torch.Tensor:
    """Per row of an items x candidates score matrix, the candidate most similar to the item while scoring at most
    ``max_score``, or the least similar one where none does."""
    under = scores <= max_score
    return torch.where(under.any(dim=1), scores.masked_fill(~under, -float("inf")).argmax(dim=1), scores.argmin(dim=1))


def make_surrogates(backend, items, context=None, row_context=None, seeds=(0, 1, 2, 3), max_score: float | None = None,
                    label: str = "") -> Surrogates:
    """The pruned model's generation from each item's original prompt, one per item.

    ``context`` is a pruning open while sampling (e.g. ``wanda.prune(backend, masks)``), ``row_context`` a
    per-item one (NeMo: ``nemo.per_item_blocking``). Of the candidates (one per seed), the most similar one that
    stays under ``max_score`` (default: the replication threshold) is kept: similar content, not a copy. When
    every candidate is above, the least similar one is kept (``all_below_max`` is then false).
    """
    from dori_utils.evaluation import evaluate_items

    threshold = backend.replication_threshold
    max_score = threshold if max_score is None else max_score
    result = evaluate_items(backend, list(seeds), items=items, context=context, row_context=row_context)
    best = closest_under(result.scores, max_score)
    index = torch.arange(len(items))
    return Surrogates(result.images[index, best], result.scores[index, best], [list(seeds)[b] for b in best.tolist()],
                      result.scores, threshold, max_score, [label] * len(items))


SURROGATE_LEVELS = ((0.1, False), (0.3, False), (0.5, True))


def pruned_surrogates(backend, items, levels=SURROGATE_LEVELS, seeds=(0, 1, 2), max_score: float | None = None,
                      union_steps: int | None = None) -> Surrogates:
    """Surrogates drawn under pruning, each item under the mildest level that keeps it under ``max_score``.

    A level is (Wanda sparsity, whether NeMo's value neurons are all blocked too). The Wanda mask is the global
    one, found on all the items' prompts; "all value neurons" are every output channel of the ``attn2.to_v``
    layers NeMo searches (down and mid blocks). Items whose best candidate still scores above ``max_score``
    (default: the replication threshold) are drawn again at the next level; one that never gets under keeps its
    lowest-scoring candidate (``all_below_max`` then says so).
    """
    import contextlib

    from dori_utils import hooks, nemo, wanda

    max_score = backend.replication_threshold if max_score is None else max_score
    prompts = backend.encode_prompts([item.prompt for item in items])
    values = {name: list(range(module.out_features))
              for name, module in hooks.modules_by_name(backend.unet, nemo.value_layers(backend.unet)).items()}
    # one pass for the activation norms; only the share of weights pruned differs between levels
    masks_at = wanda.pruning_masks(backend, prompts, sparsity=[sparsity for sparsity, _ in levels], union_steps=union_steps)
    chosen: Surrogates | None = None
    remaining = list(range(len(items)))
    for sparsity, block_values in levels:
        masks = masks_at[sparsity]
        label = f"Wanda {sparsity:.0%}" + (" + value neurons blocked" if block_values else "")
        with contextlib.ExitStack() as stack:
            stack.enter_context(wanda.prune(backend, masks))
            if block_values:
                stack.enter_context(nemo.block(backend, values))
            part = make_surrogates(backend, [items[i] for i in remaining], seeds=seeds, max_score=max_score, label=label)
        if chosen is None:
            chosen = part
        else:
            for j, i in enumerate(remaining):
                if part.scores[j] <= max_score or part.scores[j] < chosen.scores[i]:
                    chosen.images[i], chosen.scores[i] = part.images[j], part.scores[j]
                    chosen.candidate_scores[i], chosen.seeds[i], chosen.source[i] = (
                        part.candidate_scores[j], part.seeds[j], part.source[j])
        remaining = [i for i in range(len(items)) if chosen.scores[i] > max_score]
        if not remaining:
            break
    return chosen


SURROGATE_TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mirrored": lambda image: image.flip(-1),
    "upside down": lambda image: image.flip(-2),
    "rotated 90°": lambda image: image.rot90(1, (-2, -1)),
    "rotated 180°": lambda image: image.rot90(2, (-2, -1)),
}


def transformed_surrogates(backend, items, max_score: float | None = None) -> Surrogates:
    """Surrogates made from each item's first training image by a rigid transform (``SURROGATE_TRANSFORMS``): the
    same content in other pixels. Of the transforms, the one most similar to the training images while scoring at
    most ``max_score`` (default: the replication threshold) is kept; where none does, the least similar one
    (``all_below_max`` is then false). Square images only (a rotation must keep the shape)."""
    threshold = backend.replication_threshold
    max_score = threshold if max_score is None else max_score
    references = [item.references[:1] for item in items]
    if any(r.shape[-1] != r.shape[-2] for r in references):
        raise ValueError("transformed_surrogates needs square training images: a rotation must keep the shape")
    candidates = torch.stack([torch.cat([transform(r) for transform in SURROGATE_TRANSFORMS.values()])
                              for r in references])  # N x T x 3 x H x W
    scores = torch.stack([best_reference_score(backend.replication_score, candidates[i], item.references)
                          for i, item in enumerate(items)])
    best = closest_under(scores, max_score)
    index = torch.arange(len(items))
    names = list(SURROGATE_TRANSFORMS)
    return Surrogates(candidates[index, best], scores[index, best], [None] * len(items), scores, threshold, max_score,
                      [names[b] for b in best.tolist()])


# --------------------------------------------------------------------------------------------- L_DM data

@dataclass
class TrainingPairs:
    """Caption-image pairs for L_DM: images in model space, captions as indices into their embeddings (CPU)."""

    images: torch.Tensor  # N x C x H x W, model space
    caption_index: torch.Tensor  # N
    caption_embeddings: torch.Tensor  # K x L x D
    empty_embedding: torch.Tensor  # 1 x L x D

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, n: int, generator: torch.Generator, caption_dropout: float = 0.1):
        """n pairs drawn with replacement; a ``caption_dropout`` share gets the empty caption."""
        index = torch.randint(0, len(self), (n,), generator=generator)
        cond = self.caption_embeddings[self.caption_index[index]]
        drop = torch.rand(n, generator=generator) < caption_dropout
        cond = torch.where(drop[:, None, None], self.empty_embedding.expand_as(cond), cond)
        return self.images[index], cond


def make_pairs(backend, images: torch.Tensor, captions: list[str], batch_size: int = 64) -> TrainingPairs:
    """Pairs from images (N x 3 x H x W in [0, 1]) and their captions, for any backend (SD: your LAION pairs)."""
    if len(images) != len(captions):
        raise ValueError(f"need one caption per image: {len(images)} images, {len(captions)} captions")
    with torch.no_grad():
        x0 = torch.cat([backend.to_model_space(images[i : i + batch_size]).float().cpu()
                        for i in range(0, len(images), batch_size)])
        unique = sorted(set(captions))
        embeddings = torch.cat([backend.encode_prompts(unique[i : i + 256]).float().cpu()
                                for i in range(0, len(unique), 256)])
    position = {c: i for i, c in enumerate(unique)}
    return TrainingPairs(x0, torch.tensor([position[c] for c in captions]), embeddings,
                         backend.empty_embedding().float().cpu())


def organism_pairs(backend, kinds=("ordinary", "natural"), max_pairs: int | None = None, seed: int = 0) -> TrainingPairs:
    """The organism's own non-memorized training pairs (scenes and natural photographs): its LAION."""
    samples = [s for s in backend.training_samples() if s.kind in kinds]
    if max_pairs is not None and max_pairs < len(samples):
        keep = np.random.default_rng(seed).choice(len(samples), max_pairs, replace=False)
        samples = [samples[i] for i in sorted(keep)]
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 255
    return make_pairs(backend, images, [s.caption for s in samples])


# --------------------------------------------------------------------------------------------- fine-tuning

@dataclass
class FinetuneConfig:
    epochs: int = 3
    steps_per_epoch: int = 15  # UNet updates per epoch
    triggers_per_item: int = 2  # attacked embeddings per memorized image and epoch
    random_starts: int = 1  # of which start from N(0, s^2 I); the rest from the prompt
    attack_steps: int = 10  # Dori steps per epoch (random starts: cumulative over epochs)
    attack_batch: int = 4  # (noise, timestep) pairs per embedding and attack step (the paper's attack: 8)
    attack_chunk: int | None = None  # embeddings per UNet pass in the attack (None: the attack's default)
    dm_batch: int = 16  # pairs per update for L_DM
    adv_batch: int = 32  # (trigger, noise, timestep) triples per update for L_adv (0: L_DM only, a control)
    lr: float = 1e-3
    weight_decay: float = 0.0
    caption_dropout: float = 0.1
    grad_clip: float = 1.0
    optimizer: str = "adamw"  # or "adafactor" (transformers), for SD on a small GPU
    gradient_checkpointing: bool = False
    use_triggers: bool = True  # False: the ablation, L_adv on the original prompt only
    seed: int = 0


@dataclass
class FinetuneResult:
    backend: object  # a Backend with the fine-tuned UNet
    config: dict
    history: dict  # l_dm, l_adv (per update), epoch_seconds, attack_loss (per epoch), total_seconds, machine
    triggers: torch.Tensor | None = None  # the last epoch's adversarial set (CPU), None when loaded from disk
    trigger_items: torch.Tensor | None = None  # which item each trigger belongs to
    source: dict = field(default_factory=dict)

    @property
    def unet(self):
        return self.backend.unet


def _denoising_mse(unet, x0, cond, scheduler, generator, device, row_budget: int | None = None) -> float:
    """The denoising MSE of one batch, backpropagated in slices of at most ``row_budget`` UNet
    rows, whose gradients add up to the whole batch's; returns the loss. The noise is drawn for the whole batch
    first, so the slicing changes no result."""
    x0 = x0.float()
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, len(scheduler.alphas_cumprod), (len(x0),), generator=generator)
    noisy = add_noise(scheduler, x0, noise, t)
    target = prediction_target(scheduler, x0, noise, t)
    total = 0.0
    for rows in torch.arange(len(x0)).split(row_budget or len(x0)):
        prediction = unet(noisy[rows].to(device), t[rows].to(device), cond[rows].to(device, torch.float32)).sample
        loss = (prediction.float() - target[rows].to(device)).pow(2).mean() * (len(rows) / len(x0))
        loss.backward()
        total += loss.item()
    return total


def _optimizer(name: str, parameters, lr: float, weight_decay: float):
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(parameters, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False)
    raise ValueError(f"Unknown optimizer {name!r}: use 'adamw' or 'adafactor'")


def machine() -> dict:
    return {"platform": platform.platform(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def adversarial_finetune(backend, items, surrogates: torch.Tensor, pairs: TrainingPairs,
                         config: FinetuneConfig | None = None, progress: bool = False, **overrides) -> FinetuneResult:
    """Fine-tune a copy of ``backend.unet`` so that Dori's triggers for ``items`` draw ``surrogates`` instead.

    ``surrogates``: N x 3 x H x W in [0, 1], one per item (``make_surrogates(...).images``). ``pairs``: the L_DM
    data (``organism_pairs`` or ``make_pairs``). Settings come from ``config`` (:class:`FinetuneConfig`), with
    keyword ``overrides`` (e.g. ``epochs=5, use_triggers=False``). The loaded backend is left as it was.
    """
    config = dataclasses.replace(config or FinetuneConfig(), **overrides)
    if len(surrogates) != len(items):
        raise ValueError(f"need one surrogate per item: {len(surrogates)} surrogates, {len(items)} items")
    if config.use_triggers and not 0 <= config.random_starts <= config.triggers_per_item:
        raise ValueError("random_starts must lie between 0 and triggers_per_item")
    device = backend.device
    unet = copy.deepcopy(backend.unet)
    if next(unet.parameters()).dtype != torch.float32:
        unet = unet.float()  # train in float32 whatever the backend's dtype
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    work = dataclasses.replace(backend, unet=unet)  # what the attack sees: a float32 UNet
    generator = torch.Generator().manual_seed(config.seed)
    scheduler = backend.scheduler
    n = len(items)
    with torch.no_grad():
        prompts = backend.encode_prompts([item.prompt for item in items]).float().cpu()
        memorized = torch.cat([item.references[:1] for item in items]).float()
        surrogate_x0 = backend.to_model_space(surrogates).float().cpu()
    n_prompt_starts = config.triggers_per_item - config.random_starts
    chains = attack.random_embeddings(backend, n * config.random_starts, seed=config.seed + 1).float()
    optimizer = _optimizer(config.optimizer, unet.parameters(), config.lr, config.weight_decay)
    history = {"l_dm": [], "l_adv": [], "epoch_seconds": [], "attack_seconds": [], "attack_loss": []}
    adversarial, adversarial_owner = prompts, torch.arange(n)
    started = time.time()
    label = ("fine-tuning (L_DM only)" if not config.adv_batch else "adversarial fine-tuning" if config.use_triggers
             else "fine-tuning (prompt only)")
    bar = tqdm(total=config.epochs * config.steps_per_epoch, desc=label, disable=not progress)
    try:
        for epoch in range(config.epochs):
            epoch_start = time.time()
            if config.use_triggers and config.adv_batch:
                unet.eval().requires_grad_(False)  # the attack needs gradients for the embeddings only
                inits = torch.cat([prompts.repeat_interleave(n_prompt_starts, dim=0), chains])
                owners = torch.cat([torch.arange(n).repeat_interleave(n_prompt_starts),
                                    torch.arange(n).repeat_interleave(config.random_starts)])
                found = attack.dori_attack(work, memorized[owners], inits, steps=config.attack_steps,
                                           batch_size=config.attack_batch, chunk_size=config.attack_chunk,
                                           seed=config.seed + 1000 * (epoch + 1))
                chains = found.embeddings[n * n_prompt_starts :].float()
                adversarial = torch.cat([prompts, found.embeddings.float()])
                adversarial_owner = torch.cat([torch.arange(n), owners])
                history["attack_loss"].append(found.losses[-1].mean().item())
                history["attack_seconds"].append(time.time() - epoch_start)
            unet.train().requires_grad_(True)
            for _ in range(config.steps_per_epoch):
                optimizer.zero_grad(set_to_none=True)
                x_dm, c_dm = pairs.sample(config.dm_batch, generator, config.caption_dropout)
                l_dm = _denoising_mse(unet, x_dm, c_dm, scheduler, generator, device, backend.row_budget)
                l_adv = 0.0  # L_DM only (adv_batch 0): continued training on ordinary pairs, the forgetting control
                if config.adv_batch:
                    pick = torch.randint(0, len(adversarial), (config.adv_batch,), generator=generator)
                    l_adv = _denoising_mse(unet, surrogate_x0[adversarial_owner[pick]], adversarial[pick], scheduler,
                                           generator, device, backend.row_budget)
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip)
                optimizer.step()
                history["l_dm"].append(l_dm)
                history["l_adv"].append(l_adv)
                bar.update(1)
                bar.set_postfix(l_dm=f"{l_dm:.3f}", l_adv=f"{l_adv:.3f}")
            history["epoch_seconds"].append(time.time() - epoch_start)
    finally:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
        unet.eval().requires_grad_(False)
        if config.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
    history["total_seconds"] = time.time() - started
    history["machine"] = machine()
    if backend.dtype != torch.float32:
        unet = unet.to(backend.dtype)
    return FinetuneResult(_with_unet(backend, unet), dataclasses.asdict(config), history,
                          adversarial.cpu(), adversarial_owner,
                          {"backend": backend.name, "from": backend.source})


# --------------------------------------------------------------------------------------------- saving, caching

def _with_unet(backend, unet):
    """A copy of ``backend`` with another UNet; its fingerprint (the cache key of other chapters) follows the weights."""
    return backend.with_unet(unet, f"finetuned-{weights_fingerprint(unet)}")


def weights_fingerprint(unet) -> str:
    """A short hash of a UNet's weights (per-tensor sums and norms): part of the cache key."""
    with torch.no_grad():
        stats = [f"{name}:{p.double().sum().item():.8e}:{p.double().norm().item():.8e}"
                 for name, p in unet.state_dict().items()]
    return hashlib.sha1("\n".join(stats).encode()).hexdigest()[:16]


def tensor_fingerprint(x: torch.Tensor) -> str:
    return hashlib.sha1(x.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def save_finetuned(result, out_dir, key: dict | None = None) -> Path:
    """Write a fine-tuned model in its backend's format (``Backend.save_pretrained``), with ``finetune.json``
    (configuration, curves, cache key); returns ``out_dir``. ``result`` is a :class:`FinetuneResult` or a Backend."""
    backend = result.backend if isinstance(result, FinetuneResult) else result
    record = {"backend": backend.name, "key": key or {}}
    if isinstance(result, FinetuneResult):
        record.update(config=result.config, history=result.history, source=result.source)
    finetuned = {"from": record.get("source", {}).get("from", backend.source), "config": record.get("config"),
                 "seconds": record.get("history", {}).get("total_seconds")}
    out = backend.save_pretrained(out_dir, manifest_updates={"finetune": finetuned})
    (out / FINETUNE_FILE).write_text(json.dumps(record, indent=1, default=float))
    return out


def load_finetuned(backend, out_dir) -> FinetuneResult:
    """The fine-tuned UNet in ``out_dir`` put into ``backend`` (its other parts are unchanged), with the record."""
    from diffusers import UNet2DConditionModel

    out = Path(out_dir)
    record = json.loads((out / FINETUNE_FILE).read_text())
    unet = UNet2DConditionModel.from_pretrained(out / "unet", local_files_only=True, torch_dtype=backend.dtype)
    unet = unet.to(backend.device).eval().requires_grad_(False)
    return FinetuneResult(_with_unet(backend, unet), record.get("config", {}), record.get("history", {}),
                          source=record.get("source", {}))


def finetune_cached(backend, out_dir, key: dict, compute: Callable[[], FinetuneResult]) -> FinetuneResult:
    """Load the fine-tuned model in ``out_dir`` if it was made with the same ``key``; else ``compute()``, save, return.

    Put into ``key`` everything the result depends on: the configuration, ``weights_fingerprint`` of the source
    UNet, the items and a fingerprint of the surrogates.
    """
    out = Path(out_dir)
    key = json.loads(json.dumps(key, default=str))
    if (out / FINETUNE_FILE).exists() and (out / "unet").exists():
        stored = json.loads((out / FINETUNE_FILE).read_text())
        if stored.get("key") == key:
            return load_finetuned(backend, out)
    check_writable(out.parent)
    result = compute()
    # Weights and key are written together into a folder of this process's own, which then takes the place of
    # the old one: a kill at any moment leaves the old entry, no entry, or the new one, never key A on weights B.
    fresh = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(fresh, ignore_errors=True)
    save_finetuned(result, fresh, key=key)
    stale = out.with_name(f".{out.name}.{os.getpid()}.stale")
    if out.exists():
        os.replace(out, stale)
    os.replace(fresh, out)
    shutil.rmtree(stale, ignore_errors=True)
    return result
