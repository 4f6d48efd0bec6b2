"""Chapter 0, the model and its memorization: the controls, the utility measure, the locality test and the
chapter's claim checks."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from dori_utils import nemo
from dori_utils.backends import Backend
from dori_utils.book.shared import sample_prompt_sets


def control_generations(backend: Backend, sizes: list[int], seed: int = 0, progress: bool = True):
    """Chapter 0's control sets, prompts that memorize nothing: the backend's ``control_sets`` (label -> prompt
    set, in order; the organism: held-out scene captions, unseen natural captions; SD: non-memorized LAION
    prompts), the i-th drawn to ``sizes[i]`` prompts, each generated with seed 0. Returns (label -> prompts,
    label -> samples); the first set calibrates the threshold."""
    from dori_utils.sampling import generate_for_prompts

    sets = list(backend.control_sets.items())[: len(sizes)]
    if not sets:
        raise ValueError(f"The {backend.name} backend names no control prompt sets (Backend.control_sets).")
    drawn = sample_prompt_sets(backend, {name: n for (_, name), n in zip(sets, sizes)}, seed)
    prompts = {label: drawn[name] for label, name in sets}
    return prompts, {label: generate_for_prompts(backend, p, [0], progress=progress) for label, p in prompts.items()}


def training_pair_counts(samples) -> pd.DataFrame:
    """How many training pairs of each kind, and how many distinct captions among them."""
    counts = pd.Series([s.kind for s in samples]).value_counts().rename("pairs").to_frame()
    counts["distinct captions"] = [len({s.caption for s in samples if s.kind == kind}) for kind in counts.index]
    return counts


def utility_table(backend: Backend, prompts: list[str], generated: torch.Tensor) -> pd.DataFrame:
    """The backend's utility measure, part by part, on generations for ``prompts``; beside it, where the backend
    can draw what a prompt depicts, the same measure on those drawings (it validates the measure itself)."""
    if backend.utility_parts is None:
        raise ValueError(f"The {backend.name} backend has no utility measure to break down.")
    columns = {}
    if backend.draw_prompts is not None:
        columns["real scenes (checker validation)"] = backend.utility_parts(backend.draw_prompts(prompts), prompts)
    columns["generated from held-out captions"] = backend.utility_parts(generated, prompts)
    return pd.DataFrame(columns)


def seen_caption_utility(backend: Backend, n: int, seed: int = 4) -> tuple[float, int]:
    """The utility on ``n`` ordinary scenes seen in training, each captioned in full (does the model compose, or
    only recall?), and n."""
    from dori_utils.sampling import generate_for_prompts

    # a sample's item is its scene's full caption: where training captions leave out part of the scene, the checker
    # still needs every attribute named
    seen = sorted({s.item for s in backend.training_samples() if s.kind == "ordinary"})
    prompts = list(np.random.default_rng(seed).choice(seen, min(n, len(seen)), replace=False))
    return backend.utility(generate_for_prompts(backend, prompts, [0]).images, prompts), len(prompts)


def memorization_checks(mr: float, margin: float, heldout: str, aucs: dict[str, float],
                        attribute_accuracy: float | None = None) -> dict[str, bool]:
    """Chapter 0: is this a model that memorizes the way the paper's does? The memorized prompts replicate (MR at
    least 0.9), nothing else does (``margin``: the threshold minus the highest score of any other generation),
    Wen's detector separates them from each control (AUC at least 0.95, as on SD), and, where the backend measures
    it, held-out captions keep their attributes (at least 0.7)."""
    checks = {f"MR of memorized prompts >= 0.9 ({mr:.1f})": mr >= 0.9,
              f"no generation of {heldout} or of another memorized caption reaches the threshold (margin "
              f"{margin:.2f})": margin > 0,
              **{f"Wen AUC >= 0.95 vs {label} ({auc:.2f})": auc >= 0.95 for label, auc in aucs.items()}}
    if attribute_accuracy is not None:
        checks[f"attribute accuracy on held-out captions >= 0.7 ({attribute_accuracy:.2f})"] = attribute_accuracy >= 0.7
    return checks


def first_sampling_step(backend: Backend) -> tuple[int, float]:
    """The sampler's first timestep and the share of a training image's signal that survives there
    (sqrt of alpha-bar): sampling starts from pure noise, so this should be about zero."""
    backend.scheduler.set_timesteps(backend.num_inference_steps)
    first = int(backend.scheduler.timesteps[0])
    return first, backend.scheduler.alphas_cumprod[first].sqrt().item()


@dataclass
class LocalityTest:
    """Blocking value neurons in z-score order until each memorized photograph stops coming back."""

    item_ids: list[str]
    needed: list[int]  # neurons blocked before the item stopped replicating (n_value: never; 0: never replicated)
    nemo_counts: list[int]  # the size of NeMo's own selection, per item
    transfer: torch.Tensor  # [i, j]: item j's score with item i's needed neurons blocked
    n_value: int
    utility: dict[str, float]  # on held-out prompts, unblocked and with one item's neurons blocked
    threshold: float

    def table(self) -> pd.DataFrame:
        n = len(self.item_ids)
        stopped = [sum(int(self.transfer[i, j] <= self.threshold) for j in range(n) if j != i) for i in range(n)]
        return pd.DataFrame({"item": self.item_ids, "NeMo's selection": self.nemo_counts,
                             "neurons to block": self.needed,
                             "share of value neurons": [k / self.n_value for k in self.needed],
                             "other memorized prompts stopped": stopped})

    def summary(self) -> dict:
        replicating = [k for k in self.needed if k > 0]
        shares = [k / self.n_value for k in replicating]
        return {"neurons_needed": dict(zip(self.item_ids, self.needed)), "value_neurons": self.n_value,
                "transfer_scores": self.transfer.tolist(), "attribute_accuracy": self.utility,
                "replicating": len(replicating), "stopped": sum(k < self.n_value for k in replicating),
                "median_share": float(np.median(shares)) if shares else None,
                # over the items NeMo selected any neurons for (an item it does not flag gets none)
                "nemo_min": min((n for n in self.nemo_counts if n), default=0), "nemo_max": max(self.nemo_counts)}

    def checks(self) -> dict[str, bool]:
        summary = self.summary()
        replicating = [k for k in self.needed if k > 0]
        # Only "a few" is a claim: blocking every value neuron leaves no text path, so "blocking stops it" alone
        # could not fail.
        shares = [k / self.n_value for k in replicating]
        return {f"a few neurons (under 10% of the value neurons) stop each replicating photograph (z-order "
                f"shares {min(shares, default=float('nan')):.0%}-{max(shares, default=float('nan')):.0%}, "
                f"{summary['stopped']} of {summary['replicating']} stopped)":
                    bool(shares) and all(share < 0.1 for share in shares)}


def locality_test(backend: Backend, neurons: nemo.NeuronSearch, prompts: list[str], unblocked: torch.Tensor,
                  seeds=(0,), per_item: int = 8) -> LocalityTest:
    """The bluntest test of locality: per memorized item, the fewest value neurons (in z-score order) whose
    blocking stops its replication; whether that blocking stops the other items too; and what it costs ordinary
    prompts (``per_item`` of ``prompts`` generated under each item's blocking, beside ``unblocked``, their
    unblocked generations; needs a utility measure)."""
    from dori_utils.sampling import generate

    items = backend.memorized
    needed = nemo.neurons_needed(backend, items, neurons.statistics, seeds=seeds)
    blocked = [selection for _, selection in needed]
    transfer = nemo.cross_item_blocking(backend, items, blocked, seeds=seeds)
    utility = {}
    if backend.utility is not None:
        per_item = min(per_item, len(prompts) // len(items))
        if per_item == 0:
            raise ValueError(f"locality_test needs at least one held-out prompt per memorized item ({len(items)}), "
                             f"got {len(prompts)}")
        owner = torch.arange(len(items)).repeat_interleave(per_item)
        blocking = nemo.per_item_blocking(backend, blocked)
        damaged = generate(backend, backend.encode_prompts(prompts[: len(owner)]), [0] * len(owner),
                           row_context=lambda rows: blocking(owner[rows])).images
        utility = {"unblocked": backend.utility(unblocked[: len(owner)], prompts[: len(owner)]),
                   "one item's neurons blocked": backend.utility(damaged, prompts[: len(owner)])}
    return LocalityTest([item.id for item in items], [k for k, _ in needed], [r.count for r in neurons.per_item],
                        transfer, neurons.n_value_neurons, utility, backend.replication_threshold)
