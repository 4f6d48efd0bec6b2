"""Chapter 1's contrast organism section (issue 35): the experiment, its table, checks and reading."""
import math

import matplotlib

matplotlib.use("Agg")
import pytest

from dori_utils.book import contrast, shared


def _summary(unmitigated, designated, dropped, recall, shipped=(0.5, 1.0)):
    def run(pruned, attacked):
        return {"pruned": {"mr": pruned}, "attacked": {"mr": attacked}}

    summary = {"unmitigated": {"mr": unmitigated}, contrast.DESIGNATED: run(*designated),
               contrast.DROPPED: run(*dropped), contrast.NEMO: run(0.5, 0.9),
               "nemo": {"recall_median": recall}, "attack_steps": 50}
    chapter1 = {"NeMo": {"mr": shipped[0]}, "NeMo + Dori": {"mr": shipped[1]}}
    return summary, chapter1


def test_channel_recovery_counts_the_designated_channels_a_selection_holds():
    designated = {"a": [4, 5], "b": [6]}
    memorization = {"a": [4, 5, 6, 7], "b": [4, 5, 6, 7]}
    found = contrast.channel_recovery({"a": [1, 4], "b": [6, 7]}, designated, memorization)
    assert (found["selected"], found["designated"], found["found"]) == (4, 3, 2)
    assert found["precision"] == 0.5 and found["recall"] == pytest.approx(2 / 3)
    assert found["in memorization channels"] == 0.75
    nothing = contrast.channel_recovery({}, designated, memorization)
    assert math.isnan(nothing["precision"]) and nothing["recall"] == 0


def test_checks_say_no_when_the_attack_brings_back_what_was_removed_and_na_when_nothing_was_hidden():
    summary, _ = _summary(1.0, (0.1, 0.9), (0.6, 0.9), 0.2)
    lines = list(contrast.contrast_checks(summary).items())
    assert lines[0][1] is True and lines[1][1] is False  # hidden, and the attack brought it back
    assert lines[2][1] is False and lines[3][1] is None  # dropping hid nothing: the attack is not testable
    assert "not testable" in lines[3][0] and lines[4][1] is False
    summary, _ = _summary(1.0, (0.0, 0.1), (0.0, 0.0), 0.8)
    assert all(contrast.contrast_checks(summary).values())
    summary, _ = _summary(0.0, (0.0, 0.0), (0.0, 0.0), 0.8)  # nothing replicated: nothing was hidden
    assert list(contrast.contrast_checks(summary).values())[:4] == [False, None, False, None]


@pytest.mark.parametrize("unmitigated, designated, expected", [
    (1.0, (0.8, 1.0), "did not confine"), (1.0, (0.1, 0.1), "discriminates"), (1.0, (0.1, 0.9), "retained elsewhere"),
    (0.1, (0.0, 0.0), "does not replicate")])
def test_the_reading_follows_the_outcome(unmitigated, designated, expected):
    summary, shipped = _summary(unmitigated, designated, (0.0, 0.0), 0.5)
    assert expected in contrast.describe_contrast(summary, shipped, "shipped organism")


def test_the_table_puts_the_shipped_organism_beside_the_local_one():
    summary, shipped = _summary(1.0, (0.1, 0.9), (0.0, 0.2), 0.5)
    table = contrast.contrast_table(summary, shipped, "shipped organism")
    assert list(table["pruning"]) == ["none", contrast.DESIGNATED, contrast.DROPPED, contrast.NEMO, contrast.NEMO]
    assert table.iloc[-1]["model"] == "shipped organism" and table.iloc[-1]["MR after Dori"] == 1.0


def test_local_contrast_runs_every_pruning_and_the_attack_on_the_tiny_local_organism(tiny_local_backend):
    items = tiny_local_backend.memorized
    found = contrast.local_contrast(tiny_local_backend, shared.shared_config(True), items, [0], 2, (0, 1, 2))
    assert set(found.runs) == {contrast.DESIGNATED, contrast.DROPPED, contrast.NEMO}
    assert all(len(curve) == 3 for curve in found.curves.values())
    summary = found.summary()
    assert summary["n_items"] == len(items) == len(found.nemo_channels)
    assert summary["designated_per_item"] == len(tiny_local_backend.manifest["memorization_channels"]) * 2
    assert set(contrast.contrast_checks(summary)) and contrast.describe_contrast(
        summary, {"NeMo": {"mr": 0.5}, "NeMo + Dori": {"mr": 1.0}}, "organism")
