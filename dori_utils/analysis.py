"""The three "not local" analyses: where triggers lie, what they activate, which weights they implicate.

Pure functions over embeddings, activations and pruning selections; the chapters 2-4 call them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dori_utils import hooks, nemo, wanda
from dori_utils.metrics import median_score
from dori_utils.sampling import initial_noise


def pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """L2 distances between all pairs (i < j) of N x L x D embeddings, flattened."""
    flat = embeddings.float().flatten(1)
    i, j = torch.triu_indices(len(flat), len(flat), offset=1)
    return (flat[i] - flat[j]).norm(dim=1)


def cross_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L2 distances between every embedding of ``a`` and every embedding of ``b`` (len(a) x len(b))."""
    return torch.cdist(a.float().flatten(1), b.float().flatten(1))


def project_2d(points: np.ndarray, method: str = "umap", seed: int = 0) -> np.ndarray:
    """2-D map of N x F points with UMAP or t-SNE, seeded (UMAP then runs single-threaded, as it warns)."""
    points = np.asarray(points, dtype=np.float32).reshape(len(points), -1)
    if method == "umap":
        import umap

        return umap.UMAP(n_neighbors=min(15, len(points) - 1), min_dist=0.3, random_state=seed, n_jobs=1).fit_transform(points)
    if method == "tsne":
        from sklearn.manifold import TSNE

        return TSNE(n_components=2, perplexity=min(30.0, (len(points) - 1) / 3), random_state=seed, init="pca").fit_transform(points)
    raise ValueError(f"Unknown projection {method!r}; use 'umap' or 'tsne'")


@torch.no_grad()
def layer_activations(backend, embeddings: torch.Tensor, method: str, seed: int = 0, timestep: int | None = None,
                      batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Activations in the layers a pruning method acts on, at one fixed noise and timestep, per embedding.

    ``method="nemo"``: outputs of the down/mid ``attn2.to_v`` (N x tokens x width);
    ``method="wanda"``: inputs of every ``ff.net.2`` (N x pixels x 4*width). Conditional branch only.
    """
    if method == "nemo":
        layers, capture = nemo.value_layers(backend.unet), hooks.capture_outputs
    elif method == "wanda":
        layers, capture = wanda.ff_layers(backend.unet), hooks.capture_inputs
    else:
        raise ValueError(f"method must be 'nemo' or 'wanda', got {method!r}")
    if timestep is None:
        backend.scheduler.set_timesteps(backend.num_inference_steps)
        timestep = int(backend.scheduler.timesteps[0])
    collected: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    for start in range(0, len(embeddings), batch_size):
        chunk = embeddings[start : start + batch_size].to(backend.device, backend.dtype)
        x = initial_noise(backend, [seed]).expand(len(chunk), -1, -1, -1)
        with capture(backend.unet, layers) as records:
            backend.unet(x, timestep, chunk)
        for name in layers:
            collected[name].append(torch.cat(records[name]).float().cpu())
    return {name: torch.cat(parts) for name, parts in collected.items()}


def mean_pairwise_distance(activations: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per layer, the mean L2 distance between the activations of every pair of embeddings."""
    return {name: pairwise_distances(a).mean().item() for name, a in activations.items()}


def top_neurons(activations: dict[str, torch.Tensor], k: int) -> dict[str, list[set[int]]]:
    """Per layer and embedding, the k channels with the largest mean |activation| over positions."""
    return {name: [set(torch.topk(a.abs().mean(0), k).indices.tolist()) for a in acts]
            for name, acts in activations.items()}


def iou(a: set, b: set) -> float:
    """Intersection over union; two empty sets agree fully (IoU 1), as the paper counts them."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def pairwise_iou(selections: list[set]) -> tuple[float, float]:
    """Mean IoU over all pairs of sets, and the share of pairs where both sets were empty."""
    pairs = [(a, b) for i, a in enumerate(selections) for b in selections[i + 1 :]]
    if not pairs:
        raise ValueError("need at least two selections to compare")
    both_empty = sum(1 for a, b in pairs if not a and not b)
    return float(np.mean([iou(a, b) for a, b in pairs])), both_empty / len(pairs)


def layerwise_iou(selections: list[dict[str, set]]) -> dict[str, tuple[float, float]]:
    """Per layer: (mean pairwise IoU, share of empty-empty pairs) across several selections."""
    layers = sorted({name for s in selections for name in s}, key=lambda n: list(selections[0]).index(n) if n in selections[0] else 0)
    return {name: pairwise_iou([s.get(name, set()) for s in selections]) for name in layers}


def nemo_sets(neurons: dict[str, list[int]]) -> dict[str, set]:
    """NeMo's selection as sets of (layer, channel)."""
    return {name: set(channels) for name, channels in neurons.items()}


def wanda_sets(masks: dict[str, torch.Tensor]) -> dict[str, set]:
    """Wanda's selection as sets of (row, column) weight positions per layer."""
    return {name: set(map(tuple, torch.nonzero(mask).tolist())) for name, mask in masks.items()}


def transformer_block(layer: str) -> str:
    """The transformer block a layer belongs to: 'down_blocks.2.attentions.0.transformer_blocks.0'."""
    return layer.split(".attn2.")[0].split(".ff.")[0]


def channels_touched(nemo_neurons: dict[str, list[int]], wanda_masks: dict[str, torch.Tensor]) -> dict[str, tuple[set, set]]:
    """Per transformer block, the channels each method touches, in one unit: NeMo's ``to_v`` output channels,
    and the ``ff.net.2`` output channels (rows) where Wanda zeroes any weight. Both index the block's width;
    the match is positional (the two layers feed the residual stream through different projections)."""
    result = {}
    wanda_by_block = {transformer_block(n): m for n, m in wanda_masks.items()}
    for name, channels in nemo_neurons.items():
        block = transformer_block(name)
        if block in wanda_by_block:
            rows = set(torch.nonzero(wanda_by_block[block].any(dim=1)).flatten().tolist())
            result[block] = (set(channels), rows)
    return result


@dataclass
class TriggerSet:
    """Dori triggers found from many starting points, with the item each one targets and whether it works."""

    item_ids: list[str]
    start_kinds: list[str]  # "random" or "non-memorized prompt"
    initial: torch.Tensor  # N x L x D
    triggers: torch.Tensor  # N x L x D
    scores: torch.Tensor  # N: median replication score over the evaluation seeds
    replicates: torch.Tensor  # N, bool

    def of(self, item_id: str, successful_only: bool = True) -> torch.Tensor:
        keep = [i for i, x in enumerate(self.item_ids) if x == item_id and (self.replicates[i] or not successful_only)]
        return self.triggers[keep]


def collect_triggers(backend, items, row_context, n_random: int, start_prompts: list[str], steps: int = 50,
                     seeds=(0, 1), seed: int = 0, progress: bool = False) -> TriggerSet:
    """Run the Dori attack for each item from ``n_random`` N(0, s^2 I) starts and from each of ``start_prompts``
    (non-memorized prompts), every run under its item's pruning (``row_context`` over item indices, e.g.
    ``nemo.per_item_blocking``), all in one batched attack, and score every trigger."""
    from dori_utils.attack import dori_attack, random_embeddings
    from dori_utils.evaluation import evaluate_items

    prompt_starts = backend.encode_prompts(start_prompts) if start_prompts else torch.empty(0, *backend.embedding_shape)
    kinds = ["random"] * n_random + ["non-memorized prompt"] * len(prompt_starts)
    starts = torch.cat([torch.cat([random_embeddings(backend, n_random, seed=seed + i), prompt_starts.cpu().float()])
                        for i in range(len(items))])
    owner = torch.arange(len(items)).repeat_interleave(len(kinds))
    targets = torch.cat([items[i].references[:1] for i in owner.tolist()])
    per_run = lambda rows: row_context(owner[rows])
    found = dori_attack(backend, targets, starts, steps=steps, seed=seed, row_context=per_run, progress=progress)
    evaluation = evaluate_items(backend, list(seeds), found.embeddings, items=[items[i] for i in owner.tolist()],
                                row_context=per_run)
    median = median_score(evaluation.scores)
    return TriggerSet(
        item_ids=[items[i].id for i in owner.tolist()],
        start_kinds=kinds * len(items),
        initial=found.initial,
        triggers=found.embeddings,
        scores=median,
        replicates=median > backend.replication_threshold,
    )


def trigger_distances(triggers: TriggerSet, prompt_embeddings: dict[str, torch.Tensor],
                      unrelated: torch.Tensor) -> dict[str, torch.Tensor]:
    """The distance distributions behind the "spread" claim.

    Successful triggers only; an item with fewer than two successful triggers contributes all its attack
    results to the same-image distances instead (so the figure still shows where the attack ended). The random
    starts of one image are the baseline: N(0, s^2 I) draws in L x D dimensions lie about s * sqrt(2 L D) apart
    before any attack step, so triggers that sit as far apart as their starts inherited their spread.
    """
    ids = sorted(set(triggers.item_ids), key=triggers.item_ids.index)
    same, starts = [], []
    for item_id in ids:
        found = triggers.of(item_id) if len(triggers.of(item_id)) > 1 else triggers.of(item_id, successful_only=False)
        if len(found) > 1:
            same.append(pairwise_distances(found))
        random = [i for i, (x, kind) in enumerate(zip(triggers.item_ids, triggers.start_kinds))
                  if x == item_id and kind == "random"]
        if len(random) > 1:
            starts.append(pairwise_distances(triggers.initial[random]))
    ok = triggers.replicates if triggers.replicates.any() else torch.ones_like(triggers.replicates)
    to_start = (triggers.triggers - triggers.initial).flatten(1).norm(dim=1)[ok]
    to_prompt = torch.stack([(t - prompt_embeddings[i].cpu()).norm() for t, i, k in
                             zip(triggers.triggers, triggers.item_ids, ok) if k])
    return {"triggers of the same image": torch.cat(same),
            "random starts of the same image": torch.cat(starts) if starts else torch.empty(0),
            "two non-memorized prompts": pairwise_distances(unrelated),
            "trigger to its start": to_start, "trigger to its memorized prompt": to_prompt}
