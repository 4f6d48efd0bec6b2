"""Chapter 1, pruning and the attack: NeMo and Wanda on the memorized items, the Dori attack after each, the
controls, and the chapter's tables and claim checks (the contrast organism's section is ``contrast``)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch

from dori_utils import attack, nemo, wanda
from dori_utils.attack import AttackResult
from dori_utils.backends import Backend
from dori_utils.evaluation import ItemEvaluation, evaluate_items
from dori_utils.metrics import median_score, memorization_rate


def wanda_setting(sparsity: float) -> str:
    """The name a Wanda pruning goes by in the tables and the results ("Wanda 1%"), as the paper's table names it."""
    return f"Wanda {sparsity:.0%}"


def pruning_settings(sparsities: list[float]) -> list[str]:
    """The rows of chapter 1's table, in the paper's order: the baselines, the controls (the paper's, then the
    never-seen images it does not have), then each pruning without and with the attack."""
    prunings = ["NeMo", *(wanda_setting(s) for s in sparsities)]
    return ["memorized prompts", *(f"{control}{suffix}" for control in CONTROL_SETTINGS for suffix in ("", " + Dori")),
            *(f"{name}{suffix}" for name in prunings for suffix in ("", " + Dori"))]


@dataclass
class PrunedAttack:
    """One pruning and the Dori attack on it: the memorized prompts generated under the pruning, the attack run
    under it from those prompts, and what the embeddings it found generate under it."""

    name: str  # the setting, as the paper's table names it ("NeMo", "Wanda 1%")
    items: list
    pruned: ItemEvaluation
    attack: AttackResult
    attacked: ItemEvaluation
    # how the pruning is applied: one context for every prompt (Wanda's masks; opened afresh on each call) or a
    # row context that gives each item its own neurons (NeMo)
    context: Callable[[], contextlib.AbstractContextManager] | None = None
    row_context: Callable | None = None
    zeroed_share: float | None = None  # Wanda: the share of the pruned layers' weights set to zero

    def under_pruning(self) -> dict:
        """``evaluate_items``' keywords that generate under this pruning."""
        return {"context": self.context()} if self.context is not None else {"row_context": self.row_context}

    def evaluations(self) -> dict[str, ItemEvaluation]:
        """The two rows of the table this run fills: the pruning alone, and the pruning attacked."""
        return {self.name: self.pruned, f"{self.name} + Dori": self.attacked}


def _first_references(items) -> torch.Tensor:
    return torch.cat([item.references[:1] for item in items])


CONTROL_SETTINGS = {"non-memorized prompts": "images seen once in training", "never-seen images": "never-seen images"}


def non_memorized_controls(backend: Backend, seeds: list[int], n: int, steps: int = 50,
                           seed: int = 1) -> dict[str, ItemEvaluation]:
    """The attack's controls, each generated from its caption and then attacked with the memorized items' budget
    (the attack should not paint them): ``n`` images the model saw in training without memorizing them
    (``backend.seen_once_items``: the paper's "non-memorized prompts", LAION images SD saw), and ``n`` images it
    never saw (``backend.never_seen_items``). A kind the backend does not have is left out."""
    rows = {}
    for setting, controls in (("non-memorized prompts", backend.seen_once_items()[:n]),
                              ("never-seen images", backend.never_seen_items()[:n])):
        if not controls:
            continue
        captions = backend.encode_prompts([control.prompt for control in controls])
        found = attack.dori_attack(backend, _first_references(controls), captions, steps=steps, seed=seed)
        rows[setting] = evaluate_items(backend, seeds, captions, items=controls)
        rows[f"{setting} + Dori"] = evaluate_items(backend, seeds, found.embeddings, items=controls)
    return rows


def nemo_attack(backend: Backend, items, neurons: nemo.NeuronSearch, seeds: list[int], steps: int = 50,
                snapshot_steps: tuple[int, ...] = (), seed: int = 0) -> PrunedAttack:
    """NeMo as it is meant to be used, every prompt under its own neurons, and the attack on that model."""
    return blocked_attack(backend, items, "NeMo", neurons.per_item, seeds, steps, snapshot_steps, seed)


def blocked_attack(backend: Backend, items, name: str, selections: list, seeds: list[int], steps: int = 50,
                   snapshot_steps: tuple[int, ...] = (), seed: int = 0) -> PrunedAttack:
    """Every prompt under its own blocked value neurons (``selections``: one ``NemoResult`` or ``{layer:
    [channel, ...]}`` per item), and the attack on that model; all prompts go through one batch
    (``nemo.per_item_blocking``)."""
    blocking = nemo.per_item_blocking(backend, selections)
    prompts = backend.encode_prompts([item.prompt for item in items])
    pruned = evaluate_items(backend, seeds, prompts, items=items, row_context=blocking)
    found = attack.dori_attack(backend, _first_references(items), prompts, steps=steps,
                               snapshot_steps=snapshot_steps, seed=seed, row_context=blocking)
    attacked = evaluate_items(backend, seeds, found.embeddings, items=items, row_context=blocking)
    return PrunedAttack(name, list(items), pruned, found, attacked, row_context=blocking)


def wanda_attacks(backend: Backend, items, sparsities: list[float], seeds: list[int], steps: int = 50,
                  snapshot_steps: tuple[int, ...] = (), seed: int = 2,
                  union_steps: int | None = None) -> dict[float, PrunedAttack]:
    """Wanda's one mask for all memorized prompts at each sparsity (one pass over the prompts for all of them,
    scoring the first ``union_steps`` denoising steps, by default Chavhan et al.'s first fifth of the trajectory),
    and the attack on each pruned model."""
    prompts = backend.encode_prompts([item.prompt for item in items])
    runs = {}
    masks_by_sparsity = wanda.pruning_masks(backend, prompts, sparsity=list(sparsities), union_steps=union_steps)
    for sparsity, masks in masks_by_sparsity.items():
        with wanda.prune(backend, masks):
            pruned = evaluate_items(backend, seeds, prompts, items=items)
            found = attack.dori_attack(backend, _first_references(items), prompts, steps=steps,
                                       snapshot_steps=snapshot_steps, seed=seed)
            attacked = evaluate_items(backend, seeds, found.embeddings, items=items)
        runs[sparsity] = PrunedAttack(wanda_setting(sparsity), list(items), pruned, found, attacked,
                                      context=lambda masks=masks: wanda.prune(backend, masks),
                                      zeroed_share=wanda.pruned_share(masks))
    return runs


def mr_by_attack_step(backend: Backend, run: PrunedAttack, steps: tuple[int, ...], seed: int) -> list[float]:
    """MR of the attack's embeddings after each of ``steps`` attack steps, under the run's pruning, judged on one
    seed: the first of the run's evaluation seeds (``seed``), whose generations at the start and at the last
    step are reused; the snapshots between are generated."""
    last = len(run.attack.losses)
    scores = {0: run.pruned.scores[:, :1], last: run.attacked.scores[:, :1]}
    missing = [step for step in steps if step not in scores and step not in run.attack.snapshots]
    if missing:
        raise ValueError(f"The attack kept no snapshot after steps {missing}; "
                         f"run it with snapshot_steps={tuple(steps)}")
    for step in steps:
        if step not in scores:
            scores[step] = evaluate_items(backend, [seed], run.attack.snapshots[step], items=run.items,
                                          **run.under_pruning()).scores
    return [memorization_rate(scores[step], backend.replication_threshold) for step in steps]


def nemo_items(items, neurons: nemo.NeuronSearch, pruned: ItemEvaluation | None = None) -> list[dict]:
    """Per item, what NeMo found: whether detection flagged it, its scores, the neurons it selected, and whether
    its own blocking test passed at NeMo's threshold or only at the relaxed one (NeMo's fallback: when no θ level
    gets under the threshold, the last score becomes the refinement threshold). With ``pruned`` (the items
    generated under their own neurons), beside it the median replication score and whether the image is hidden."""
    rows = []
    for i, (item, found) in enumerate(zip(items, neurons.per_item)):
        flagged = found.memorized
        row = {"item": item.id, "flagged": flagged, "detection score": found.unblocked_score,
               "seeds kept": len(found.kept_seeds),
               "neurons (initial)": sum(map(len, found.initial_neurons.values())),
               "neurons (refined)": found.count, "blocking score": found.refined_score if flagged else None,
               "refinement threshold": found.refinement_threshold if flagged else None,
               "NeMo's test passed": flagged and found.refined_score <= neurons.threshold}
        if pruned is not None:
            score = median_score(pruned.scores[i : i + 1]).item()
            row.update({"median score under NeMo": score, "hidden": score <= pruned.threshold})
        rows.append(row)
    return rows


def nemo_items_table(rows: list[dict]) -> pd.DataFrame:
    """:func:`nemo_items` as the chapter shows it, narrow enough for the page: per item, the neurons NeMo kept,
    its blocking score against the threshold it was held to, whether its own test passed, and whether the image
    is hidden."""
    columns = {"item": "item", "neurons (refined)": "neurons", "blocking score": "blocking score",
               "refinement threshold": "refinement threshold", "NeMo's test passed": "test passed",
               "median score under NeMo": "score under NeMo", "hidden": "hidden"}
    frame = pd.DataFrame(rows)
    return frame[[c for c in columns if c in frame.columns]].rename(columns=columns)


def nemo_hidden_counts(rows: list[dict]) -> dict:
    """From :func:`nemo_items` rows made with the pruned evaluation: how many items NeMo's own test passed for, how
    many images are hidden, and for how many both hold."""
    return {"n_hidden": sum(row["hidden"] for row in rows), "n_passed": sum(row["NeMo's test passed"] for row in rows),
            "n_passed_and_hidden": sum(row["hidden"] and row["NeMo's test passed"] for row in rows)}


def nemo_summary(items, neurons: nemo.NeuronSearch) -> dict:
    """What chapter 1's text says about NeMo's selections: how many items it flags, how many neurons it picks,
    and whether blocking them gets the first-step prediction under the threshold (NaN where nothing is flagged)."""
    flagged = [(item, found) for item, found in zip(items, neurons.per_item) if found.memorized]
    counts = [found.count for _, found in flagged]
    under = [item.id for item, found in flagged if found.refined_score <= neurons.threshold]
    over = [found.refined_score for _, found in flagged if found.refined_score > neurons.threshold]
    union = nemo.union([found.neurons for found in neurons.per_item])
    nan = float("nan")
    return {"n_items": len(items), "n_flagged": len(flagged),
            "not_flagged": ", ".join(item.id for item, found in zip(items, neurons.per_item) if not found.memorized)
            or "none",
            "value_neurons": neurons.n_value_neurons, "threshold": neurons.threshold,
            "neurons_min": min(counts, default=0), "neurons_max": max(counts, default=0),
            "share_min": min(counts, default=0) / neurons.n_value_neurons,
            "share_max": max(counts, default=0) / neurons.n_value_neurons,
            "n_under_threshold": len(under), "under_threshold": ", ".join(under) or "none",
            "n_over_threshold": len(over), "over_threshold_min": min(over, default=nan),
            "over_threshold_max": max(over, default=nan),
            "union_neurons": sum(len(channels) for channels in union.values())}


def describe_nemo(backend: Backend, neurons: nemo.NeuronSearch) -> str:
    """NeMo's threshold and timestep here beside its settings on SD v1.4, and the neurons it searches."""
    from dori_utils.book import paper

    return (f"NeMo: threshold {neurons.threshold:.3f} (NeMo on SD v1.4: {paper.number('nemo.threshold').value}), "
            f"timestep {nemo.detection_timestep(backend)} (SD v1.4: {paper.number('nemo.timestep').value:.0f}), "
            f"{neurons.n_value_neurons} value neurons in {len(neurons.statistics.mean)} layers")


def displacement_summary(runs: list[PrunedAttack], between_prompts: torch.Tensor) -> dict:
    """How far each attack moved its embeddings (median ||y_adv - y_0||), beside the median distance between two
    ordinary prompts, and the ratio of the two. Keys: ``<name>_median`` and ``<name>_ratio`` per run, the name in
    lower case ("nemo", "wanda"), and ``between_prompts_median``."""
    between = between_prompts.median().item()
    summary = {}
    for run in runs:
        key = run.name.split()[0].lower()
        if f"{key}_median" in summary:
            raise ValueError(f"Two runs of {run.name.split()[0]}: pass one run per method")
        moved = run.attack.displacement.median().item()
        summary.update({f"{key}_median": moved, f"{key}_ratio": moved / between})
    return {**summary, "between_prompts_median": between}


def utility_under_pruning(backend: Backend, prompts: list[str], neurons: nemo.NeuronSearch,
                          wanda_runs) -> dict[str, float]:
    """The backend's utility measure on ``prompts`` (one generation each, seed 0): unmitigated, with the union of
    every item's NeMo neurons blocked (NeMo blocks one prompt's neurons at a time, so this is what they do to
    everything else), and under each of ``wanda_runs``' masks (global by design)."""
    from dori_utils.sampling import generate_for_prompts

    if backend.utility is None:
        raise ValueError(f"The {backend.name} backend has no utility measure.")
    union = nemo.union([found.neurons for found in neurons.per_item])
    prunings = {"unmitigated": contextlib.nullcontext,
                "NeMo (union of all items' neurons)": lambda: nemo.block(backend, union),
                **{run.name: run.context for run in wanda_runs}}
    utility = {}
    for name, pruning in prunings.items():
        with pruning(), torch.no_grad():
            images = generate_for_prompts(backend, prompts, [0]).images
        utility[name] = backend.utility(images, prompts)
    return utility


def pruning_claim_checks(recorded: dict, sparsity: float) -> dict[str, bool | None]:
    """The paper's first claim, part by part, on chapter 1's recorded summaries (keyed by setting): each pruning
    lowers MR, and the attack raises it again; and, for each control that ran, the attack does not make its images
    replicate (the paper: MR 0.00 for images SD saw without memorizing them)."""
    mr = {setting: summary["mr"] for setting, summary in recorded.items()
          if isinstance(summary, dict) and "mr" in summary}
    wanda_name = wanda_setting(sparsity)
    checks = {}
    for pruning in ("NeMo", wanda_name):
        lowers = mr[pruning] < mr["memorized prompts"]
        checks[f"{pruning} lowers MR ({mr['memorized prompts']:.1f} -> {mr[pruning]:.1f})"] = lowers
        # recovery only means something where the pruning hid something
        recovery = (f"Dori recovers after {pruning} (MR {mr[f'{pruning} + Dori']:.1f})" if lowers
                    else f"Dori recovers after {pruning}: not testable, {pruning} did not lower MR")
        checks[recovery] = mr[f"{pruning} + Dori"] > mr[pruning] if lowers else None
    for control, label in CONTROL_SETTINGS.items():
        if f"{control} + Dori" in mr:
            attacked = mr[f"{control} + Dori"]
            checks[f"the attack does not bring back {label} (MR {attacked:.2f} after the attack, at most 0.25; "
                   f"the paper: 0.00)"] = attacked <= 0.25
    return checks
