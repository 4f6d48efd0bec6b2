"""Generate and score: the measurements every chapter repeats (replication score, MR, Wen's detector)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from dori_utils.metrics import best_reference_score, memorization_rate
from dori_utils.sampling import generate_for_embeddings


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


def score_against_all_references(backend, images: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """For unrelated generations: the highest replication score against any memorized item, and which item."""
    per_item = torch.stack([best_reference_score(backend.replication_score, images, item.references)
                            for item in backend.memorized])
    best, index = per_item.max(dim=0)
    return best, [backend.memorized[i].id for i in index.tolist()]
