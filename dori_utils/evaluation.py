"""Generate and score: the measurements every chapter repeats (replication score, MR, Wen's detector)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from dori_utils.metrics import best_reference_score, memorization_rate, roc_auc
from dori_utils.sampling import Samples, generate_for_embeddings


@dataclass
class ItemEvaluation:
    ids: list[str]
    images: torch.Tensor  # items x seeds x 3 x H x W
    scores: torch.Tensor  # items x seeds: replication score against the item's own references
    wen_per_step: torch.Tensor  # items x seeds x steps: the norms behind Wen et al.'s detector
    threshold: float

    @property
    def wen_scores(self) -> torch.Tensor:
        """items x seeds: Wen et al.'s score, the mean over sampling steps."""
        return self.wen_per_step.mean(dim=-1)

    @property
    def mr(self) -> float:
        return memorization_rate(self.scores, self.threshold)

    def summary(self) -> dict:
        """Mean and sd of the replication score over all generations, and MR."""
        return {"score_mean": self.scores.mean().item(), "score_sd": self.scores.std().item(), "mr": self.mr}


def evaluate_items(backend, seeds: list[int], embeddings: torch.Tensor | None = None, items=None,
                   context=None, row_context=None, progress: bool = False, **sampling_kwargs) -> ItemEvaluation:
    """Generate each memorized item from its prompt (or from ``embeddings[i]``) with every seed, and score the
    generations against the item's references.

    ``context`` (e.g. a pruning) is open while sampling; ``row_context`` gives each item its own edit within
    the batch (NeMo blocks different neurons for each prompt: ``nemo.per_item_blocking``); it sees item indices.
    """
    items = items if items is not None else backend.memorized
    check_evaluation_seeds(backend, seeds, items)
    if embeddings is None:
        embeddings = backend.encode_prompts([item.prompt for item in items])
    seeds = list(seeds)
    with context if context is not None else contextlib.nullcontext():
        samples = generate_for_embeddings(backend, embeddings, seeds, row_context=row_context, progress=progress,
                                          **sampling_kwargs)
    images = samples.images.view(len(items), len(seeds), *samples.images.shape[1:])
    scores = torch.stack([best_reference_score(backend.replication_score, images[i], item.references)
                          for i, item in enumerate(items)])
    return ItemEvaluation([item.id for item in items], images, scores,
                          samples.wen_per_step.view(len(items), len(seeds), -1), backend.replication_threshold)


def check_evaluation_seeds(backend, seeds, items) -> None:
    """Where the references are the model's own generations, a seed they were drawn with would score a generation
    against itself (1.0 on the unmitigated model): refuse such seeds."""
    generated = any(item.reference_source == "unmitigated model's generation" for item in items)
    overlap = sorted(set(int(s) for s in seeds) & set(backend.reference_seeds))
    if generated and overlap:
        raise ValueError(f"Evaluation seeds {overlap} are seeds of the references (the model's own generations with "
                         f"seeds {list(backend.reference_seeds)}), so those generations would be scored against "
                         "themselves. Choose seeds outside them (e.g. SEEDS = [10, 11] in the parameters cell).")


def score_against_all_references(backend, images: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """For unrelated generations: the highest replication score against any memorized item, and which item."""
    per_item = torch.stack([best_reference_score(backend.replication_score, images, item.references)
                            for item in backend.memorized])
    best, index = per_item.max(dim=0)
    return best, [backend.memorized[i].id for i in index.tolist()]


@dataclass
class UnrelatedScores:
    """Generations that have nothing to do with a memorized photograph, scored against it: what the replication
    threshold has to sit above."""

    score_sets: dict[str, torch.Tensor]  # label -> scores, the memorized captions' own scores first
    closest_item: dict[str, list[str]]  # control label -> per generation, the photograph it scores highest against
    unrelated_max: float  # the highest score of the other memorized captions and of the first control set


def unrelated_scores(backend, memorized: ItemEvaluation, controls: dict[str, Samples]) -> UnrelatedScores:
    """Score the memorized captions against their own photographs and against the *other* photographs, and each
    control set's generations against the closest memorized photograph. The cross scores and the first control
    set calibrate the threshold; the others are shown beside them (a control that replicates is a finding about
    the model, not a failure of the metric)."""
    if not controls:
        raise ValueError("unrelated_scores needs at least one control set of generations")
    cross = torch.stack([backend.replication_score(memorized.images[j], item.references[:1])
                         for i, item in enumerate(backend.memorized)
                         for j in range(len(backend.memorized)) if j != i]).flatten()
    score_sets = {"memorized caption vs its own photograph": memorized.scores.flatten(),
                  "memorized caption vs the other photographs": cross}
    closest = {}
    for label, samples in controls.items():
        score_sets[f"{label} vs closest photograph"], closest[label] = score_against_all_references(backend, samples.images)
    first_control = score_sets[f"{next(iter(controls))} vs closest photograph"]
    return UnrelatedScores(score_sets, closest, max(cross.max().item(), first_control.max().item()))


def wen_aucs(memorized: ItemEvaluation, controls: dict[str, Samples]) -> dict[str, float]:
    """AUC of Wen et al.'s score (mean over steps, then over seeds) for memorized prompts against each control."""
    positive = memorized.wen_scores.mean(dim=1)
    return {label: roc_auc(positive, samples.wen_scores) for label, samples in controls.items()}


def wen_per_step_aucs(memorized: ItemEvaluation, controls: dict[str, Samples]) -> dict[str, list[float]]:
    """The AUC of each sampling step's norm on its own, against each control."""
    positive = memorized.wen_per_step.mean(dim=1)
    return {label: [roc_auc(positive[:, s], samples.wen_per_step[:, s]) for s in range(positive.shape[1])]
            for label, samples in controls.items()}


def wen_noise_prediction_aucs(backend, memorized: ItemEvaluation, controls: dict[str, Samples]) -> dict[str, float]:
    """Wen et al.'s literal score, the norm on the noise prediction, for a v-predicting model:
    eps_c - eps_empty = sqrt(abar_t) (v_c - v_empty) at each step. Empty for a noise-predicting model, whose
    score already is the literal one."""
    if backend.scheduler.config.prediction_type != "v_prediction":
        return {}
    backend.scheduler.set_timesteps(backend.num_inference_steps)
    to_noise = backend.scheduler.alphas_cumprod[backend.scheduler.timesteps].sqrt()
    positive = (memorized.wen_per_step * to_noise).mean(dim=-1).mean(dim=1)
    return {label: roc_auc(positive, (samples.wen_per_step * to_noise).mean(dim=-1))
            for label, samples in controls.items()}
