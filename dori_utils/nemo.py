"""NeMo (Hintersdorf et al., NeurIPS 2024): find the value-projection neurons behind one memorized prompt.

Neurons are output channels of the cross-attention value projections ``attn2.to_v`` in the UNet's down and
mid blocks (SD v1.4: seven layers, 5,760 neurons). The method, as its authors describe it:

1. Statistic: per neuron, |to_v output| averaged over tokens. ``to_v`` sees only the text embedding, so this
   needs no UNet pass. Mean and std over non-memorized prompts give an out-of-distribution z-score.
2. Criterion: the first denoising step's noise difference (predicted noise minus initial noise), over several
   seeds, min-max normalised per sample and channel; memorized prompts give the same pattern for every seed.
   The score is the largest pairwise 3-scale MS-SSIM between seeds; a prompt counts as memorized while it
   exceeds a threshold calibrated as mean + 1 std over non-memorized prompts (NeMo: 0.428 for SD v1.4).
3. Initial selection: {|z| > theta} united with the top-k activations, theta from 5 down by 0.25 to 1 and
   k up by 1, until the criterion falls under the threshold (if it never does, the last score becomes the
   refinement threshold, as in NeMo's code).
4. Refinement: unblock whole layers (mid block first), then single neurons, keeping each change while the
   criterion stays under the threshold.

Our choices: the criterion's timestep is the first timestep of the backend's own sampling schedule (SD v1.4 with
50 DDIM steps: 981; NeMo's code uses 961 through an indexing quirk), guidance 0 (conditional branch only), and
seeds 0..9. The predicted noise comes from the UNet's output through the scheduler's parametrisation: for the
organism's v-prediction at t = 999, where abar is 2e-9, eps - x_T = sqrt(abar) v up to float rounding, a
vanishing but exact multiple of the predicted clean image, which the min-max normalisation rescales; a model
that predicts noise directly would give exactly zero there. On the organism's 32x32 images the MS-SSIM window
shrinks to 7 pixels so that the coarsest scale (8x8) still holds it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dori_utils import hooks
from dori_utils.metrics import local_moments
from dori_utils.noising import predicted_noise
from dori_utils.sampling import initial_noise


def value_layers(unet) -> list[str]:
    """The ``attn2.to_v`` layers NeMo searches: down and mid blocks, in forward order."""
    return hooks.layer_names(unet, "attn2.to_v", blocks=("down_blocks", "mid_block"))


@torch.no_grad()
def value_activations(backend, embeddings: torch.Tensor, layers: list[str] | None = None) -> dict[str, torch.Tensor]:
    """|to_v(embedding)| averaged over tokens: layer -> N x width."""
    layers = layers or value_layers(backend.unet)
    modules = hooks.modules_by_name(backend.unet, layers)
    x = embeddings.to(backend.device, backend.dtype)
    return {name: module(x).abs().mean(dim=1).float().cpu() for name, module in modules.items()}


@dataclass
class ActivationStatistics:
    mean: dict[str, torch.Tensor]
    std: dict[str, torch.Tensor]

    def zscores(self, activations: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: (a - self.mean[n]) / self.std[n].clamp_min(1e-8) for n, a in activations.items()}


def activation_statistics(backend, prompts: list[str], batch_size: int = 256) -> ActivationStatistics:
    """Mean and (unbiased) std of each neuron's activation over non-memorized prompts."""
    chunks = [value_activations(backend, backend.encode_prompts(prompts[i : i + batch_size]))
              for i in range(0, len(prompts), batch_size)]
    stacked = {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]}
    return ActivationStatistics({n: a.mean(0) for n, a in stacked.items()}, {n: a.std(0) for n, a in stacked.items()})


def _ssim_and_cs(x: torch.Tensor, y: torch.Tensor, window: int, sigma: float = 1.5):
    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y, var_x, var_y, cov = local_moments(x, y, window, sigma)
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    ssim = ((2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)) * cs
    return ssim.flatten(1).mean(1), cs.flatten(1).mean(1)


def ms_ssim(x: torch.Tensor, y: torch.Tensor, betas=(1 / 3, 1 / 3, 1 / 3)) -> torch.Tensor:
    """Multi-scale SSIM of N x C x H x W tensors in [0, 1] (three scales, equal weights, as NeMo).

    Negative contrast terms are clipped at 0 (as torchmetrics' ``normalize="relu"``) so that fractional
    powers stay defined. The Gaussian window is 11 pixels, or less where the coarsest scale is smaller.
    """
    coarsest = min(x.shape[-2:]) // 2 ** (len(betas) - 1)
    window = min(11, coarsest - 1 if coarsest % 2 == 0 else coarsest)
    result = torch.ones(len(x), dtype=x.dtype, device=x.device)
    for scale, beta in enumerate(betas):
        ssim, cs = _ssim_and_cs(x, y, window)
        last = scale == len(betas) - 1
        result = result * (ssim if last else cs).clamp_min(0) ** beta
        if not last:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return result


@torch.no_grad()
def noise_differences(backend, embedding: torch.Tensor, seeds=range(10), timestep: int | None = None) -> torch.Tensor:
    """Predicted minus initial noise at the first sampling step, min-max normalised per sample and channel."""
    seeds = list(seeds)
    if timestep is None:
        backend.scheduler.set_timesteps(backend.num_inference_steps)
        timestep = int(backend.scheduler.timesteps[0])
    x = initial_noise(backend, seeds)
    condition = embedding.to(backend.device, backend.dtype).expand(len(seeds), -1, -1)
    t = torch.full((len(seeds),), timestep, dtype=torch.long)
    # float64: at abar = 2e-9 the difference is 5e-5 of x, below float32's resolution of x + difference.
    prediction = backend.unet(x, timestep, condition).sample.double()
    diff = (predicted_noise(backend.scheduler, prediction, x.double(), t) - x.double()).float()
    low = diff.amin(dim=(2, 3), keepdim=True)
    high = diff.amax(dim=(2, 3), keepdim=True)
    return (diff - low) / (high - low).clamp_min(1e-8)


def max_pairwise_ms_ssim(diffs: torch.Tensor) -> float:
    """Largest MS-SSIM between any two seeds' noise differences (NeMo keeps seeds whose max exceeds the threshold)."""
    i, j = torch.triu_indices(len(diffs), len(diffs), offset=1)
    return ms_ssim(diffs[i], diffs[j]).max().item()


def memorization_score(backend, embedding: torch.Tensor, seeds=range(10), blocked: dict | None = None) -> float:
    """NeMo's criterion for one embedding (1 x L x D), optionally with neurons blocked."""
    context = hooks.zero_output_channels(backend.unet, blocked) if blocked else contextlib.nullcontext()
    with context:
        return max_pairwise_ms_ssim(noise_differences(backend, embedding, seeds))


def calibrate_threshold(backend, prompts: list[str], seeds=range(10)) -> tuple[float, torch.Tensor]:
    """Mean + 1 std of the criterion over non-memorized prompts; returns (threshold, their scores)."""
    embeddings = backend.encode_prompts(prompts)
    scores = torch.tensor([memorization_score(backend, e[None], seeds) for e in embeddings])
    return (scores.mean() + scores.std()).item(), scores


@dataclass
class NemoResult:
    neurons: dict[str, list[int]]  # refined selection: layer -> channel indices
    initial_neurons: dict[str, list[int]]
    unblocked_score: float
    initial_score: float
    refined_score: float
    threshold: float
    evaluations: int
    memorized: bool  # whether the criterion flagged the embedding at all
    trace: list[tuple[str, float]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.neurons.values())


def localize(backend, embedding: torch.Tensor, statistics: ActivationStatistics, threshold: float,
             seeds=range(10), theta_start: float = 5.0, theta_min: float = 1.0, theta_step: float = 0.25,
             progress: bool = False) -> NemoResult:
    """Run NeMo's initial selection and refinement for one embedding (1 x L x D)."""
    seeds = list(seeds)
    activations = value_activations(backend, embedding)
    z = statistics.zscores(activations)
    evaluations = 0
    trace = []

    def score(blocked):
        nonlocal evaluations
        evaluations += 1
        return memorization_score(backend, embedding, seeds, blocked)

    unblocked = score(None)
    if unblocked <= threshold:
        empty = {name: [] for name in activations}
        return NemoResult(empty, empty, unblocked, unblocked, unblocked, threshold, evaluations, False)

    theta, k = theta_start, 0
    while True:
        selected = {}
        for name, act in activations.items():
            chosen = set(torch.nonzero(z[name][0].abs() > theta).flatten().tolist())
            chosen |= set(torch.topk(act[0], min(k, act.shape[1])).indices.tolist()) if k else set()
            selected[name] = sorted(chosen)
        initial_score = score(selected)
        trace.append((f"theta={theta:.2f}, k={k}", initial_score))
        if initial_score < threshold:
            refine_threshold = threshold
            break
        if theta - theta_step < theta_min - 1e-9:
            refine_threshold = initial_score  # never got under: keep what blocking achieved (NeMo's code)
            break
        theta, k = theta - theta_step, k + 1
    initial = {n: list(v) for n, v in selected.items()}

    layers = list(selected)
    for name in reversed(layers):
        if not selected[name]:
            continue
        trial = {**selected, name: []}
        if score(trial) <= refine_threshold:
            selected = trial
    candidates = [(name, neuron) for name in reversed(layers) for neuron in selected[name]]
    for name, neuron in tqdm(candidates, desc="NeMo refinement", disable=not progress):
        trial = {**selected, name: [n for n in selected[name] if n != neuron]}
        if score(trial) <= refine_threshold:
            selected = trial
    refined_score = score(selected)
    return NemoResult(selected, initial, unblocked, initial_score, refined_score, threshold, evaluations, True, trace)


def block(backend, neurons: dict[str, list[int]]):
    """Context manager: the given neurons are deactivated (both guidance branches) while it is open."""
    return hooks.zero_output_channels(backend.unet, neurons)


def union(selections: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    """Neurons selected for any of several prompts (to mitigate them all at once)."""
    names = {n for s in selections for n in s}
    return {n: sorted({i for s in selections for i in s.get(n, [])}) for n in names}


def per_item_blocking(backend, selections: list):
    """A ``row_context`` (see ``sampling``) for per-prompt mitigation of several prompts in one batch: every batch
    row blocks the neurons found for the item it belongs to. ``selections``: one ``NemoResult`` or
    ``{layer: [channel, ...]}`` per item."""
    neuron_sets = [s.neurons if isinstance(s, NemoResult) else s for s in selections]
    modules = hooks.modules_by_name(backend.unet, value_layers(backend.unet))
    keep = {}
    for name, module in modules.items():
        mask = torch.ones(len(neuron_sets), module.out_features)
        for i, neurons in enumerate(neuron_sets):
            mask[i, list(neurons.get(name, []))] = 0
        if not mask.all():
            keep[name] = mask
    return lambda rows: hooks.scale_output_channels(backend.unet, {name: m[rows] for name, m in keep.items()})


def zscore_order(statistics: ActivationStatistics, activations: dict[str, torch.Tensor]) -> list[tuple[str, int]]:
    """All value neurons, most out-of-distribution first (|z| for one embedding)."""
    z = statistics.zscores(activations)
    ranked = [(abs(z[name][0, c].item()), name, c) for name in z for c in range(z[name].shape[1])]
    return [(name, c) for _, name, c in sorted(ranked, reverse=True)]


def neurons_needed(backend, items, statistics: ActivationStatistics, seeds=(0, 1)) -> list[tuple[int, dict[str, list[int]]]]:
    """Per memorized item, the smallest k such that blocking its k most out-of-distribution neurons stops its
    replication (median score over ``seeds`` under the threshold), by bisection over k; all items are searched
    side by side, one batch per bisection step.

    A direct check of locality: how much of the value layers has to go before the image stops coming back.
    Returns (k, the blocked neurons) per item; k = 0 if the prompt does not replicate at all, k = all neurons if
    even that does not stop it.
    """
    from dori_utils.evaluation import evaluate_items
    from dori_utils.metrics import memorization_rate

    embeddings = backend.encode_prompts([item.prompt for item in items])
    orders = [zscore_order(statistics, value_activations(backend, e[None])) for e in embeddings]
    total = len(orders[0])

    def first(i, k):
        chosen: dict[str, list[int]] = {}
        for name, c in orders[i][:k]:
            chosen.setdefault(name, []).append(c)
        return chosen

    def replicates(indices, ks):
        result = evaluate_items(backend, list(seeds), embeddings[indices], items=[items[i] for i in indices],
                                row_context=per_item_blocking(backend, [first(i, k) for i, k in zip(indices, ks)]))
        return [memorization_rate(row[None], backend.replication_threshold) > 0 for row in result.scores]

    everyone = list(range(len(items)))
    low, high = [0] * len(items), [total] * len(items)
    unblocked = replicates(everyone, low)
    fully_blocked = replicates(everyone, high)
    for i in everyone:
        if not unblocked[i]:
            high[i] = 0
        elif fully_blocked[i]:
            low[i] = total
    while active := [i for i in everyone if high[i] - low[i] > 1]:
        middle = [(low[i] + high[i]) // 2 for i in active]
        for i, k, still in zip(active, middle, replicates(active, middle)):
            low[i], high[i] = (k, high[i]) if still else (low[i], k)
    return [(high[i], first(i, high[i])) for i in everyone]


def cross_item_blocking(backend, items, selections: list[dict[str, list[int]]], seeds=(0,)) -> torch.Tensor:
    """Does one prompt's selection also stop the others? ``scores[i, j]``: median replication score of item j's
    prompt while item i's neurons are blocked (one batch for all pairs). Items with the same selection share
    their row: when every item needs all neurons blocked, that is one row to generate instead of n."""
    from dori_utils.evaluation import evaluate_items

    n = len(items)
    embeddings = backend.encode_prompts([item.prompt for item in items])
    keys = [tuple(sorted((name, tuple(sorted(c))) for name, c in selection.items() if c)) for selection in selections]
    distinct = list(dict.fromkeys(keys))
    representative = [selections[keys.index(key)] for key in distinct]
    pairs = [(u, j) for u in range(len(distinct)) for j in range(n)]
    result = evaluate_items(backend, list(seeds), embeddings[[j for _, j in pairs]], items=[items[j] for _, j in pairs],
                            row_context=per_item_blocking(backend, [representative[u] for u, _ in pairs]))
    scores = result.scores.median(dim=1).values.view(len(distinct), n)
    return scores[[distinct.index(key) for key in keys]]


def backend_statistics(backend, n_statistics: int = 3000, seed: int = 0) -> ActivationStatistics:
    """Activation statistics over up to ``n_statistics`` of ``backend.prompt_sets["statistics"]``, drawn with ``seed``."""
    import numpy as np

    pool = backend.prompt_sets["statistics"]
    prompts = np.random.default_rng(seed).choice(pool, min(n_statistics, len(pool)), replace=False)
    return activation_statistics(backend, list(prompts))


def mitigate_items(backend, items, n_statistics: int = 3000, n_calibration: int = 100, seed: int = 0, progress: bool = False):
    """NeMo end to end for several memorized items: statistics, threshold, then one localisation per item.

    Statistics come from ``backend_statistics(backend, n_statistics, seed)`` and the threshold from
    ``n_calibration`` of ``backend.prompt_sets["nonmemorized"]``, drawn with ``seed + 1``.
    Returns (statistics, threshold, [NemoResult per item]).
    """
    import numpy as np

    statistics = backend_statistics(backend, n_statistics, seed)
    pool = backend.prompt_sets["nonmemorized"]
    calibration = np.random.default_rng(seed + 1).choice(pool, min(n_calibration, len(pool)), replace=False)
    threshold, _ = calibrate_threshold(backend, list(calibration))
    if not items:
        return statistics, threshold, []
    embeddings = backend.encode_prompts([item.prompt for item in items])
    localized = [localize(backend, e[None], statistics, threshold)
                 for e in tqdm(embeddings, desc="NeMo localisation", disable=not progress)]
    return statistics, threshold, localized


def cache_key(backend, items, n_statistics: int = 3000, n_calibration: int = 100) -> dict:
    """What a ``mitigate_items`` run depends on: the model's weights, the items and the calibration sizes."""
    return {"model": backend.info["fingerprint"], "items": [item.id for item in items],
            "n_statistics": n_statistics, "n_calibration": n_calibration}


def mitigate_items_cached(backend, items, path, n_statistics: int = 3000, n_calibration: int = 100,
                          progress: bool = False):
    """``mitigate_items``, stored in ``path`` under ``cache_key``: chapters that ask for the same run share one
    file, and a different run replaces it instead of being mistaken for it."""
    from dori_utils import results

    return results.cached(path, cache_key(backend, items, n_statistics, n_calibration),
                          lambda: mitigate_items(backend, items, n_statistics, n_calibration, progress=progress))
