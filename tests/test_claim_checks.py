"""Every claim check can print NO: each check function on a constructed result that goes against the paper, and on
one that goes with it (issue 32, item 7). Chapters 1 and 5 have theirs in their own helper tests."""
import numpy as np
import pandas as pd
import pytest

from dori_utils import analysis
from dori_utils.book import chapter0, chapter2, chapter3, chapter4, paper


def _lines(checks, capsys):
    paper.print_checks("Claim checks:", checks)
    return capsys.readouterr().out.splitlines()[1:]


def test_memorization_checks_fail_on_a_model_that_does_not_memorize(capsys):
    against = chapter0.memorization_checks(0.5, -0.1, "held-out scene captions", {"ordinary captions": 0.6}, 0.5)
    assert all(line.startswith("NO ") for line in _lines(against, capsys))
    holds = chapter0.memorization_checks(1.0, 0.3, "held-out scene captions", {"ordinary captions": 0.99}, 0.8)
    assert all(holds.values()) and "MR of memorized prompts >= 0.9 (1.0)" in holds
    assert not any("attribute" in claim for claim in chapter0.memorization_checks(1.0, 0.3, "x", {}, None))


def test_the_locality_check_fails_where_many_neurons_are_needed_and_where_nothing_replicates():
    def test(needed):
        return chapter0.LocalityTest(["a", "b"], needed, [5, 5], np.zeros((2, 2)), 100, {}, 0.5)

    assert list(test([5, 9]).checks().values()) == [True]
    assert list(test([5, 40]).checks().values()) == [False]
    assert list(test([100, 100]).checks().values()) == [False]  # blocking everything is no "few neurons"
    assert list(test([0, 0]).checks().values()) == [False]  # nothing replicated: nothing was shown


def test_spread_checks_fail_when_triggers_gather_near_the_prompt():
    def spread(ratio, to_start, to_prompt):
        return {"ratio_to_unrelated": ratio, "median_distances": {"trigger to its start": to_start,
                                                                  "trigger to its memorized prompt": to_prompt}}

    assert list(chapter2.spread_checks(spread(1.8, 5.0, 20.0)).values()) == [True, True]
    assert list(chapter2.spread_checks(spread(0.9, 20.0, 5.0)).values()) == [False, False]
    # as spread as unrelated prompts is not "further apart", which is what the paper reports
    assert list(chapter2.spread_checks(spread(1.0, 5.0, 20.0)).values()) == [False, True]


def test_divergence_checks_need_every_layer_and_show_the_papers_count():
    paper_rows = {"nemo": ([3.0, 3.0], [1.0, 1.0]), "wanda": ([1.0, 3.0], [2.0, 2.0])}
    ours = {"nemo": pd.DataFrame({"Y_adv": [2.0, 0.5], "Y_mem": [1.0, 1.0]}),
            "cross_attention": pd.DataFrame({"Y_adv": [2.0, 2.0], "Y_mem": [1.0, 1.0]}),
            "wanda": pd.DataFrame({"Y_adv": [0.5, 0.5], "Y_mem": [1.0, 1.0]})}
    checks = chapter3.divergence_checks(ours, paper_rows)
    assert list(checks.values()) == [False, True, False]
    claims = list(checks)
    assert "1 of 2 (the paper: 2 of 2)" in claims[0]
    assert "not measured in the paper" in claims[1]
    assert "0 of 2 (the paper: 1 of 2)" in claims[2]


def test_selection_checks_fail_on_consistent_selections_and_say_when_transfer_cannot_test(capsys):
    iou = {("wanda", "Y_adv"): 0.9, ("nemo", "Y_adv"): 0.4}
    transfer = analysis.transfer_summary(np.array([[0.1, 0.2], [0.3, 0.9]]), 0.5)
    assert transfer["own_stopped"] == 1 and transfer["effective_stopped_share"] == 1.0
    assert all(line.startswith("NO ") for line in _lines(chapter4.selection_checks(iou, transfer, 0.5), capsys))
    local = analysis.transfer_summary(np.array([[0.1, 0.9], [0.8, 0.2]]), 0.5)
    assert list(chapter4.selection_checks({("wanda", "Y_adv"): 0.3}, local, 0.5).values()) == [True, True]
    # no trigger's own selection stops it: transfer says nothing about locality, and the line says so
    untestable = analysis.transfer_summary(np.array([[0.8, 0.2], [0.3, 0.9]]), 0.5)
    assert untestable["effective_stopped_share"] is None and untestable["stopped_share"] == 1.0
    lines = _lines(chapter4.selection_checks(iou, untestable, 0.5), capsys)
    assert lines[1].startswith("n/a") and "not testable" in lines[1]


def test_layers_diverging_counts_layers_and_refuses_nan():
    assert analysis.layers_diverging([2.0, 1.0, 3.0], [1.0, 1.0, 4.0]) == (2, 3)
    for adv, mem in (([1.0, float("nan")], [1.0, 1.0]), ([1.0], [1.0, 2.0]), ([], [])):
        with pytest.raises(ValueError, match="finite per-layer series"):
            analysis.layers_diverging(adv, mem)


def test_transfer_summary_refuses_nan_and_non_square_matrices():
    for scores in (np.array([[0.1, float("nan")], [0.2, 0.3]]), np.zeros((2, 3))):
        with pytest.raises(ValueError):
            analysis.transfer_summary(scores, 0.5)
