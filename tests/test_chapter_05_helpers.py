"""Chapter 5's experiment layer: its plan, surrogates, fine-tunings, fresh attack, table, figures and claim checks."""
import contextlib
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pandas as pd
import pytest
import torch

from dori_utils import finetune, nemo, wanda
from dori_utils.book import chapter5, costs, paper, plots, results, shared
from dori_utils.evaluation import ItemEvaluation

LEVELS = [[0.1, False], [0.5, True]]
MILD, STRONG = "Wanda 10%", "Wanda 50% + value neurons blocked"


def _plan(smoke=False, **changes):
    settings = dict(seeds=[10, 11], max_items=10, surrogate_source="pruned", surrogate_levels=LEVELS, surrogate_max_score=0.5,
                    surrogate_seeds=[20, 21, 22], n_pairs=1024, n_utility=16, eval_attack_steps=50,
                    eval_attack_seed=7, eval_random_items=2, epochs=3, steps_per_epoch=12, adv_batch=32)
    return chapter5.finetuning_plan(smoke, **{**settings, **changes})


def _surrogates(scores, pruning, max_score=0.5):
    n = len(scores)
    return finetune.Surrogates(torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(1)),
                               torch.tensor(scores), [20] * n, torch.tensor(scores)[:, None], 0.7, max_score,
                               list(pruning))


def _evaluation(scores, threshold=0.7):
    """Items x 2 seeds, each item's score the same for both seeds."""
    scores = torch.tensor(scores, dtype=torch.float32).repeat_interleave(2, dim=1)
    n, s = scores.shape
    return ItemEvaluation([f"item{i}" for i in range(n)], torch.zeros(n, s, 3, 4, 4), scores, torch.zeros(n, s, 2),
                          threshold)


def _fresh(adversarial=0.1, prompt_only=0.1, control=0.9, adversarial_random=0.1):
    """A fresh attack on two items: each model's scores (all seeds alike) from the prompt and random starts."""
    attacked = {("before fine-tuning", "random"): _evaluation([[0.9]]),
                ("adversarial fine-tuning", "prompt"): _evaluation([[adversarial], [0.1]]),
                ("adversarial fine-tuning", "random"): _evaluation([[adversarial_random]]),
                ("fine-tuning, prompt only", "prompt"): _evaluation([[prompt_only], [0.1]]),
                ("fine-tuning, prompt only", "random"): _evaluation([[0.1]]),
                ("fine-tuning, L_DM only", "prompt"): _evaluation([[control], [0.1]])}
    return chapter5.FreshAttack(_evaluation([[0.9], [0.8]]), attacked, 1, 1.5)


# --------------------------------------------------------------------------------------------- plan

def test_finetuning_plan_passes_the_parameters_through_and_smoke_shrinks_them():
    plan = _plan()
    assert plan.seeds == [10, 11] and plan.max_items == 10 and plan.n_pairs == 1024
    assert plan.finetune.epochs == 3 and plan.finetune.adv_batch == 32 and plan.updates == 36
    smoke = _plan(smoke=True)
    assert smoke.seeds == [10] and smoke.surrogate_seeds == [20, 21]
    assert smoke.max_items == 2 and smoke.n_pairs == 64 and smoke.eval_attack_steps == 3
    assert (smoke.finetune.epochs, smoke.finetune.steps_per_epoch, smoke.finetune.adv_batch) == (1, 2, 4)
    with pytest.raises(TypeError):
        _plan(not_a_setting=1)
    with pytest.raises(ValueError, match="SURROGATES must be one of"):
        _plan(surrogate_source="painted")


def test_the_chapters_parameters_cell_becomes_its_plan_in_one_call():
    cell = next("".join(c["source"]) for c in json.loads(
        (Path(__file__).resolve().parent.parent / "chapters" / "05_adversarial_finetuning.ipynb").read_text())["cells"]
        if "parameters" in c["metadata"].get("tags", []))
    parameters = {}
    exec(cell, parameters)
    plan = chapter5.plan_from_parameters(parameters)
    assert plan.seeds == parameters["SEEDS"] and plan.surrogate_source == parameters["SURROGATES"]
    assert plan.finetune.attack_steps == parameters["TRAIN_ATTACK_STEPS"] and plan.finetune.lr == parameters["LEARNING_RATE"]
    assert plan.finetune.steps_per_epoch == parameters["STEPS_PER_EPOCH"] and plan.n_utility == parameters["N_UTILITY"]
    assert chapter5.plan_from_parameters({**parameters, "SMOKE": True}).finetune.epochs == 1
    del parameters["EPOCHS"]
    with pytest.raises(KeyError, match="EPOCHS"):
        chapter5.plan_from_parameters(parameters)


# --------------------------------------------------------------------------------------------- surrogates

def test_pruned_surrogates_escalate_an_item_that_stays_above_the_ceiling(tiny_backend, monkeypatch):
    items = tiny_backend.memorized[:2]
    calls = []

    def fake_surrogates(backend, chosen, seeds, max_score, label):
        calls.append((label, [item.id for item in chosen]))
        # the first item is still a copy under the mild pruning and falls under the ceiling with the strong one
        scores = [0.3 if (item is items[0] and "50%" in label) else 0.9 if item is items[0] else 0.2 for item in chosen]
        return _surrogates(scores, [label] * len(chosen), max_score)

    monkeypatch.setattr(finetune, "make_surrogates", fake_surrogates)
    monkeypatch.setattr(wanda, "pruning_masks", lambda backend, prompts, sparsity, union_steps: {s: {} for s in sparsity})
    monkeypatch.setattr(wanda, "prune", lambda backend, masks: contextlib.nullcontext())
    monkeypatch.setattr(nemo, "block", lambda backend, neurons: contextlib.nullcontext())
    chosen = finetune.pruned_surrogates(tiny_backend, items, LEVELS, seeds=(0,), max_score=0.5)
    assert calls == [(MILD, [items[0].id, items[1].id]), (STRONG, [items[0].id])]
    assert chosen.source == [STRONG, MILD]
    assert chosen.scores.tolist() == pytest.approx([0.3, 0.2]) and chosen.all_below_max


def test_chapter_surrogates_are_computed_once_per_setting(tiny_backend, tmp_path, monkeypatch):
    monkeypatch.setenv("DORI_RESULTS", str(tmp_path))
    calls = []
    monkeypatch.setattr(finetune, "pruned_surrogates",
                        lambda backend, items, levels, seeds, max_score: calls.append(seeds) or _surrogates([0.4], [MILD]))
    plan = _plan()
    items = tiny_backend.memorized[:1]
    first = chapter5.chapter_surrogates(tiny_backend, items, plan)
    again = chapter5.chapter_surrogates(tiny_backend, items, plan)
    chapter5.chapter_surrogates(tiny_backend, items, dataclasses.replace(plan, surrogate_seeds=[1]))
    assert calls == [[20, 21, 22], [1]]
    assert torch.equal(first.images, again.images)


def test_surrogate_summary_and_grid_count_sources_and_copies():
    surrogates = _surrogates([0.3, 0.6, 0.8], [MILD, STRONG, STRONG])
    summary = chapter5.surrogate_summary(surrogates)
    assert summary["source_counts"] == {MILD: 1, STRONG: 2}
    assert (summary["n_above_ceiling"], summary["n_above_threshold"]) == (2, 1)
    assert summary["max_score"] == pytest.approx(0.8) and summary["min_score"] == pytest.approx(0.3)
    items = [SimpleNamespace(id=f"i{k}", references=torch.zeros(1, 3, 4, 4)) for k in range(3)]
    grid = chapter5.surrogate_grid(items, surrogates)
    assert grid["captions"][1] == [f"0.30, {MILD}", f"0.60, {STRONG}", f"0.80, {STRONG}"]
    assert len(grid["rows"]) == 2 and grid["col_labels"] == ["i0", "i1", "i2"]


def test_transformed_surrogates_keep_the_most_similar_transform_under_the_ceiling(tiny_backend):
    items = tiny_backend.memorized[:2]
    surrogates = finetune.transformed_surrogates(tiny_backend, items, max_score=0.5)
    assert surrogates.images.shape == (2, *items[0].references.shape[1:])
    assert surrogates.candidate_scores.shape == (2, len(finetune.SURROGATE_TRANSFORMS))
    for i, item in enumerate(items):
        name = surrogates.source[i]
        expected = finetune.SURROGATE_TRANSFORMS[name](item.references[:1])[0]
        assert torch.equal(surrogates.images[i], expected)  # the training image itself, transformed
        under = surrogates.candidate_scores[i][surrogates.candidate_scores[i] <= 0.5]
        if len(under):
            assert surrogates.scores[i] == under.max()
    # a ceiling nothing meets keeps the least similar transform and says so
    strict = finetune.transformed_surrogates(tiny_backend, items, max_score=-2.0)
    assert not strict.all_below_max
    assert torch.equal(strict.scores, strict.candidate_scores.min(dim=1).values)


# --------------------------------------------------------------------------------------------- L_DM data, runs

def test_ldm_pairs_use_the_training_pairs_where_the_backend_has_them(tiny_backend):
    pairs = chapter5.ldm_pairs(tiny_backend, 6)
    assert len(pairs) == 6 and pairs.images.shape[1:] == tiny_backend.latent_shape
    distilled = chapter5.ldm_pairs(dataclasses.replace(tiny_backend, training_samples=None), 2)
    assert len(distilled) == 2 and len(distilled.caption_embeddings) == 2  # two distinct generated prompts


@pytest.fixture(scope="module")
def tiny_runs(tiny_backend, tmp_path_factory):
    results_root = tmp_path_factory.mktemp("results")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DORI_RESULTS", str(results_root))
        items = tiny_backend.memorized[:2]
        surrogates = _surrogates([0.2, 0.3], [MILD, MILD])
        surrogates.images = torch.cat([item.references[:1] for item in items]) * 0.5
        pairs = chapter5.ldm_pairs(tiny_backend, 8)
        config = finetune.FinetuneConfig(epochs=1, steps_per_epoch=1, attack_steps=1, attack_batch=1, dm_batch=2,
                                         adv_batch=2)
        with costs.count_model_calls() as calls:
            with torch.no_grad():  # the original in use, as in the chapter, which samples with it first
                tiny_backend.unet(torch.zeros(1, *tiny_backend.latent_shape), torch.tensor([0]),
                                  tiny_backend.encode_prompts([items[0].prompt]))
            runs = chapter5.finetune_variants(tiny_backend, items, surrogates, pairs, config)
        yield SimpleNamespace(runs=runs, items=items, surrogates=surrogates, pairs=pairs, config=config,
                              root=results_root, calls=calls)


def test_finetune_variants_run_the_three_fine_tunings_and_reuse_them(tiny_backend, tiny_runs, monkeypatch):
    runs = tiny_runs.runs
    assert list(runs) == list(chapter5.FINETUNE_VARIANTS)
    assert runs["fine-tuning, L_DM only"].history["l_adv"] == [0.0]  # the control has no L_adv
    assert len(runs["adversarial fine-tuning"].history["attack_loss"]) == 1
    assert runs["fine-tuning, prompt only"].history["attack_loss"] == []  # no attack in the loop
    monkeypatch.setenv("DORI_RESULTS", str(tiny_runs.root))
    monkeypatch.setattr(finetune, "adversarial_finetune", lambda *args, **kwargs: pytest.fail("not reused"))
    again = chapter5.finetune_variants(tiny_backend, tiny_runs.items, tiny_runs.surrogates, tiny_runs.pairs,
                                          tiny_runs.config)
    assert again["adversarial fine-tuning"].history["l_dm"] == pytest.approx(runs["adversarial fine-tuning"].history["l_dm"])


def test_each_fine_tuning_trains_beside_the_original_only(tiny_backend, tiny_runs):
    training = [tally for (_, mode, _, _), tally in tiny_runs.calls.unet.items() if mode == "weight-grad"]
    assert training and {tally.max_live_unets for tally in training} == {2}  # no finished model stays in memory
    weights = {name: finetune.weights_fingerprint(run.unet) for name, run in tiny_runs.runs.items()}
    assert len(set(weights.values())) == 3  # each loaded back from its own folder
    assert finetune.weights_fingerprint(tiny_backend.unet) not in weights.values()


def test_settings_table_and_cost_read_the_runs(tiny_runs):
    table = chapter5.finetune_settings_table(tiny_runs.config, tiny_runs.pairs)
    assert table.loc["L_DM pairs", "value"] == "8" and "use_triggers" not in table.index
    runs = {"a": SimpleNamespace(history={"epoch_seconds": [1.0, 3.0], "total_seconds": 4.0, "attack_seconds": [1.0, 1.0]}),
            "b": SimpleNamespace(history={"epoch_seconds": [0.5, 0.5], "total_seconds": 1.0, "attack_seconds": []})}
    cost, record = chapter5.finetuning_cost(runs)
    assert list(cost.index) == ["epoch 1", "epoch 2", "total"] and cost.loc["total", "a"] == 4.0
    assert record["a"]["attack_share"] == pytest.approx(0.5) and record["b"]["attack_share"] == 0.0


# --------------------------------------------------------------------------------------------- the fresh attack

def test_fresh_attack_tries_each_model_from_its_starts(tiny_backend, tiny_runs):
    models = {chapter5.ORIGINAL_MODEL: tiny_backend, **{name: run.backend for name, run in tiny_runs.runs.items()}}
    plan = _plan(seeds=[0], eval_attack_steps=1, eval_random_items=1)
    fresh = chapter5.fresh_attack(models, tiny_runs.items, plan)
    assert set(fresh.attacked) == {("before fine-tuning", "random"), ("adversarial fine-tuning", "prompt"),
                                   ("adversarial fine-tuning", "random"), ("fine-tuning, prompt only", "prompt"),
                                   ("fine-tuning, prompt only", "random"), ("fine-tuning, L_DM only", "prompt")}
    assert fresh.n_random == 1 and fresh.attacked["adversarial fine-tuning", "random"].scores.shape == (1, 1)
    assert fresh.attacked["fine-tuning, L_DM only", "prompt"].scores.shape == (2, 1)
    grid = chapter5.fresh_attack_grid(tiny_runs.items, tiny_runs.surrogates, fresh)
    assert len(grid["rows"]) == 2 and len(grid["rows"][0]) == len(grid["col_labels"]) == 6


def test_fresh_attack_summaries_use_the_paper_setting_names():
    summaries = _fresh().summaries()
    assert summaries["memorized prompts"]["mr"] == 1.0 and summaries["memorized prompts"]["n_items"] == 2
    assert summaries["adversarial fine-tuning + Dori"]["mr"] == 0.0
    assert summaries["before fine-tuning + Dori, random starts"]["n_items"] == 1
    assert f"{chapter5.prompt_attack_settings()[1]}.mr" in paper.NUMBERS  # the paper's adversarial row


def test_pruning_results_read_chapter_1_of_the_same_run_or_stop(tmp_path, monkeypatch):
    monkeypatch.setenv("DORI_RESULTS", str(tmp_path))
    with pytest.raises(results.ResultsMissing, match="does not exist.*dori-book run --chapters 01"):
        chapter5.pruning_results("organism", smoke=False)
    summary = {"score_mean": 0.9, "score_sd": 0.1, "mr": 1.0}
    log = results.chapter_log("ch1_pruning", "organism", smoke=False)
    log.record("NeMo + Dori", summary)
    with pytest.raises(results.ResultsMissing, match="lacks \\['Wanda 1% \\+ Dori'\\]"):  # a run stopped half-way
        chapter5.pruning_results("organism", smoke=False)
    log.record("Wanda 1% + Dori", summary)
    log.record("NeMo", summary)
    assert chapter5.pruning_results("organism", smoke=False) == {"NeMo + Dori": summary, "Wanda 1% + Dori": summary}
    with pytest.raises(results.ResultsMissing, match="does not exist"):  # smoke results live apart
        chapter5.pruning_results("organism", smoke=True)
    smoke = results.chapter_log("ch1_pruning", "organism", smoke=True)
    smoke.path.write_text(json.dumps({**log.data, "_provenance": {"backend": "organism", "smoke": False}}))
    with pytest.raises(results.ResultsMissing, match="comes from another run"):
        chapter5.pruning_results("organism", smoke=True)


def test_finetuning_table_sets_every_row_beside_the_paper():
    chapter1 = {"NeMo + Dori": {"score_mean": 0.9, "score_sd": 0.1, "mr": 1.0}}
    table = chapter5.finetuning_table(_fresh().summaries(), chapter1).set_index("setting")
    assert table.loc["adversarial fine-tuning + Dori", "MR (paper)"] == str(paper.number("adversarial fine-tuning + Dori.mr"))
    assert table.loc["NeMo + Dori", "source"] == "chapter 1" and table.loc["NeMo + Dori", "MR (ours)"] == "1.00"
    assert table.loc["Wanda 1% + Dori", "MR (ours)"] == "n/a" and table.loc["SISS + Dori", "source"] == "paper only"


def test_utility_of_models_measures_only_where_the_backend_can(tiny_backend):
    prompts = shared.sample_prompts(tiny_backend, "utility", 2, seed=2)
    images, utility = chapter5.utility_of_models({chapter5.ORIGINAL_MODEL: tiny_backend}, prompts)
    assert images[chapter5.ORIGINAL_MODEL].shape[0] == 2 and 0 <= utility[chapter5.ORIGINAL_MODEL] <= 1
    _, none = chapter5.utility_of_models({chapter5.ORIGINAL_MODEL: dataclasses.replace(tiny_backend, utility=None)},
                                            prompts)
    assert none is None


# --------------------------------------------------------------------------------------------- checks

def test_finetuning_checks_hold_and_fail_with_the_numbers():
    surrogates = _surrogates([0.3, 0.6], [MILD, STRONG])
    chapter1 = {"NeMo + Dori": {"mr": 1.0}}
    utility = {"before fine-tuning": 0.8, "adversarial fine-tuning": 0.75, "fine-tuning, prompt only": 0.8,
               "fine-tuning, L_DM only": 0.6}
    checks = chapter5.finetuning_checks(_fresh(), surrogates, chapter1, utility, "attribute accuracy")
    assert checks["no surrogate is a replication"] and not checks["every surrogate scores below 0.5"]
    assert checks["adversarial fine-tuning stops Dori from the prompt (MR <= 0.1)"]
    assert checks["adversarial fine-tuning + Dori beats NeMo + Dori"]
    assert not checks["adversarial fine-tuning beats the prompt-only ablation (MR lower by more than 0.1, from the "
                      "prompt or from random starts)"]
    assert checks["adversarial fine-tuning beats continued training on ordinary pairs alone (L_DM only) from the "
                  "prompt (MR lower by more than 0.1)"]
    assert checks["adversarial fine-tuning keeps attribute accuracy within 0.1"]
    assert not checks["fine-tuning, L_DM only keeps attribute accuracy within 0.1"]
    worse = chapter5.finetuning_checks(_fresh(adversarial=0.9, prompt_only=0.1), surrogates, {})
    assert not worse["adversarial fine-tuning stops Dori from the prompt (MR <= 0.1)"]
    # every line can print NO: a run where nothing the paper claims holds
    nothing = chapter5.finetuning_checks(_fresh(adversarial=0.9, prompt_only=0.9, control=0.9, adversarial_random=0.9),
                                            _surrogates([0.8], [MILD]), {"NeMo + Dori": {"mr": 0.5}},
                                            {"before fine-tuning": 0.8, "adversarial fine-tuning": 0.5,
                                             "fine-tuning, prompt only": 0.5, "fine-tuning, L_DM only": 0.5})
    assert not any(nothing.values())
    assert "adversarial fine-tuning + Dori beats NeMo + Dori" not in worse
    assert not any("keeps" in claim for claim in worse)


def test_describe_fresh_attack_prints_the_paper_and_chapter_1():
    text = chapter5.describe_fresh_attack(_fresh(), {"NeMo + Dori": {"mr": 1.0}})
    assert f"(paper: {paper.number('memorized prompts.mr').value:.2f})" in text
    assert "adversarial fine-tuning 0.00" in text and "fine-tuning, L_DM only 0.50" in text
    assert "MR NeMo + Dori (chapter 1): 1.00" in text and "MR Wanda 1% + Dori (chapter 1): missing" in text


# --------------------------------------------------------------------------------------------- figures

def test_mr_beside_paper_draws_ours_and_the_papers_mr():
    settings = ["memorized prompts", "fine-tuning, prompt only + Dori"]
    fig = plots.mr_beside_paper({"memorized prompts": {"mr": 0.9}}, settings, "MR")
    bars = fig.axes[0].patches
    assert bars[0].get_height() == pytest.approx(0.9) and np.isnan(bars[1].get_height())
    assert bars[2].get_height() == pytest.approx(paper.number("memorized prompts.mr").value)
    assert np.isnan(bars[3].get_height())  # the paper does not run the ablation


def test_running_mean_and_training_curves():
    np.testing.assert_allclose(plots.running_mean([1, 2, 3, 4], window=2), [1.5, 2.5, 3.5])
    np.testing.assert_allclose(plots.running_mean([1, 2], window=5), [1, 2])
    run = lambda adv, attack: SimpleNamespace(config={"adv_batch": adv}, history={
        "l_dm": [0.1] * 6, "l_adv": [0.2] * 6 if adv else [0.0] * 6, "attack_loss": attack})
    fig = plots.training_curves({"adversarial": run(4, [0.5, 0.4]), "control": run(0, [])}, steps_per_epoch=3)
    assert [line.get_label() for line in fig.axes[1].lines if not line.get_label().startswith("_")] == [
        "adversarial"]  # the control draws no L_adv
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["adversarial", "control"]  # one legend, below
    assert all(ax.get_legend() is None for ax in fig.axes) and fig.get_size_inches()[0] <= 8
    assert list(fig.axes[2].lines[0].get_ydata()) == [0.5, 0.4]


def test_utility_drops_are_paired_per_caption_with_their_standard_error():
    # the "utility" of an image is its mean pixel value, so each caption's drop is known exactly
    original = SimpleNamespace(name="fake", utility=lambda images, prompts: float(images.mean()))
    before = torch.tensor([0.2, 0.4, 0.6, 0.8])[:, None, None, None].expand(4, 3, 2, 2)
    images = {chapter5.ORIGINAL_MODEL: before, "tuned": before - torch.tensor([0.1, 0.1, 0.3, 0.3])[:, None, None, None]}
    drops = chapter5.utility_drops(original, images, ["a", "b", "c", "d"])
    assert list(drops) == ["tuned"]
    assert drops["tuned"]["drop"] == pytest.approx(0.2)
    assert drops["tuned"]["se"] == pytest.approx(np.std([0.1, 0.1, 0.3, 0.3], ddof=1) / 2)
    assert drops["tuned"]["utility"] == pytest.approx(0.3)
    table = chapter5.utility_drop_table(drops, {chapter5.ORIGINAL_MODEL: 0.5}, "brightness")
    assert list(table.columns) == ["brightness", "drop from the original (0.50)", "standard error of the drop"]
    with pytest.raises(ValueError, match="at least two prompts"):
        chapter5.utility_drops(original, {k: v[:1] for k, v in images.items()}, ["a"])
    with pytest.raises(ValueError, match="no utility measure"):
        chapter5.utility_drops(SimpleNamespace(name="x", utility=None), images, ["a", "b", "c", "d"])
