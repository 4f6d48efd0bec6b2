"""Chapter 4, inconsistent selections: NeMo's base rate of flagging and the claim checks."""
from __future__ import annotations

import numpy as np

from dori_utils import nemo
from dori_utils.backends import Backend


def selection_checks(iou_by_set: dict, transfer: dict, threshold: float, bar: float = 0.6) -> dict[str, bool | None]:
    """Chapter 4: Wanda's selections for triggers of one image overlap less than ``bar`` on average (the paper:
    below 0.6 in most layers); and, where a trigger's own NeMo selection stops it (the diagonal of
    ``analysis.transfer_summary``), that selection stops fewer than half of the other triggers. Where no
    selection stops its own trigger, transfer cannot test locality: ``None``, said in the line."""
    wanda_iou = iou_by_set[("wanda", "Y_adv")]
    checks = {f"Wanda's selections for triggers of one image overlap less than {bar} on average (IoU "
              f"{wanda_iou:.2f})": wanda_iou < bar}
    own, n = transfer["own_stopped"], transfer["n"]
    label = "a trigger's own NeMo selection, where it stops that trigger, stops fewer than half of the others"
    if transfer["effective_stopped_share"] is None:
        checks[f"{label}: not testable, no trigger's own selection stops it (scores {transfer['diagonal_min']:.2f}-"
               f"{transfer['diagonal_max']:.2f}, threshold {threshold})"] = None
    else:
        share = transfer["effective_stopped_share"]
        checks[f"{label} ({own} of {n} stop their own; those stop {share:.0%} of the others)"] = share < 0.5
    return checks


def nemo_flagging_rate(backend: Backend, neurons: nemo.NeuronSearch, prompts: list[str]) -> float:
    """The share of ``prompts`` that NeMo's detection flags as memorized, with ``neurons``' threshold at NeMo's
    timestep: the base rate beside the triggers it flags."""
    if not prompts:
        raise ValueError("nemo_flagging_rate needs at least one prompt")
    embeddings = backend.encode_prompts(prompts)
    return float(np.mean([nemo.detect(backend, e[None], neurons.threshold).memorized for e in embeddings]))
