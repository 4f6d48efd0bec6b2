"""NeMo (Hintersdorf et al., NeurIPS 2024): find the value-projection neurons behind one memorized prompt.

Neurons are output channels of the cross-attention value projections ``attn2.to_v`` in the UNet's down and
mid blocks (SD v1.4: seven layers, 5,760 neurons). The method follows its authors' code
(``3_detect_memorized_neurons.py`` and ``utils/activation_detection.py`` at commit f952ede):

1. Statistic: per neuron, |to_v output| averaged over tokens. ``to_v`` sees only the text embedding, so this
   needs no UNet pass. Mean and std over non-memorized prompts give an out-of-distribution z-score. On SD v1.4
   the default is NeMo's published statistics over 50,000 LAION prompts (:func:`published_statistics`).
2. Detection: one UNet call on 10 seeds' initial noise; the noise difference (predicted minus initial noise),
   min-max normalised per sample and channel; each seed's largest 3-scale MS-SSIM with another seed. The seeds
   above the threshold are *kept*; none kept means "not memorized". The threshold is mean + 1 std of the
   pairwise MS-SSIM values over non-memorized prompts (NeMo: 0.428 for SD v1.4).
3. Blocking test: MS-SSIM between the unblocked and the blocked model's noise differences of the same seed,
   the largest over the kept seeds; blocking works when it is at most the threshold.
4. Initial selection: {|z| > theta} united with the top-k activations, theta from 5 down by 0.25 and k up by 1,
   until the blocking test passes; the loop stops before theta reaches 1 (at most 16 selections) and, if it
   never passed, its last score becomes the refinement threshold.
5. Refinement: unblock whole layers (last layer first), then single neurons, dropping each one whose
   unblocking keeps the blocking score under the threshold.

Where the book adapts it:

- The timestep (:func:`detection_timestep`). NeMo's code evaluates SD v1.4 at t = 961 (an indexing quirk: the
  second timestep of its 50-step schedule, applied to the initial noise), where abar is 0.0073. Each backend is
  evaluated at the timestep of its own schedule with the same abar: 961 on SD, 944 on the organism, whose first
  sampling step (t = 999, abar 2e-9) leaves no contrast between seeds.
- Seeds 0..9, each with its own generator (NeMo draws the ten noises from one ``torch.manual_seed(1)``).
- The predicted noise comes from the UNet's output through the scheduler's parametrisation (the organism
  predicts v); on the organism's 32x32 images the MS-SSIM window shrinks to 7 pixels so that the coarsest
  scale (8x8) still holds it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dori_utils import hooks
from dori_utils.metrics import local_moments, median_score
from dori_utils.noising import predicted_noise
from dori_utils.sampling import initial_noise

NEMO_SD_TIMESTEP = 961  # where NeMo's code evaluates SD v1.4's first-step noise difference
NEMO_THRESHOLD_SD_V1_4 = 0.428  # NeMo's published threshold (README: mean + 1 std over non-memorized prompts)
NEMO_STATISTICS_URL = (
    "https://raw.githubusercontent.com/ml-research/localizing_memorization_in_diffusion_models/f952ede/"
    "statistics/statistics_additional_laion_prompts_v1_4.pt"
)
NEMO_STATISTICS_SHA256 = "42072d31334d50ce0d981f58865ab2ab378303c51e779c39f8505b681b0d1d9b"


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


def sd_alpha_bar(timestep: int) -> float:
    """SD v1.x's cumulative signal share abar(t) (scaled-linear betas from 0.00085 to 0.012, 1,000 steps)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)[timestep].item()


def detection_timestep(backend) -> int:
    """The timestep at which NeMo's criterion is evaluated: the one of the backend's own schedule whose signal
    share abar is closest to SD v1.4's at t = 961 (0.0073), where NeMo's code evaluates it.

    SD v1.4: 961. The organism (cosine schedule): 944. Its first sampling step, t = 999, holds no signal
    (abar 2e-9), so every seed's prediction there is the caption's mean image and the criterion has no contrast.
    """
    alpha_bar = backend.scheduler.alphas_cumprod.double()
    return int((alpha_bar - sd_alpha_bar(NEMO_SD_TIMESTEP)).abs().argmin())


@torch.no_grad()
def noise_differences(backend, embedding: torch.Tensor, seeds=range(10), timestep: int | None = None) -> torch.Tensor:
    """Predicted minus initial noise after one UNet call at ``timestep`` (default: ``detection_timestep``),
    min-max normalised per sample and channel: seeds x C x H x W."""
    seeds = list(seeds)
    if not torch.isfinite(embedding).all():
        raise ValueError("the embedding holds NaN or infinite values; NeMo's test would call it 'not memorized'")
    timestep = detection_timestep(backend) if timestep is None else int(timestep)
    x = initial_noise(backend, seeds)
    condition = embedding.to(backend.device, backend.dtype).expand(len(seeds), -1, -1)
    t = torch.full((len(seeds),), timestep, dtype=torch.long)
    # float64: near abar = 0 the difference is a tiny fraction of x, below float32's resolution of x + difference.
    prediction = backend.unet(x, timestep, condition).sample.double()
    if not torch.isfinite(prediction).all():
        raise FloatingPointError("the UNet's prediction holds NaN or infinite values: its weights, or an edit "
                                 "applied to them, are broken")
    diff = (predicted_noise(backend.scheduler, prediction, x.double(), t) - x.double()).float()
    low = diff.amin(dim=(2, 3), keepdim=True)
    high = diff.amax(dim=(2, 3), keepdim=True)
    return (diff - low) / (high - low).clamp_min(1e-8)


def pairwise_ms_ssim(diffs: torch.Tensor) -> torch.Tensor:
    """MS-SSIM of every pair of seeds' noise differences (45 values for 10 seeds)."""
    i, j = torch.triu_indices(len(diffs), len(diffs), offset=1)
    return ms_ssim(diffs[i], diffs[j])


def max_ms_ssim_per_seed(diffs: torch.Tensor) -> torch.Tensor:
    """Each seed's largest MS-SSIM with any other seed (NeMo's ``calculate_max_pairwise_ssim``)."""
    n = len(diffs)
    i, j = torch.triu_indices(n, n, offset=1)
    similarity = torch.full((n, n), float("-inf"))
    values = pairwise_ms_ssim(diffs).cpu()
    similarity[i, j] = values
    similarity[j, i] = values
    return similarity.max(dim=1).values


@dataclass
class Detection:
    """NeMo's memorization check of one embedding, and what its blocking test compares against."""
    seeds: list[int]
    per_seed: torch.Tensor  # each seed's largest MS-SSIM with another seed's noise difference
    kept: list[int]  # seeds whose value exceeds the threshold: the blocking test looks at these only
    diffs: torch.Tensor  # the kept seeds' unblocked noise differences
    timestep: int

    @property
    def memorized(self) -> bool:
        return bool(self.kept)

    @property
    def score(self) -> float:
        return self.per_seed.max().item()


def detect(backend, embedding: torch.Tensor, threshold: float, seeds=range(10), timestep: int | None = None) -> Detection:
    """Is this embedding (1 x L x D) memorized by NeMo's criterion? Keeps the seeds whose noise difference
    resembles another seed's above ``threshold``; none kept means not memorized."""
    seeds = list(seeds)
    if len(seeds) < 2:
        raise ValueError(f"NeMo's detection compares seeds with each other: give at least two seeds, got {seeds}")
    timestep = detection_timestep(backend) if timestep is None else int(timestep)
    diffs = noise_differences(backend, embedding, seeds, timestep)
    per_seed = max_ms_ssim_per_seed(diffs)
    kept = [s for s, value in zip(seeds, per_seed.tolist()) if value > threshold]
    return Detection(seeds, per_seed, kept, diffs[per_seed > threshold], timestep)


def blocking_score(backend, embedding: torch.Tensor, detection: Detection, blocked: dict[str, list[int]]) -> float:
    """NeMo's blocking test: how similar the blocked model's noise difference stays to the unblocked one,
    MS-SSIM(unblocked_i, blocked_i), the largest over the seeds that detection kept. Blocking works when it
    falls under the threshold.

    This asks whether blocking *changes* the first-step prediction, not whether the seeds still agree with each
    other: a blocking that moves every seed's prediction to the same new pattern passes it."""
    if not detection.kept:
        raise ValueError("detection kept no seed: the embedding is not memorized, so there is nothing to block")
    if not any(len(channels) for channels in blocked.values()):
        return 1.0  # nothing blocked: the prediction is the unblocked one
    with hooks.zero_output_channels(backend.unet, blocked):
        blocked_diffs = noise_differences(backend, embedding, detection.kept, detection.timestep)
    return ms_ssim(detection.diffs, blocked_diffs).max().item()


def calibrate_threshold(backend, prompts: list[str] | torch.Tensor, seeds=range(10),
                        timestep: int | None = None) -> tuple[float, torch.Tensor]:
    """NeMo's threshold: mean + 1 std of the pairwise MS-SSIM values (every pair of seeds, every prompt) over
    non-memorized prompts (or their N x L x D embeddings). Returns (threshold, prompts x pairs values)."""
    if len(prompts) == 0:
        raise ValueError("calibrate_threshold needs at least one non-memorized prompt")
    embeddings = prompts if isinstance(prompts, torch.Tensor) else backend.encode_prompts(prompts)
    values = torch.stack([pairwise_ms_ssim(noise_differences(backend, e[None], seeds, timestep)).cpu()
                          for e in embeddings])
    return (values.mean() + values.std()).item(), values


def detection_by_timestep(backend, memorized: torch.Tensor, ordinary: torch.Tensor, calibration: torch.Tensor,
                          timesteps, seeds=range(10), progress: bool = False) -> list[dict]:
    """How well NeMo's detection separates memorized from ordinary embeddings (N x L x D each) at each timestep:
    the threshold calibrated there on ``calibration``, the share of each set that detection flags, and the AUC
    of the detection score (the largest seed-to-seed MS-SSIM)."""
    from dori_utils.metrics import roc_auc

    def scores(embeddings, t):
        return torch.stack([max_ms_ssim_per_seed(noise_differences(backend, e[None], seeds, t)).max() for e in embeddings])

    rows = []
    for t in tqdm([int(t) for t in timesteps], desc="NeMo detection by timestep", disable=not progress):
        threshold, _ = calibrate_threshold(backend, calibration, seeds, t)
        on_memorized, on_ordinary = scores(memorized, t), scores(ordinary, t)
        rows.append({"timestep": t, "alpha_bar": backend.scheduler.alphas_cumprod[t].item(), "threshold": threshold,
                     "memorized flagged": (on_memorized > threshold).float().mean().item(),
                     "ordinary flagged": (on_ordinary > threshold).float().mean().item(),
                     "AUC": roc_auc(on_memorized, on_ordinary)})
    return rows


@dataclass
class NemoResult:
    neurons: dict[str, list[int]]  # refined selection: layer -> channel indices
    initial_neurons: dict[str, list[int]]
    unblocked_score: float  # detection: the largest seed-to-seed MS-SSIM
    initial_score: float  # blocking test after the initial selection
    refined_score: float  # blocking test after refinement
    threshold: float
    refinement_threshold: float  # the threshold, or the last initial score if the selection never got under it
    evaluations: int  # UNet calls for blocking tests
    memorized: bool  # whether detection flagged the embedding at all
    kept_seeds: list[int] = field(default_factory=list)
    timestep: int | None = None
    trace: list[tuple[str, float]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.neurons.values())


def localize(backend, embedding: torch.Tensor, statistics: ActivationStatistics, threshold: float,
             seeds=range(10), timestep: int | None = None, theta_start: float = 5.0, theta_min: float = 1.0,
             theta_step: float = 0.25, progress: bool = False) -> NemoResult:
    """NeMo's initial selection and refinement for one embedding (1 x L x D), as in its authors' code.

    Initial selection: {|z| > theta} united with the top-k activations per layer, theta from ``theta_start`` down
    by ``theta_step`` and k up by 1, until the blocking score is at most the threshold; the loop stops before
    theta reaches ``theta_min`` (5 to 1.25: at most 16 selections), and if it never got under, its last score
    becomes the refinement threshold. Refinement: unblock whole layers (last layer first), then single neurons
    (last layer first), dropping each one whose unblocking keeps the score under the refinement threshold.
    """
    detection = detect(backend, embedding, threshold, seeds, timestep)
    activations = value_activations(backend, embedding)
    if not detection.memorized:
        empty = {name: [] for name in activations}
        score = detection.score
        return NemoResult(empty, empty, score, score, score, threshold, threshold, 0, False, [], detection.timestep)

    z = statistics.zscores(activations)
    evaluations = 0
    trace = []

    def score(blocked):
        nonlocal evaluations
        evaluations += any(len(v) for v in blocked.values())
        return blocking_score(backend, embedding, detection, blocked)

    theta, k = theta_start, 0
    while True:
        selected = {}
        for name, act in activations.items():
            chosen = set(torch.nonzero(z[name][0].abs() > theta).flatten().tolist())
            chosen |= set(torch.topk(act[0], min(k, act.shape[1])).indices.tolist()) if k else set()
            selected[name] = sorted(chosen)
        initial_score = score(selected)
        trace.append((f"theta={theta:.2f}, k={k}", initial_score))
        if initial_score <= threshold:
            refinement_threshold = threshold
            break
        theta, k = theta - theta_step, k + 1
        if theta <= theta_min + 1e-9:
            refinement_threshold = initial_score  # never got under: keep what blocking achieved (NeMo's code)
            break
    initial = {n: list(v) for n, v in selected.items()}

    layers = list(selected)
    for name in reversed(layers):
        if not selected[name]:
            continue
        trial = {**selected, name: []}
        if score(trial) < refinement_threshold:
            selected = trial
    candidates = [(name, neuron) for name in reversed(layers) for neuron in selected[name]]
    for name, neuron in tqdm(candidates, desc="NeMo refinement", disable=not progress):
        trial = {**selected, name: [n for n in selected[name] if n != neuron]}
        if score(trial) < refinement_threshold:
            selected = trial
    refined_score = score(selected)
    return NemoResult(selected, initial, detection.score, initial_score, refined_score, threshold,
                      refinement_threshold, evaluations, True, detection.kept, detection.timestep, trace)


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
    scores = median_score(result.scores).view(len(distinct), n)
    return scores[[distinct.index(key) for key in keys]]


def backend_statistics(backend, n_statistics: int = 3000, seed: int = 0) -> ActivationStatistics:
    """Activation statistics over up to ``n_statistics`` of ``backend.prompt_sets["statistics"]``, drawn with ``seed``."""
    import numpy as np

    pool = backend.prompt_sets["statistics"]
    if not pool:
        raise ValueError("the backend has no non-memorized prompts for NeMo's statistics (prompt_sets['statistics'])")
    prompts = np.random.default_rng(seed).choice(pool, min(n_statistics, len(pool)), replace=False)
    return activation_statistics(backend, list(prompts))


def published_statistics(backend, path_or_url: str = NEMO_STATISTICS_URL, cache_dir=None) -> ActivationStatistics:
    """NeMo's activation statistics for SD v1.4 over 50,000 LAION prompts (``statistics/
    statistics_additional_laion_prompts_v1_4.pt``: a tuple of 7 means and 7 stds, in NeMo's layer order, which
    is ours), downloaded once and checked against its SHA-256; a local copy's path works too."""
    from dori_utils import data

    url = str(path_or_url).startswith(("http://", "https://"))
    path = data.fetch_file(str(path_or_url), cache_dir, NEMO_STATISTICS_SHA256) if url else Path(path_or_url)
    if not path.is_file():
        raise FileNotFoundError(f"No NeMo statistics file {path}; leave path_or_url out to download NeMo's.")
    try:
        means, stds = torch.load(path, map_location="cpu")
    except Exception as error:
        raise ValueError(f"{path} is not a NeMo statistics file (a torch file holding (means, stds)): {error}") from None
    layers = value_layers(backend.unet)
    modules = hooks.modules_by_name(backend.unet, layers)
    widths = [modules[n].out_features for n in layers]
    if [len(m) for m in means] != widths or [len(v) for v in stds] != widths:
        raise ValueError(f"{path} holds statistics for layers of widths {[len(m) for m in means]}, but this UNet's "
                         f"value layers have {widths}: NeMo's file is for SD v1.4 only; recompute the statistics "
                         "(statistics='recompute') for another model.")
    return ActivationStatistics({n: m.float() for n, m in zip(layers, means)}, {n: v.float() for n, v in zip(layers, stds)})


STATISTICS_SOURCES = ("published", "recompute")


def default_statistics_source(backend) -> str:
    """NeMo's published statistics and threshold on SD v1.4, where they exist and fit (a model with SD v1.4's
    shapes); recomputed elsewhere, e.g. on the tiny SD pipelines of the tests."""
    fits = tuple(backend.embedding_shape) == (77, 768) and tuple(backend.latent_shape) == (4, 64, 64)
    return "published" if backend.name == "sd-v1-4" and fits else "recompute"


class NeuronSearch(NamedTuple):
    """NeMo's result for several items: the statistics and threshold it used, and one localisation per item.
    It unpacks as ``statistics, threshold, per_item = search``."""

    statistics: ActivationStatistics
    threshold: float
    per_item: list

    @property
    def n_value_neurons(self) -> int:
        """How many value neurons NeMo searched (all channels of its layers)."""
        return sum(len(mean) for mean in self.statistics.mean.values())


def find_neurons(backend, items, n_statistics: int = 3000, n_calibration: int = 100, seed: int = 0,
                 statistics: str | None = None, timestep: int | None = None, progress: bool = False) -> NeuronSearch:
    """NeMo end to end for several memorized items: statistics, threshold, then one localisation per item.

    ``statistics="published"``: NeMo's statistics file and threshold 0.428 (a model of SD v1.4's shapes only;
    the default there).
    ``statistics="recompute"`` (the default elsewhere): statistics from ``backend_statistics(backend,
    n_statistics, seed)`` and the threshold from ``n_calibration`` of ``backend.prompt_sets["nonmemorized"]``,
    drawn with ``seed + 1``. ``timestep``: see :func:`detection_timestep`.
    """
    import numpy as np

    source = statistics or default_statistics_source(backend)
    if source not in STATISTICS_SOURCES:
        raise ValueError(f"statistics must be one of {STATISTICS_SOURCES}, got {source!r}")
    if source == "published":
        activation_stats, threshold = published_statistics(backend), NEMO_THRESHOLD_SD_V1_4
    else:
        activation_stats = backend_statistics(backend, n_statistics, seed)
        pool = backend.prompt_sets["nonmemorized"]
        calibration = np.random.default_rng(seed + 1).choice(pool, min(n_calibration, len(pool)), replace=False)
        threshold, _ = calibrate_threshold(backend, list(calibration), timestep=timestep)
    if not items:
        return NeuronSearch(activation_stats, threshold, [])
    embeddings = backend.encode_prompts([item.prompt for item in items])
    localized = [localize(backend, e[None], activation_stats, threshold, timestep=timestep)
                 for e in tqdm(embeddings, desc="NeMo localisation", disable=not progress)]
    return NeuronSearch(activation_stats, threshold, localized)


def cache_key(backend, items, n_statistics: int = 3000, n_calibration: int = 100, statistics: str | None = None,
              timestep: int | None = None, seed: int = 0) -> dict:
    """What a ``find_neurons`` run depends on: the model's weights, the items, the statistics, the timestep and
    the seed that draws the statistics and calibration prompts."""
    source = statistics or default_statistics_source(backend)
    sizes = {"n_statistics": n_statistics, "n_calibration": n_calibration, "seed": seed} if source == "recompute" else {}
    # float32 runs keep the keys they had before the dtype could be chosen
    dtype = {"dtype": str(backend.dtype)} if backend.dtype != torch.float32 else {}
    return {"method": "nemo-f952ede", "model": backend.fingerprint, **dtype, "items": [item.id for item in items],
            "statistics": source, **sizes,
            "timestep": detection_timestep(backend) if timestep is None else int(timestep)}
