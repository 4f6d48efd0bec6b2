"""The paper's numbers, each with where it comes from, and the helpers that set ours beside them.

Every number the chapters compare with is here, once. ``source`` names the table or figure of the ICML version
("Finding DoRI") as ``shared/reference/paper.md`` records it; ``exact`` is False where the value was read from a
plot. SD v1.4 unless the key says otherwise; scores are SSCD (ours: the backend's replication score).
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from dori_utils.book.results import glue_key, glue_named


@dataclass(frozen=True)
class PaperNumber:
    value: float
    sd: float | None = None
    source: str = ""
    exact: bool = True

    def __str__(self) -> str:
        text = f"{self.value:.2f}" if self.sd is None else f"{self.value:.2f} ± {self.sd:.2f}"
        return text if self.exact else f"≈{text}"


_MAIN = "main results table (ICML; exact)"
_FINETUNE = "fine-tuning table (ICML; exact)"
_CURVE = "figure: MR vs DoRI optimization steps (read from a plot)"
_CURVE_STEPS = "figure: MR vs DoRI optimization steps (its x axis; exact)"
_DISCREPANCY = "figure: activation discrepancy per layer (read from a plot)"
_IOU = "figure: IoU of pruned weights per layer (read from a plot)"


def _rows(prefix: str, values: list[float], source: str) -> dict[str, PaperNumber]:
    return {f"{prefix}.{i}": PaperNumber(v, source=source, exact=False) for i, v in enumerate(values)}


NUMBERS: dict[str, PaperNumber] = {
    # (SSCD, MR) pairs of the main table, keyed by the setting name chapters log under
    **{f"{setting}.{kind}": PaperNumber(v, sd if kind == "score" else None, _MAIN)
       for setting, (v_score, sd, v_mr) in {
           "memorized prompts": (0.90, 0.04, 0.98), "non-memorized prompts": (0.17, 0.05, 0.00),
           "non-memorized prompts + Dori": (0.48, 0.06, 0.00), "NeMo": (0.33, 0.18, 0.20),
           "NeMo + Dori": (0.91, 0.03, 0.99), "Wanda 1%": (0.20, 0.08, 0.00), "Wanda 1% + Dori": (0.76, 0.05, 0.72),
           "Wanda 10% + Dori": (0.40, 0.13, 0.01)}.items()
       for kind, v in (("score", v_score), ("mr", v_mr))},
    "Wanda 10% + Dori.concept_accuracy": PaperNumber(0.33, source=_MAIN),
    "non-memorized prompts + Dori, 150 steps.score": PaperNumber(0.65, 0.06, "v2 Appendix H.2, Table 4 (exact)"),
    "sd-v2.NeMo.mr": PaperNumber(0.06, source="paper notes on the ICML version (exact)"),
    "sd-v2.NeMo + Dori.mr": PaperNumber(1.00, source="paper notes on the ICML version (exact)"),
    # fine-tuning table: every method attacked by Dori
    **{f"{setting}.{kind}": PaperNumber(v, sd if kind == "score" else None, _FINETUNE)
       for setting, (v_score, sd, v_mr) in {
           "adversarial fine-tuning + Dori": (0.36, 0.14, 0.02), "ESD + Dori": (0.90, 0.04, 0.98),
           "Concept Ablation + Dori": (0.91, 0.04, 0.97), "SISS + Dori": (0.60, 0.22, 0.39),
           "sd-v2.adversarial fine-tuning + Dori": (0.14, 0.06, 0.06)}.items()
       for kind, v in (("score", v_score), ("mr", v_mr))},
    "sd-v2.fid_before": PaperNumber(14.44, source="paper notes on the ICML version (exact)"),
    "sd-v2.fid_after": PaperNumber(13.61, source="paper notes on the ICML version (exact)"),
    "finetune.epochs": PaperNumber(5, source="Section 4.4"),
    # MR after 0, 1, 10, 25 and 50 attack steps
    **_rows("mr_by_attack_step.NeMo", [0.20, 0.73, 0.79, 0.94, 0.99], _CURVE),
    **_rows("mr_by_attack_step.Wanda 1%", [0.00, 0.02, 0.18, 0.49, 0.73], _CURVE),
    **_rows("mr_by_attack_step.non-memorized", [0.00, 0.00, 0.00, 0.00, 0.02], _CURVE),
    # the attack steps at which that figure reads MR
    **{f"mr_by_attack_step.steps.{i}": PaperNumber(step, source=_CURVE_STEPS)
       for i, step in enumerate([0, 1, 10, 25, 50])},
    # layers 1-7 of each method, for 100 triggers of one image (Y_adv) and 100 memorized prompts (Y_mem)
    **_rows("discrepancy.NeMo.Y_mem", [105, 72, 164, 128, 299, 302, 405], _DISCREPANCY),
    **_rows("discrepancy.NeMo.Y_adv", [153, 110, 224, 184, 397, 409, 517], _DISCREPANCY),
    **_rows("discrepancy.Wanda.Y_mem", [184, 259, 252, 203, 262, 264, 455], _DISCREPANCY),
    **_rows("discrepancy.Wanda.Y_adv", [217, 199, 217, 151, 176, 154, 259], _DISCREPANCY),
    **_rows("iou.NeMo.Y_mem", [0.58, 1.00, 0.81, 0.92, 0.94, 0.98, 0.98], _IOU),
    **_rows("iou.NeMo.Y_adv", [0.57, 1.00, 0.78, 0.90, 0.98, 1.00, 1.00], _IOU),
    **_rows("iou.Wanda.Y_mem", [0.43, 0.65, 0.42, 0.69, 0.38, 0.15, 0.07], _IOU),
    **_rows("iou.Wanda.Y_adv", [0.57, 0.80, 0.58, 0.74, 0.54, 0.34, 0.26], _IOU),
    # NeMo's own settings on SD v1.4 (NeMo's code, commit f952ede)
    "nemo.threshold": PaperNumber(0.428, source="NeMo's code, SD v1.4 (exact)"),
    "nemo.timestep": PaperNumber(961, source="NeMo's code, SD v1.4 (exact)"),
    "wen.auc": PaperNumber(0.99, source="Wen et al.'s notebook, SD v1.4 (exact)"),
    # trigger spread (Section 4): 100 random N(0, I) starts for one image, every one a trigger after 50 steps
    "trigger_spread.random_starts": PaperNumber(100, source="Section 4, t-SNE figure (exact)"),
    "trigger_spread.share": PaperNumber(1.00, source="Section 4, t-SNE figure (exact)"),
}


def number(key: str) -> PaperNumber:
    """One of the paper's numbers; the error lists the keys that exist."""
    try:
        return NUMBERS[key]
    except KeyError:
        raise KeyError(f"The paper has no number {key!r} here; known keys: {sorted(NUMBERS)}") from None


def series(prefix: str) -> list[float]:
    """The values of a per-layer or per-step row, e.g. ``series("iou.Wanda.Y_adv")``."""
    # the rows are entered in order, and dicts keep it
    values = [entry.value for key, entry in NUMBERS.items() if key.rpartition(".")[0] == prefix]
    if not values:
        raise KeyError(f"The paper has no row {prefix!r}")
    return values


def series_table(prefixes: list[str], column: str = "layer"):
    """The paper's per-layer (or per-step) rows as a table, one row per prefix, columns numbered from 1."""
    rows = {prefix: series(prefix) for prefix in prefixes}
    width = max(len(values) for values in rows.values())
    return pd.DataFrame([values + [None] * (width - len(values)) for values in rows.values()], index=list(rows),
                        columns=pd.Index(range(1, width + 1), name=column))


def beside_paper(ours: dict, settings: list[str], sources: dict[str, str] | None = None) -> pd.DataFrame:
    """The table of every chapter: for each setting, our score (mean ± sd) and MR beside the paper's.

    ``ours`` maps a setting to an evaluation summary (``score_mean``, ``score_sd``, ``mr``) or to None (not run
    here); ``sources`` optionally says where each of our rows comes from (a chapter, "paper only").
    """
    rows = []
    for setting in settings:
        summary = ours.get(setting)
        score, mr = NUMBERS.get(f"{setting}.score"), NUMBERS.get(f"{setting}.mr")
        row = {"setting": setting}
        if sources is not None:
            row["source"] = sources.get(setting, "this chapter")
        row.update({"score (ours)": f"{summary['score_mean']:.2f} ± {summary['score_sd']:.2f}" if summary else "n/a",
                    "MR (ours)": f"{summary['mr']:.2f}" if summary else "n/a",
                    "SSCD (paper)": str(score) if score else "", "MR (paper)": str(mr) if mr else ""})
        rows.append(row)
    return pd.DataFrame(rows)


def glue_numbers() -> list[str]:
    """Glue every paper number under ``paper.<key>`` for the chapters' measured text (``{{paper.nemo_dori.mr:.2f}}``)."""
    return glue_named([(glue_key(["paper", *key.split(".")]), entry.value) for key, entry in NUMBERS.items()])


def print_checks(title: str, checks: dict[str, bool | None]) -> None:
    """Every chapter's claim checks, one line each: ``yes`` or ``NO`` and the claim (with its numbers); ``n/a``
    where this run cannot test the claim (the check says why)."""
    if not checks:
        raise ValueError("print_checks needs at least one check")
    print(title)
    for claim, holds in checks.items():
        print(f"{'n/a' if holds is None else 'yes' if holds else 'NO '}  {claim}")