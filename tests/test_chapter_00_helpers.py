"""The experiment layer of chapter 0: unrelated scores, Wen's AUCs, prompt sampling, the utility table, the
locality test."""
import matplotlib

matplotlib.use("Agg")
import pytest
import torch

from dori_utils import evaluation, nemo
from dori_utils.book import chapter0, plots, shared
from dori_utils.backends import BackendError, retrain_backend
from dori_utils.evaluation import ItemEvaluation
from dori_utils.sampling import Samples, generate_for_prompts


def _evaluation(generator, n_items=3, seeds=2, steps=4, shift=0.0):
    return ItemEvaluation([f"i{k}" for k in range(n_items)], torch.rand(n_items, seeds, 3, 8, 8, generator=generator),
                          torch.rand(n_items, seeds, generator=generator),
                          torch.rand(n_items, seeds, steps, generator=generator) + shift, 0.5)


def test_wen_aucs_rank_memorized_prompts_above_controls_and_each_step_is_read_alone(generator):
    memorized = _evaluation(generator, shift=2.0)  # every memorized norm above every control norm
    above = Samples(torch.zeros(5, 3, 8, 8), torch.rand(5, 4, generator=generator))
    mixed = Samples(torch.zeros(5, 3, 8, 8), torch.rand(5, 4, generator=generator) + 2.0)
    mixed.wen_per_step[:, 1] = 10.0  # step 2 of these controls outranks every memorized prompt
    aucs = evaluation.wen_aucs(memorized, {"low": above, "mixed": mixed})
    assert aucs["low"] == 1.0 and aucs["mixed"] < 0.9
    per_step = evaluation.wen_per_step_aucs(memorized, {"mixed": mixed})["mixed"]
    assert len(per_step) == 4 and per_step[1] == 0.0


def test_the_literal_wen_score_exists_only_for_a_v_predicting_model(tiny_backend, generator):
    memorized = _evaluation(generator, steps=tiny_backend.num_inference_steps)
    controls = {"c": Samples(torch.zeros(3, 3, 8, 8), torch.rand(3, tiny_backend.num_inference_steps, generator=generator))}
    literal = evaluation.wen_noise_prediction_aucs(tiny_backend, memorized, controls)
    assert tiny_backend.scheduler.config.prediction_type == "v_prediction" and set(literal) == {"c"}


def test_unrelated_scores_take_the_highest_cross_or_first_control_score(tiny_backend):
    items = tiny_backend.memorized
    own = torch.stack([item.references[0] for item in items])[:, None]  # each item "generates" its photograph
    memorized = ItemEvaluation([i.id for i in items], own, torch.ones(len(items), 1), torch.zeros(len(items), 1, 2), 0.5)
    copy_of_first = Samples(items[0].references[:1].clone(), torch.zeros(1, 2))
    flat = Samples(torch.full((1, *items[0].references.shape[1:]), 0.5), torch.zeros(1, 2))
    scores = evaluation.unrelated_scores(tiny_backend, memorized, {"flat": flat, "copy": copy_of_first})
    assert scores.closest_item["copy"] == [items[0].id]
    copy_score = scores.score_sets["copy vs closest photograph"].item()
    assert copy_score == pytest.approx(1.0, abs=1e-4)
    assert scores.unrelated_max < copy_score  # the second control is shown, not calibrated on
    with pytest.raises(ValueError, match="control"):
        evaluation.unrelated_scores(tiny_backend, memorized, {})


def test_prompt_sets_are_drawn_in_turn_from_one_generator_and_unknown_sets_are_named(tiny_backend):
    sizes = {"heldout_ordinary": 3, "unseen_natural": 2}
    drawn = shared.sample_prompt_sets(tiny_backend, sizes, seed=0)
    assert drawn == shared.sample_prompt_sets(tiny_backend, sizes, seed=0)
    assert [len(v) for v in drawn.values()] == [3, 2]
    assert set(drawn["unseen_natural"]) <= set(tiny_backend.prompt_sets["unseen_natural"])
    assert shared.sample_prompts(tiny_backend, "heldout_ordinary", 3, seed=0) == drawn["heldout_ordinary"]
    with pytest.raises(KeyError, match="no prompt set 'laion'"):
        shared.sample_prompt_sets(tiny_backend, {"laion": 2}, seed=0)


def test_the_utility_table_validates_the_checker_on_drawn_scenes(tiny_backend):
    prompts = tiny_backend.prompt_sets["heldout_ordinary"][:6]
    drawn = tiny_backend.draw_prompts(prompts)
    assert drawn.shape == (6, 3, 32, 32) and 0 <= drawn.min() and drawn.max() <= 1
    table = chapter0.utility_table(tiny_backend, prompts, torch.zeros_like(drawn))
    assert table.loc["overall", "real scenes (checker validation)"] > 0.9  # the checker reads what was drawn
    assert table.loc["overall", "generated from held-out captions"] < 0.5  # and not black squares
    assert tiny_backend.utility(drawn, prompts) == table.loc["overall", "real scenes (checker validation)"]


def test_the_locality_test_reports_every_item_and_checks_its_claims(tiny_backend):
    config = shared.shared_config(smoke=True)
    neurons = shared.nemo_neurons(tiny_backend, config, progress=False)
    n = len(tiny_backend.memorized)
    prompts = tiny_backend.prompt_sets["heldout_ordinary"][:n]
    unblocked = generate_for_prompts(tiny_backend, prompts, [0]).images
    with pytest.raises(ValueError, match="one held-out prompt per memorized item"):
        chapter0.locality_test(tiny_backend, neurons, prompts[:-1], unblocked, per_item=2)
    locality = chapter0.locality_test(tiny_backend, neurons, prompts, unblocked, per_item=2)
    assert locality.transfer.shape == (n, n) and len(locality.table()) == n
    assert all(0 <= k <= neurons.n_value_neurons for k in locality.needed)
    assert set(locality.utility) == {"unblocked", "one item's neurons blocked"}
    summary = locality.summary()
    assert summary["replicating"] == sum(k > 0 for k in locality.needed)
    assert len(locality.checks()) == 1


def test_the_first_sampling_step_is_pure_noise_on_the_organism(tiny_backend):
    first, residue = chapter0.first_sampling_step(tiny_backend)
    assert first == 999 and residue < 1e-3


def test_only_the_organism_can_be_retrained():
    with pytest.raises(BackendError, match="not trained by this book"):
        retrain_backend("sd-v1-4")


def test_chapter_0_figures_are_drawn(tiny_backend, generator):
    evaluation_ = _evaluation(generator, n_items=2)
    fig = plots.replication_grid(tiny_backend.memorized[:2], evaluation_, [0, 1], "t")
    assert len(fig.axes) == 2 * 3
    fig = plots.score_histograms({"a": torch.rand(5, generator=generator)}, 0.7, "SSIM (32x32)")
    assert fig.axes[0].get_xlabel() == "replication score (SSIM)"
    fig = plots.per_step_auc({"a": [0.5, 0.9]}, {"a": 0.8})
    assert "0.80" in fig.axes[0].get_legend().get_texts()[0].get_text()
    fig = plots.roc_curves(torch.tensor([0.9, 0.8]), {"a": torch.tensor([0.1, 0.2])}, "t")
    assert "AUC 1.00" in fig.axes[0].get_legend().get_texts()[0].get_text()


def test_training_pairs_are_counted_by_kind_with_their_distinct_captions():
    from types import SimpleNamespace

    samples = [SimpleNamespace(kind=k, caption=c) for k, c in
               (("memorized", "a cat"), ("memorized", "a cat"), ("ordinary", "x"), ("ordinary", "y"))]
    counts = chapter0.training_pair_counts(samples)
    assert counts.loc["memorized"].tolist() == [2, 1] and counts.loc["ordinary"].tolist() == [2, 2]


def test_seen_caption_utility_samples_training_captions(tiny_backend):
    accuracy, n = chapter0.seen_caption_utility(tiny_backend, 3)
    assert n == 3 and 0 <= accuracy <= 1


def test_evaluation_refuses_the_seeds_the_references_were_generated_with(tiny_backend):
    import dataclasses

    items = [dataclasses.replace(item, reference_source="unmitigated model's generation")
             for item in tiny_backend.memorized[:1]]
    generated = dataclasses.replace(tiny_backend, reference_seeds=(0, 1))
    with pytest.raises(ValueError, match=r"seeds \[1\] are seeds of the references"):
        evaluation.evaluate_items(generated, [1, 5], items=items)
    assert evaluation.evaluate_items(generated, [5], items=items, num_inference_steps=1).scores.shape == (1, 1)
    evaluation.evaluate_items(tiny_backend, [0], items=tiny_backend.memorized[:1], num_inference_steps=1)  # training images


def test_control_generations_follow_the_backends_control_sets_in_order(tiny_backend):
    prompts, controls = chapter0.control_generations(tiny_backend, [3, 2], seed=0, progress=False)
    assert list(prompts) == list(controls) == ["held-out scene captions", "unseen natural captions"]
    assert [len(p) for p in prompts.values()] == [3, 2] and [len(s.images) for s in controls.values()] == [3, 2]
    assert set(prompts["held-out scene captions"]) <= set(tiny_backend.prompt_sets["heldout_ordinary"])
    # the same draws as sampling the sets directly, so chapter 0's prompts did not change with the function
    drawn = shared.sample_prompt_sets(tiny_backend, {"heldout_ordinary": 3, "unseen_natural": 2}, seed=0)
    assert list(prompts.values()) == list(drawn.values())
    only_first, _ = chapter0.control_generations(tiny_backend, [2], seed=0, progress=False)
    assert list(only_first) == ["held-out scene captions"]
