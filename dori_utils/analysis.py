"""The three "not local" analyses: where triggers lie, what they activate, which weights they implicate.

Pure functions over embeddings, activations and pruning selections; the chapters 2-4 call them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

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


ACTIVATION_LAYERS = ("nemo", "cross_attention", "wanda")


def activation_layers(unet, layers: str) -> tuple[list[str], Callable]:
    """The modules of one layer set, in forward order, and the hook that captures them:

    - ``"nemo"``: the outputs of the down/mid ``attn2.to_v``, where NeMo blocks neurons. They read the text
      embedding alone, so they are the same at every timestep and for every image being denoised;
    - ``"cross_attention"``: the outputs of those same blocks' ``attn2``, where the image's queries meet the
      text's values, so they depend on the noise, the timestep and the text;
    - ``"wanda"``: the inputs of every ``ff.net.2``, whose weights Wanda prunes.
    """
    if layers == "nemo":
        return nemo.value_layers(unet), hooks.capture_outputs
    if layers == "cross_attention":
        return [name.removesuffix(".to_v") for name in nemo.value_layers(unet)], hooks.capture_outputs
    if layers == "wanda":
        return wanda.ff_layers(unet), hooks.capture_inputs
    raise ValueError(f"layers must be one of {ACTIVATION_LAYERS}, got {layers!r}")


@torch.no_grad()
def layer_activations(backend, embeddings: torch.Tensor, method: str, seed: int = 0, timestep: int | None = None,
                      batch_size: int = 32, blocked: dict[str, list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Activations of one layer set (``method``, see :func:`activation_layers`) at one fixed noise and timestep,
    per embedding (N x positions x width), conditional branch only, with ``blocked`` NeMo neurons switched off
    (the pruned model the triggers were found in) where given."""
    layers, capture = activation_layers(backend.unet, method)
    if timestep is None:
        backend.scheduler.set_timesteps(backend.num_inference_steps)
        timestep = int(backend.scheduler.timesteps[0])
    collected: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    pruning = nemo.block(backend, blocked) if blocked else contextlib.nullcontext()
    with pruning:
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

    def comparable(self, item_id: str) -> torch.Tensor:
        """The item's replicating triggers, or all its attack results when fewer than two replicate, so that an
        analysis of pairs still has pairs (and shows where the attack ended)."""
        found = self.of(item_id)
        return found if len(found) > 1 else self.of(item_id, successful_only=False)


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
        found = triggers.comparable(item_id)
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


# ----------------------------------------------------------------------------------- chapter 2: where triggers lie

def trigger_success(triggers: TriggerSet):
    """Share of starts that became replication triggers, per item (rows) and kind of start (columns)."""
    import pandas as pd

    frame = pd.DataFrame({"item": triggers.item_ids, "start": triggers.start_kinds,
                          "replicates": triggers.replicates.float().numpy()})
    return frame.pivot_table(index="item", columns="start", values="replicates", aggfunc="mean")


def trigger_map_points(triggers: TriggerSet, memorized_prompts: torch.Tensor, ordinary: torch.Tensor):
    """The points of the trigger map (starts, triggers, memorized prompts, ordinary prompts) flattened into one
    array, and the slice of each group."""
    n, m = len(triggers.triggers), len(memorized_prompts)
    points = torch.cat([triggers.initial, triggers.triggers, memorized_prompts.cpu().float(), ordinary.cpu().float()])
    groups = {"start": slice(0, n), "trigger": slice(n, 2 * n), "memorized prompt": slice(2 * n, 2 * n + m),
              "ordinary prompt": slice(2 * n + m, len(points))}
    return points.flatten(1).numpy(), groups


def spread_summary(triggers: TriggerSet, distances: dict[str, torch.Tensor]) -> dict:
    """The numbers behind the "spread" claim: share of starts that became triggers, the median of each distance
    distribution, the two ratios the chapter reads, and the share of triggers whose nearest start is their own."""
    medians = {name: d.median().item() for name, d in distances.items()}
    nearest = cross_distances(triggers.triggers, triggers.initial).argmin(dim=1)
    return {
        "share": triggers.replicates.float().mean().item(),
        "n_triggers": len(triggers.triggers),
        "n_replicating": int(triggers.replicates.sum().item()),
        "median_distances": medians,
        "ratio_to_unrelated": medians["triggers of the same image"] / medians["two non-memorized prompts"],
        "ratio_to_starts": medians["triggers of the same image"] / medians["random starts of the same image"],
        "own_start_nearest_share": (nearest == torch.arange(len(nearest))).float().mean().item(),
        "prompt_vs_start": medians["trigger to its memorized prompt"] / medians["trigger to its start"],
    }


# ------------------------------------------------------------------- chapter 3: what triggers of one image activate

def activation_divergence(backend, embeddings: dict[str, torch.Tensor], top_share: float = 0.1,
                          timestep: int | None = None, blocked: dict[str, list[int]] | None = None,
                          layer_sets: tuple[str, ...] = ACTIVATION_LAYERS) -> tuple[dict, dict]:
    """For each layer set (see :func:`activation_layers`): the mean pairwise activation distance per layer for
    each set of embeddings (a DataFrame per layer set, rows "1: down_blocks.2" ..., one column per set of
    embeddings), and the mean IoU of each embedding's top ``top_share`` most active channels (a dict per layer
    set: set of embeddings -> IoU). ``blocked``: NeMo neurons switched off throughout."""
    import pandas as pd

    discrepancy, top_overlap = {}, {}
    for method in layer_sets:
        acts = {name: layer_activations(backend, e, method, timestep=timestep, blocked=blocked)
                for name, e in embeddings.items()}
        frame = pd.DataFrame({name: mean_pairwise_distance(a) for name, a in acts.items()})
        frame.index = [f"{i + 1}: {layer.split('.attentions')[0]}" for i, layer in enumerate(frame.index)]
        discrepancy[method] = frame
        width = next(iter(next(iter(acts.values())).values())).shape[-1]
        k = max(1, int(top_share * width))
        top_overlap[method] = {name: float(np.mean([pairwise_iou(sets)[0] for sets in top_neurons(a, k).values()]))
                               for name, a in acts.items()}
    return discrepancy, top_overlap


def layers_diverging(adv, mem) -> tuple[int, int]:
    """In how many layers the triggers of one image diverge at least as much as different memorized prompts
    (Y_adv >= Y_mem), and of how many layers."""
    adv, mem = np.asarray(adv, dtype=float), np.asarray(mem, dtype=float)
    if adv.shape != mem.shape or adv.size == 0 or not np.isfinite(adv).all() or not np.isfinite(mem).all():
        raise ValueError(f"need two finite per-layer series of one length, got {adv.tolist()} and {mem.tolist()}")
    return int((adv >= mem).sum()), int(adv.size)


def discrepancy_ratio(adv, mem) -> float:
    """Mean over layers of the Y_adv / Y_mem discrepancy ratio (ours: two columns; the paper's: two rows)."""
    return float(np.mean(np.asarray(adv, dtype=float) / np.asarray(mem, dtype=float)))


# --------------------------------------------------------------- chapter 4: which weights the pruning methods pick

def pruning_selections(backend, neurons, embeddings: dict[str, torch.Tensor], sparsity: float = 0.01) -> dict:
    """Run each pruning method with each embedding in place of the prompt: for every set of embeddings, NeMo's
    result (with ``neurons``' statistics and threshold) and Wanda's masks at ``sparsity``, one per embedding."""
    return {name: {"nemo": [nemo.localize(backend, e[None], neurons.statistics, neurons.threshold) for e in group],
                   "wanda": [wanda.pruning_masks(backend, e[None], sparsity=sparsity) for e in group]}
            for name, group in embeddings.items()}


def selection_iou_table(selections: dict):
    """One row per (set, method, layer): the mean pairwise IoU of the selections and the share of pairs where
    both were empty (which count as full agreement)."""
    import pandas as pd

    rows = []
    for name, by_method in selections.items():
        for method, to_sets in (("nemo", lambda r: nemo_sets(r.neurons)), ("wanda", wanda_sets)):
            per_layer = layerwise_iou([to_sets(r) for r in by_method[method]])
            for i, (mean_iou, empty) in enumerate(per_layer.values()):
                rows.append({"set": name, "method": method, "layer": i + 1, "IoU": mean_iou, "both empty": empty})
    return pd.DataFrame(rows)


def cross_method_table(selections: dict):
    """Per set, embedding and transformer block: the IoU of the channels NeMo and Wanda touch (see
    :func:`channels_touched`) and how many each touches."""
    import pandas as pd

    rows = []
    for name, by_method in selections.items():
        for result, masks in zip(by_method["nemo"], by_method["wanda"]):
            for block, (a, b) in channels_touched(result.neurons, masks).items():
                rows.append({"set": name, "block": block, "IoU": iou(a, b), "NeMo channels": len(a),
                             "Wanda rows": len(b)})
    return pd.DataFrame(rows)


def transfer_scores(backend, item, nemo_results: list, embeddings: torch.Tensor, seed: int) -> np.ndarray:
    """Row i, column j: the replication score of embedding j generated with the NeMo neurons found for
    embedding i blocked (seed ``seed``). If memorization were local, every row would stop every column."""
    from dori_utils.evaluation import evaluate_items

    scores = np.zeros((len(nemo_results), len(embeddings)))
    for i, result in enumerate(nemo_results):
        with nemo.block(backend, result.neurons):
            scores[i] = evaluate_items(backend, [seed], embeddings, items=[item] * len(embeddings)).scores[:, 0].numpy()
    return scores


def off_diagonal_stopped_share(scores: np.ndarray, threshold: float) -> float:
    """Share of (i, j != i) pairs whose score is at or under the replication threshold (not a replication)."""
    if scores.shape[0] != scores.shape[1] or len(scores) < 2:
        raise ValueError(f"need a square matrix of at least 2 x 2, got {scores.shape}")
    return float((scores[~np.eye(len(scores), dtype=bool)] <= threshold).mean())


def transfer_summary(scores: np.ndarray, threshold: float) -> dict:
    """What a transfer matrix (see :func:`transfer_scores`) says. The diagonal first: whether each trigger's own
    NeMo selection stops that trigger at all. Transfer is only a test of locality for the rows where it does, so
    ``effective_stopped_share`` is the off-diagonal share stopped over those rows (None where no row stops its
    own trigger); ``stopped_share`` is over every row."""
    scores = np.asarray(scores, dtype=float)
    stopped_share = off_diagonal_stopped_share(scores, threshold)
    if not np.isfinite(scores).all():
        raise ValueError("the transfer scores hold NaN or infinite values: check the generations")
    diagonal = np.diag(scores)
    own = diagonal <= threshold
    off = ~np.eye(len(scores), dtype=bool)
    effective = off & own[:, None]
    return {"diagonal": diagonal.tolist(), "diagonal_min": float(diagonal.min()), "diagonal_max": float(diagonal.max()),
            "n": len(scores), "own_stopped": int(own.sum()),
            "stopped_share": stopped_share,
            "effective_stopped_share": float((scores[effective] <= threshold).mean()) if own.any() else None}
