"""Chapter 1's contrast: the Dori attack on an organism whose memorization is local by construction.

``organism-local`` was trained with example-tied dropout on the cross-attention values: each memorized item kept a
few designated ``attn2.to_v`` channels of its own on, and ordinary pairs trained with every such channel off. Its
designated channels are the ground truth of where memorization was put. Blocking them, dropping every memorization
channel, and NeMo's own selection are three prunings; the attack runs after each, as chapter 1 runs it after NeMo
on the shipped organism. If the attack fails where the ground truth was removed, it discriminates between local and
non-local memorization; if it succeeds, the image is retained beyond the channels training confined it to.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dori_utils.backends import Backend
from dori_utils.evaluation import ItemEvaluation, evaluate_items
from dori_utils.book.chapter1 import PrunedAttack, blocked_attack, mr_by_attack_step
from dori_utils.book.shared import SharedConfig, nemo_neurons
from dori_utils.organism.backend import designated_channels, memorization_channels

DESIGNATED = "designated channels blocked"
DROPPED = "memorization channels dropped"
NEMO = "NeMo"
# MR at or under which a pruning hides the images, and the attack fails: the bar of chapter 1's controls
HIDDEN_BAR = 0.25
# NeMo finds the ground truth when it recovers at least this share of an item's designated channels (median)
RECALL_BAR = 0.5


@dataclass
class LocalContrast:
    """The contrast organism unmitigated, each pruning with the attack after it, MR against attack steps, and
    NeMo's selection held against the designated channels."""

    unmitigated: ItemEvaluation
    runs: dict[str, PrunedAttack]  # DESIGNATED, DROPPED, NEMO
    curves: dict[str, list[float]]
    nemo_channels: list[dict]  # per item: see channel_recovery

    def summary(self) -> dict:
        """What the chapter records and quotes."""
        recovered = [row for row in self.nemo_channels if row["selected"]]
        return {"n_items": len(self.unmitigated.ids), "n_seeds": self.unmitigated.scores.shape[1],
                "attack_steps": len(next(iter(self.runs.values())).attack.losses),
                "items": ", ".join(self.unmitigated.ids),
                "unmitigated": self.unmitigated.summary(),
                **{name: {"pruned": run.pruned.summary(), "attacked": run.attacked.summary()}
                   for name, run in self.runs.items()},
                "designated_per_item": int(np.median([row["designated"] for row in self.nemo_channels])),
                "nemo": {"n_flagged": sum(row["flagged"] for row in self.nemo_channels),
                         "selected_median": float(np.median([row["selected"] for row in self.nemo_channels])),
                         "precision_median": _median([row["precision"] for row in recovered]),
                         "recall_median": _median([row["recall"] for row in self.nemo_channels]),
                         "in_memorization_median": _median([row["in memorization channels"] for row in recovered])},
                "curves": self.curves}


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else math.nan


def channel_recovery(selected: dict[str, list[int]], designated: dict[str, list[int]],
                     memorization: dict[str, list[int]]) -> dict:
    """One item's selected value neurons against its designated ones: how many of each, how many of the designated
    were selected, precision (the share of the selection that is designated; NaN for an empty selection), recall
    (the share of the designated that was selected) and the share of the selection in any memorization channel."""
    def pairs(channels):
        return {(layer, int(c)) for layer, cs in channels.items() for c in cs}

    chosen, truth, reserved = pairs(selected), pairs(designated), pairs(memorization)
    found = len(chosen & truth)
    return {"selected": len(chosen), "designated": len(truth), "found": found,
            "precision": found / len(chosen) if chosen else math.nan,
            "recall": found / len(truth) if truth else math.nan,
            "in memorization channels": len(chosen & reserved) / len(chosen) if chosen else math.nan}


def local_contrast(local: Backend, config: SharedConfig, items, seeds: list[int], steps: int,
                   curve_steps: tuple[int, ...], progress: bool = False) -> LocalContrast:
    """Chapter 1's section on ``local`` (``load_backend("organism-local")``): the items unmitigated, then under
    each of three prunings (each item's designated channels; every memorization channel; NeMo's own neurons,
    found as chapter 1 finds them), each attacked for ``steps`` steps from the prompt, with MR after each of
    ``curve_steps`` judged on the first seed, and NeMo's selections held against the designated channels."""
    designated, memorization = designated_channels(local), memorization_channels(local)
    unmitigated = evaluate_items(local, seeds, items=items)
    neurons = nemo_neurons(local, config, items, progress=progress)
    selections = {DESIGNATED: [designated[item.id] for item in items],
                  DROPPED: [memorization] * len(items),
                  NEMO: neurons.per_item}
    runs = {name: blocked_attack(local, items, name, chosen, seeds, steps, curve_steps)
            for name, chosen in selections.items()}
    curves = {name: mr_by_attack_step(local, run, curve_steps, seeds[0]) for name, run in runs.items()}
    nemo_channels = [{"item": item.id, "flagged": found.memorized,
                      **channel_recovery(found.neurons, designated[item.id], memorization)}
                     for item, found in zip(items, neurons.per_item)]
    return LocalContrast(unmitigated, runs, curves, nemo_channels)


def contrast_table(summary: dict, shipped: dict, shipped_name: str) -> pd.DataFrame:
    """One row per pruning: MR under it and after the attack, on the contrast organism, with NeMo on the model
    chapter 1 studies (``shipped``: its recorded summaries of "NeMo" and "NeMo + Dori") as the last row."""
    rows = [{"model": "local organism", "pruning": "none", "MR": summary["unmitigated"]["mr"], "MR after Dori": None}]
    rows += [{"model": "local organism", "pruning": name, "MR": summary[name]["pruned"]["mr"],
              "MR after Dori": summary[name]["attacked"]["mr"]} for name in (DESIGNATED, DROPPED, NEMO)]
    rows.append({"model": shipped_name, "pruning": NEMO, "MR": shipped["NeMo"]["mr"],
                 "MR after Dori": shipped["NeMo + Dori"]["mr"]})
    return pd.DataFrame(rows)


def contrast_checks(summary: dict) -> dict[str, bool | None]:
    """What the contrast shows, each line in the direction that would make the attack a test of locality: the
    ground truth, once removed, hides the images, and the attack then fails; and NeMo finds the ground truth.
    An attack after a pruning that hid nothing tests nothing (n/a)."""
    checks = {}
    before = summary["unmitigated"]["mr"]
    for name, what in ((DESIGNATED, "blocking each item's designated channels"),
                       (DROPPED, "dropping every memorization channel")):
        pruned, attacked = summary[name]["pruned"]["mr"], summary[name]["attacked"]["mr"]
        hides = pruned <= HIDDEN_BAR and pruned < before  # an image that did not replicate cannot be hidden
        checks[f"{what} hides the images (MR {before:.1f} -> {pruned:.1f}: lower, and at most {HIDDEN_BAR})"] = hides
        if hides:
            checks[f"after {what}, the attack fails (MR {attacked:.1f} after it, at most {HIDDEN_BAR})"] = \
                attacked <= HIDDEN_BAR
        else:
            checks[f"after {what}, the attack fails: not testable, the images were not hidden"] = None
    recall = summary["nemo"]["recall_median"]
    checks[f"NeMo finds the designated channels (median recall {recall:.2f}, at least {RECALL_BAR})"] = \
        recall >= RECALL_BAR
    return checks


def describe_contrast(summary: dict, shipped: dict, shipped_name: str) -> str:
    """The section's reading of its own numbers: which of the three outcomes the contrast had, and what that
    outcome means for the paper's argument."""
    designated = summary[DESIGNATED]
    before, pruned, attacked = summary["unmitigated"]["mr"], designated["pruned"]["mr"], designated["attacked"]["mr"]
    steps = summary["attack_steps"]
    shipped_line = (f"On `{shipped_name}`, the model above, the same attack after NeMo takes MR from "
                    f"{shipped['NeMo']['mr']:.2f} to {shipped['NeMo + Dori']['mr']:.2f}.")
    if before <= HIDDEN_BAR:
        return (f"**The contrast organism does not replicate these items** (MR {before:.2f} unmitigated), so there is "
                f"nothing for a pruning to hide and the contrast cannot be read. {shipped_line}")
    if pruned > HIDDEN_BAR:
        return (f"**Training did not confine memorization here.** With each item's designated channels blocked, MR is "
                f"still {pruned:.2f}: the images live in the always-on channels too, so this organism is not local and "
                f"cannot answer the converse question. {shipped_line}")
    if attacked <= HIDDEN_BAR:
        return (f"**The attack discriminates.** Blocking the designated channels hides the images (MR {pruned:.2f}), "
                f"and {steps} attack steps do not bring them back (MR {attacked:.2f}). {shipped_line} So the attack does "
                f"not paint whatever it is aimed at: where it succeeds, the pruned model still holds the image, "
                f"which is the paper's evidence that pruning did not remove it.")
    return (f"**Even memorization confined by training is retained elsewhere.** Blocking the designated channels "
            f"hides the images (MR {pruned:.2f}), and the attack brings them back (MR {attacked:.2f}). "
            f"{shipped_line} Memorization Sinks assume that removing the sink channels removes the memorized "
            f"content; here the rest of the model still holds it. For the paper's argument this cuts both ways: the "
            f"attack's success shows that a pruned model can still produce the image (what a mitigation must "
            f"prevent), but not by itself that memorization was spread out before pruning.")
