"""Chapter 3, divergent activations: the layer sets' names and the claim checks."""
from __future__ import annotations

LAYER_SET_NAMES = {"nemo": "NeMo's value layers (attn2.to_v outputs)",
                   "cross_attention": "the cross-attention layers (attn2 outputs)",
                   "wanda": "Wanda's layers (ff.net.2 inputs)"}


def divergence_checks(discrepancy: dict, paper_rows: dict) -> dict[str, bool]:
    """Chapter 3, the paper's direction: in every layer, the triggers of one image diverge at least as much as
    different memorized prompts (Y_adv >= Y_mem). ``discrepancy``: layer set -> DataFrame with columns Y_adv and
    Y_mem; ``paper_rows``: layer set -> (Y_adv, Y_mem) series read from the paper's figure, where it has them.
    Each line gives the paper's count beside ours (in Wanda's layers the paper itself has Y_adv below Y_mem in
    most layers)."""
    from dori_utils.analysis import layers_diverging

    checks = {}
    for layers, frame in discrepancy.items():
        ours, n = layers_diverging(frame["Y_adv"], frame["Y_mem"])
        paper_count = ("the paper: {} of {}".format(*layers_diverging(*paper_rows[layers])) if layers in paper_rows
                       else "not measured in the paper")
        checks[f"Y_adv >= Y_mem in each of {LAYER_SET_NAMES.get(layers, layers)}: {ours} of {n} "
               f"({paper_count})"] = ours == n
    return checks
