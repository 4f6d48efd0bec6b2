"""The experiment layer of chapter 1: the prunings, the attack on them, the control and the claim checks."""
import contextlib
import dataclasses
import math
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import pytest
import torch

from dori_utils import nemo
from dori_utils.book import chapter1, paper, plots, shared
from dori_utils.attack import AttackResult
from dori_utils.evaluation import ItemEvaluation


def _evaluation(scores, threshold=0.7, size=4):
    scores = torch.tensor(scores, dtype=torch.float32)
    n, seeds = scores.shape
    return ItemEvaluation([f"item{i}" for i in range(n)], torch.rand(n, seeds, 3, size, size, generator=torch.Generator().manual_seed(0)), scores,
                          torch.zeros(n, seeds, 2), threshold)


def _attack(moved: float, n=3, steps=4, generator=None):
    initial = torch.randn(n, 2, 3, generator=generator)
    direction = torch.randn(n, 2, 3, generator=generator)
    direction = direction / direction.flatten(1).norm(dim=1)[:, None, None]
    return AttackResult(initial + moved * direction, initial, torch.zeros(steps, n))


def _nemo_result(neurons, memorized, refined_score):
    return nemo.NemoResult(neurons, neurons, 0.9, refined_score, refined_score, 0.8, 0.8, 1, memorized, [0, 1])


def _search(results, threshold=0.8):
    statistics = SimpleNamespace(mean={"a": torch.zeros(10), "b": torch.zeros(10)})
    return nemo.NeuronSearch(statistics, threshold, results)


def test_setting_names_follow_the_papers_table():
    assert chapter1.wanda_setting(0.01) == "Wanda 1%" and chapter1.wanda_setting(0.1) == "Wanda 10%"
    settings = chapter1.pruning_settings([0.01, 0.1])
    assert settings[:7] == ["memorized prompts", "non-memorized prompts", "non-memorized prompts + Dori",
                            "never-seen images", "never-seen images + Dori", "NeMo", "NeMo + Dori"]
    assert settings[7:] == ["Wanda 1%", "Wanda 1% + Dori", "Wanda 10%", "Wanda 10% + Dori"]
    # every setting with a paper row finds it; the never-seen control is ours alone
    assert all(f"{s}.mr" in paper.NUMBERS for s in settings if s != "Wanda 10%" and not s.startswith("never"))


def test_pruned_attack_applies_its_pruning_afresh_and_names_its_rows(generator):
    opened = []
    run = chapter1.PrunedAttack("Wanda 1%", [], _evaluation([[0.1]]), _attack(1.0, generator=generator),
                                   _evaluation([[0.9]]), context=lambda: opened.append(1) or contextlib.nullcontext())
    assert set(run.under_pruning()) == {"context"} and set(run.under_pruning()) == {"context"}
    assert len(opened) == 2  # a fresh context manager each time
    assert list(run.evaluations()) == ["Wanda 1%", "Wanda 1% + Dori"]
    per_row = chapter1.PrunedAttack("NeMo", [], run.pruned, run.attack, run.attacked, row_context=print)
    assert per_row.under_pruning() == {"row_context": print}


def test_mr_by_attack_step_reuses_the_first_and_last_generations_and_names_missing_snapshots(generator):
    run = chapter1.PrunedAttack("NeMo", [], _evaluation([[0.1, 0.9], [0.9, 0.1]]),
                                   _attack(1.0, n=2, steps=4, generator=generator),
                                   _evaluation([[0.9, 0.1], [0.9, 0.9]]), row_context=None)
    backend = SimpleNamespace(replication_threshold=0.7)
    # first seed only: step 0 has one item over the threshold, step 4 (the last) both
    assert chapter1.mr_by_attack_step(backend, run, (0, 4), seed=10) == [0.5, 1.0]
    with pytest.raises(ValueError, match=r"steps \[2\]"):
        chapter1.mr_by_attack_step(backend, run, (0, 2, 4), seed=10)


def test_nemo_items_and_summary_count_flagged_prompts_and_the_blocking_test():
    items = [SimpleNamespace(id=name) for name in ("cat", "rocket", "cup")]
    search = _search([_nemo_result({"a": [0, 1, 2], "b": [3]}, True, 0.95),
                      _nemo_result({"a": [], "b": []}, False, 0.9),
                      _nemo_result({"a": [2, 5]}, True, 0.7)])
    rows = chapter1.nemo_items(items, search)
    assert [r["neurons (refined)"] for r in rows] == [4, 0, 2]
    assert [r["NeMo's test passed"] for r in rows] == [False, False, True] and "hidden" not in rows[0]
    # beside NeMo's own test, whether each image is hidden under its neurons (median score at most the threshold)
    pruned = _evaluation([[0.2, 0.4], [0.9, 0.9], [0.9, 0.7]], threshold=0.5)
    rows = chapter1.nemo_items(items, search, pruned)
    assert [r["hidden"] for r in rows] == [True, False, False]
    assert [r["median score under NeMo"] for r in rows] == pytest.approx([0.3, 0.9, 0.8])
    assert chapter1.nemo_hidden_counts(rows) == {"n_hidden": 1, "n_passed": 1, "n_passed_and_hidden": 0}
    table = chapter1.nemo_items_table(rows)
    assert list(table.columns) == ["item", "neurons", "blocking score", "refinement threshold", "test passed",
                                   "score under NeMo", "hidden"]
    assert rows[1]["blocking score"] is None and rows[2]["blocking score"] == pytest.approx(0.7)
    summary = chapter1.nemo_summary(items, search)
    assert (summary["n_flagged"], summary["not_flagged"], summary["value_neurons"]) == (2, "rocket", 20)
    assert (summary["neurons_min"], summary["neurons_max"], summary["share_max"]) == (2, 4, 0.2)
    assert (summary["n_under_threshold"], summary["under_threshold"], summary["n_over_threshold"]) == (1, "cup", 1)
    assert summary["over_threshold_min"] == summary["over_threshold_max"] == pytest.approx(0.95)
    assert summary["union_neurons"] == 5  # channel 2 of layer a is shared


def test_nemo_summary_of_nothing_flagged_says_none():
    summary = chapter1.nemo_summary([SimpleNamespace(id="x")], _search([_nemo_result({"a": []}, False, 0.9)]))
    assert summary["n_flagged"] == 0 and summary["under_threshold"] == "none" and summary["not_flagged"] == "x"
    assert math.isnan(summary["over_threshold_min"])


def test_displacement_summary_relates_each_attack_to_the_distance_between_prompts(generator):
    nemo_run = SimpleNamespace(name="NeMo", attack=_attack(2.0, generator=generator))
    wanda_run = SimpleNamespace(name="Wanda 1%", attack=_attack(1.0, generator=generator))
    summary = chapter1.displacement_summary([nemo_run, wanda_run], torch.tensor([3.0, 4.0, 5.0]))
    assert summary["nemo_median"] == pytest.approx(2.0) and summary["wanda_ratio"] == pytest.approx(0.25)
    assert summary["between_prompts_median"] == 4.0
    with pytest.raises(ValueError, match="one run per method"):
        chapter1.displacement_summary([wanda_run, wanda_run], torch.tensor([1.0]))


def test_claim_checks_follow_the_recorded_mr_and_include_the_control_only_where_it_ran():
    recorded = {"memorized prompts": {"mr": 1.0}, "NeMo": {"mr": 0.2}, "NeMo + Dori": {"mr": 0.9},
                "Wanda 1%": {"mr": 1.0}, "Wanda 1% + Dori": {"mr": 1.0}, "nemo_threshold": 0.8}
    checks = chapter1.pruning_claim_checks(recorded, 0.01)
    # Wanda did not lower MR, so whether Dori recovers after it cannot be tested, and the line says so
    assert list(checks.values()) == [True, True, False, None]
    assert "NeMo lowers MR (1.0 -> 0.2)" in checks
    assert "Dori recovers after Wanda 1%: not testable, Wanda 1% did not lower MR" in checks
    against = chapter1.pruning_claim_checks({**recorded, "NeMo + Dori": {"mr": 0.2}, "Wanda 1%": {"mr": 0.0}}, 0.01)
    assert list(against.values()) == [True, False, True, True]
    recorded["non-memorized prompts + Dori"] = {"mr": 0.0}
    recorded["never-seen images + Dori"] = {"mr": 0.5}
    checks = chapter1.pruning_claim_checks(recorded, 0.01)
    assert list(checks.values())[4:] == [True, False]
    assert ("the attack does not bring back images seen once in training (MR 0.00 after the attack, at most 0.25; "
            "the paper: 0.00)") in checks


def test_the_controls_attack_seen_and_never_seen_images_and_skip_a_kind_the_backend_lacks(tiny_backend):
    without = dataclasses.replace(tiny_backend, never_seen_items=list, seen_once_items=list)
    assert chapter1.non_memorized_controls(without, [0], 2, steps=1) == {}
    only_seen = dataclasses.replace(without, seen_once_items=lambda: tiny_backend.memorized[:3])
    control = chapter1.non_memorized_controls(only_seen, [0, 1], 2, steps=1)
    assert list(control) == ["non-memorized prompts", "non-memorized prompts + Dori"]
    assert all(evaluation.scores.shape == (2, 2) for evaluation in control.values())
    both = dataclasses.replace(only_seen, never_seen_items=lambda: tiny_backend.memorized[:1])
    assert list(chapter1.non_memorized_controls(both, [0], 2, steps=1)) == [
        "non-memorized prompts", "non-memorized prompts + Dori", "never-seen images", "never-seen images + Dori"]


def test_the_organism_offers_seen_once_photographs_as_controls(tiny_backend):
    seen = tiny_backend.seen_once_items()
    assert seen and len({item.id for item in seen}) == len(seen)
    assert all(item.references.shape[0] == 1 and item.reference_source == "seen once in training" for item in seen)
    training = {sample.caption for sample in tiny_backend.training_samples() if sample.kind == "natural"}
    assert all(item.prompt in training for item in seen)


def test_nemo_and_wanda_attacks_run_under_their_pruning_and_keep_snapshots(tiny_backend):
    items = tiny_backend.memorized[:2]
    layers = nemo.value_layers(tiny_backend.unet)
    search = _search([{layers[0]: [0, 1]}, {layers[-1]: [2]}])
    run = chapter1.nemo_attack(tiny_backend, items, search, [0], steps=2, snapshot_steps=(0, 1, 2))
    assert list(run.evaluations()) == ["NeMo", "NeMo + Dori"] and set(run.attack.snapshots) == {0, 1, 2}
    assert run.attack.embeddings.shape == (2, *tiny_backend.embedding_shape)
    assert len(chapter1.mr_by_attack_step(tiny_backend, run, (0, 1, 2), seed=0)) == 3
    runs = chapter1.wanda_attacks(tiny_backend, items, [0.01, 0.1], [0], steps=1, union_steps=2)
    assert [r.name for r in runs.values()] == ["Wanda 1%", "Wanda 10%"]
    assert 0 < runs[0.01].zeroed_share < runs[0.1].zeroed_share
    before = {k: v.clone() for k, v in tiny_backend.unet.state_dict().items()}
    with runs[0.1].under_pruning()["context"]:
        assert any(not torch.equal(v, before[k]) for k, v in tiny_backend.unet.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in tiny_backend.unet.state_dict().items())


def test_utility_under_pruning_measures_every_setting_and_needs_a_measure(tiny_backend):
    prompts = shared.sample_prompts(tiny_backend, "utility", 2, seed=2)
    search = _search([_nemo_result({nemo.value_layers(tiny_backend.unet)[0]: [0]}, True, 0.5)])
    wanda_run = SimpleNamespace(name="Wanda 1%", context=contextlib.nullcontext)
    utility = chapter1.utility_under_pruning(tiny_backend, prompts, search, [wanda_run])
    assert list(utility) == ["unmitigated", "NeMo (union of all items' neurons)", "Wanda 1%"]
    assert all(0 <= value <= 1 for value in utility.values())
    assert utility["Wanda 1%"] == utility["unmitigated"]  # the same model, the same seed
    with pytest.raises(ValueError, match="no utility"):
        chapter1.utility_under_pruning(dataclasses.replace(tiny_backend, utility=None), prompts, search, [])


def test_describe_nemo_sets_the_threshold_beside_nemos_own(tiny_backend):
    text = chapter1.describe_nemo(tiny_backend, _search([], threshold=0.827))
    assert "threshold 0.827 (NeMo on SD v1.4: 0.428)" in text and "20 value neurons in 2 layers" in text


def test_chapter_1_figures(generator):
    items = [SimpleNamespace(id="a", references=torch.rand(1, 3, 4, 4, generator=generator)),
             SimpleNamespace(id="b", references=torch.rand(1, 3, 4, 4, generator=generator))]
    columns = {"unmitigated": _evaluation([[0.9], [0.8]]), "NeMo": _evaluation([[0.2], [0.95]])}
    fig = plots.first_seed_grid(items, columns, 0.7)
    assert len(fig.axes) == 2 * 3 and fig.axes[2].get_xlabel() == "0.20"
    steps = paper.series("mr_by_attack_step.steps")
    assert steps == [0, 1, 10, 25, 50]
    fig = plots.mr_by_attack_step((0, 2), {"NeMo": [0.5, 1.0], "Wanda 2%": [0.0, 0.5]}, steps,
                                  {"NeMo": paper.series("mr_by_attack_step.NeMo")})
    assert len(fig.axes[0].lines) == 3  # ours twice, the paper's only where it has a curve
    fig = plots.attack_displacements({"NeMo + Dori": torch.tensor([1.0, 2.0])}, torch.tensor([3.0, 4.0, 5.0]))
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "between two non-memorized prompts", "NeMo + Dori: ||y_adv - y_0||"]
