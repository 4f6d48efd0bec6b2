"""Generate and score: the measurements every chapter repeats (replication score, MR, Wen's detector)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from dori_utils.metrics import best_reference_score, memorization_rate
from dori_utils.sampling import generate


@dataclass
class ItemEvaluation:
    ids: list[str]
    images: torch.Tensor  # items x seeds x 3 x H x W
    scores: torch.Tensor  # items x seeds: replication score against the item's own references
    wen: torch.Tensor  # items x seeds: Wen et al.'s detector
    threshold: float

    @property
    def mr(self) -> float:
        return memorization_rate(self.scores, self.threshold)

    def summary(self) -> dict:
        """Mean and sd of the replication score over all generations, and MR."""
        return {"score_mean": self.scores.mean().item(), "score_sd": self.scores.std().item(), "mr": self.mr}


def evaluate_items(backend, seeds: list[int], embeddings: torch.Tensor | None = None, items=None,
                   context=None, item_context=None, progress: bool = False, **sampling_kwargs) -> ItemEvaluation:
    """Generate each memorized item from its prompt (or from ``embeddings[i]``) with every seed, and score the
    generations against the item's references.

    ``context`` (e.g. a pruning) is open while sampling; ``item_context(i)`` gives a context per item instead
    (NeMo blocks different neurons for each prompt).
    """
    items = items if items is not None else backend.memorized
    if embeddings is None:
        embeddings = backend.encode_prompts([item.prompt for item in items])
    seeds = list(seeds)
    if item_context is None:
        repeated = embeddings.repeat_interleave(len(seeds), dim=0)
        with context if context is not None else contextlib.nullcontext():
            samples = generate(backend, repeated, seeds * len(items), progress=progress, **sampling_kwargs)
        images, wen = samples.images, samples.wen_scores
    else:
        parts = []
        for i in range(len(items)):
            with item_context(i):
                parts.append(generate(backend, embeddings[i : i + 1].expand(len(seeds), -1, -1), seeds, **sampling_kwargs))
        images, wen = torch.cat([p.images for p in parts]), torch.cat([p.wen_scores for p in parts])
    images = images.view(len(items), len(seeds), *images.shape[1:])
    scores = torch.stack([best_reference_score(backend.replication_score, images[i], item.references)
                          for i, item in enumerate(items)])
    return ItemEvaluation([item.id for item in items], images, scores, wen.view(len(items), len(seeds)),
                          backend.replication_threshold)


def score_against_all_references(backend, images: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """For unrelated generations: the highest replication score against any memorized item, and which item."""
    per_item = torch.stack([best_reference_score(backend.replication_score, images, item.references)
                            for item in backend.memorized])
    best, index = per_item.max(dim=0)
    return best, [backend.memorized[i].id for i in index.tolist()]
