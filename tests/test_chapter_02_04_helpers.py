"""The experiment layer of chapters 2-4: trigger tables, distances, activation divergence, selection overlaps."""
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pytest
import torch

from dori_utils import analysis, nemo
from dori_utils.book import chapter4, paper, plots, shared
from dori_utils.analysis import TriggerSet


def _triggers(generator, replicates=(True, True, False, True)):
    n = len(replicates)
    initial = torch.randn(n, 2, 3, generator=generator)
    return TriggerSet(item_ids=["a", "a", "b", "b"][:n], start_kinds=["random", "non-memorized prompt"] * (n // 2),
                      initial=initial, triggers=initial + 0.01 * torch.randn(n, 2, 3, generator=generator),
                      scores=torch.tensor([0.9, 0.8, 0.1, 0.95][:n]), replicates=torch.tensor(replicates))


def test_trigger_success_is_the_share_per_item_and_kind_of_start(generator):
    success = analysis.trigger_success(_triggers(generator))
    assert success.loc["a", "random"] == 1.0 and success.loc["b", "random"] == 0.0
    assert success.loc["b", "non-memorized prompt"] == 1.0


def test_spread_summary_reads_the_distances_and_finds_each_trigger_next_to_its_start(generator):
    triggers = _triggers(generator)
    prompts = {"a": torch.zeros(2, 3), "b": torch.ones(2, 3) * 5}
    distances = analysis.trigger_distances(triggers, prompts, torch.randn(4, 2, 3, generator=generator))
    spread = analysis.spread_summary(triggers, distances)
    assert spread["share"] == 0.75 and spread["n_triggers"] == 4 and spread["n_replicating"] == 3
    assert spread["own_start_nearest_share"] == 1.0  # each trigger moved 1% of the distance between starts
    medians = spread["median_distances"]
    assert spread["ratio_to_unrelated"] == pytest.approx(medians["triggers of the same image"]
                                                         / medians["two non-memorized prompts"])
    assert spread["prompt_vs_start"] > 10


def test_trigger_map_points_keep_every_group_in_its_slice(generator):
    triggers = _triggers(generator)
    points, groups = analysis.trigger_map_points(triggers, torch.zeros(3, 2, 3), torch.ones(5, 2, 3))
    assert points.shape == (4 + 4 + 3 + 5, 6)
    assert (points[groups["memorized prompt"]] == 0).all() and (points[groups["ordinary prompt"]] == 1).all()
    np.testing.assert_allclose(points[groups["start"]], triggers.initial.flatten(1).numpy())


def test_off_diagonal_stopped_share_ignores_the_diagonal_and_checks_its_input():
    scores = np.array([[0.1, 0.9, 0.2], [0.9, 0.1, 0.9], [0.9, 0.9, 0.1]])
    assert analysis.off_diagonal_stopped_share(scores, 0.7) == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="square"):
        analysis.off_diagonal_stopped_share(np.zeros((2, 3)), 0.7)


def test_discrepancy_ratio_is_the_mean_of_per_layer_ratios():
    assert analysis.discrepancy_ratio([2, 3], [1, 6]) == pytest.approx(1.25)
    # the paper's rows give the values chapter 3 prints beside ours
    nemo = analysis.discrepancy_ratio(paper.series("discrepancy.NeMo.Y_adv"), paper.series("discrepancy.NeMo.Y_mem"))
    assert round(nemo, 1) == 1.4


def _nemo(neurons):
    return SimpleNamespace(neurons=neurons, memorized=bool(neurons))


def test_selection_tables_count_overlaps_per_layer_and_across_methods():
    layer = "down_blocks.2.attentions.0.transformer_blocks.0"
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[0, 1] = mask[1, 2] = True
    other = torch.zeros(4, 8, dtype=torch.bool)
    other[0, 1] = True
    selections = {"Y_adv": {"nemo": [_nemo({f"{layer}.attn2.to_v": [0, 1]}), _nemo({f"{layer}.attn2.to_v": [1]})],
                            "wanda": [{f"{layer}.ff.net.2": mask}, {f"{layer}.ff.net.2": other}]}}
    table = analysis.selection_iou_table(selections)
    assert table.set_index("method").loc["nemo", "IoU"] == pytest.approx(0.5)
    assert table.set_index("method").loc["wanda", "IoU"] == pytest.approx(0.5)
    cross = analysis.cross_method_table(selections)
    assert list(cross["NeMo channels"]) == [2, 1] and list(cross["Wanda rows"]) == [2, 1]
    assert list(cross["IoU"]) == [1.0, 0.0]  # {0, 1} vs rows {0, 1}; {1} vs row {0}


def test_paper_series_table_has_one_row_per_series():
    table = paper.series_table(["iou.NeMo.Y_mem", "iou.Wanda.Y_adv"])
    assert list(table.index) == ["iou.NeMo.Y_mem", "iou.Wanda.Y_adv"] and list(table.columns) == list(range(1, 8))
    assert table.loc["iou.Wanda.Y_adv", 7] == paper.series("iou.Wanda.Y_adv")[-1]
    with pytest.raises(KeyError):
        paper.series_table(["iou.NoSuchMethod"])


def test_triggers_of_one_image_picks_the_item_with_most_replicating_triggers(generator):
    triggers = _triggers(generator, replicates=(False, True, True, True))
    experiment = SimpleNamespace(triggers=triggers, items=[SimpleNamespace(id="a"), SimpleNamespace(id="b")])
    item, found, n = shared.triggers_of_one_image(experiment)
    assert item.id == "b" and n == 2 and torch.equal(found, triggers.triggers[2:])
    # with one replicating trigger, every attack result of the item is used
    triggers.replicates = torch.tensor([True, False, False, False])
    item, found, n = shared.triggers_of_one_image(experiment, limit=1)
    assert item.id == "a" and n == 1 and len(found) == 1


def test_sample_prompts_is_seeded_and_an_empty_set_is_a_clear_error(tiny_backend):
    first = shared.sample_prompts(tiny_backend, "nonmemorized", 5, seed=1)
    assert first == shared.sample_prompts(tiny_backend, "nonmemorized", 5, seed=1) and len(set(first)) == 5
    empty = SimpleNamespace(name="organism", prompt_sets={"nonmemorized": []})
    with pytest.raises(ValueError, match="empty"):
        shared.sample_prompts(empty, "nonmemorized", 5, seed=1)


def test_activation_divergence_gives_one_row_per_layer_and_identical_embeddings_no_discrepancy(tiny_backend, generator):
    embedding = tiny_backend.encode_prompts(["a red circle left of a blue square on a gray background"])
    same = embedding.expand(3, -1, -1)
    varied = same + torch.randn(same.shape, generator=generator)
    discrepancy, top_overlap = analysis.activation_divergence(tiny_backend, {"Y_adv": same, "Y_mem": varied})
    assert list(discrepancy) == ["nemo", "cross_attention", "wanda"]
    assert len(discrepancy["nemo"]) == len(discrepancy["cross_attention"]) == 3 and len(discrepancy["wanda"]) == 7
    for layers in discrepancy:
        assert (discrepancy[layers]["Y_adv"] < 1e-4).all() and (discrepancy[layers]["Y_mem"] > 1e-3).all()
    assert top_overlap["nemo"]["Y_adv"] == 1.0
    # the paper has no cross-attention panel: that row's right panel says so instead of plotting
    figure = plots.discrepancy_beside_paper(discrepancy, {m: ([1] * 7, [2] * 7) for m in ("nemo", "wanda")})
    assert len(figure.axes) == 6 and not figure.axes[3].axison
    assert all(ax.get_ylabel() for i, ax in enumerate(figure.axes) if i != 3)


def test_layer_sets_differ_in_what_they_read_and_blocked_neurons_are_switched_off(tiny_backend):
    embedding = tiny_backend.encode_prompts(["a red circle left of a blue square on a gray background"])
    def acts(layers, **kwargs):
        return analysis.layer_activations(tiny_backend, embedding, layers, **kwargs)
    # the value projections read the text alone; the cross-attention output reads the noise too
    for name, values in acts("nemo", seed=0).items():
        assert torch.equal(values, acts("nemo", seed=1)[name])
    assert any(not torch.allclose(a, b) for a, b in zip(acts("cross_attention", seed=0).values(),
                                                         acts("cross_attention", seed=1).values()))
    layer = nemo.value_layers(tiny_backend.unet)[0]
    blocked = acts("nemo", blocked={layer: [0, 2]})
    assert (blocked[layer][..., [0, 2]] == 0).all() and (blocked[layer][..., 1] != 0).any()
    with pytest.raises(ValueError, match="layers must be one of"):
        acts("attn1")


def test_choose_items_attacks_the_images_nemo_hides_and_says_so_when_it_hides_none(tiny_backend, monkeypatch,
                                                                                    tmp_path):
    import dataclasses


    from dori_utils.evaluation import evaluate_items
    from dori_utils.metrics import median_score

    monkeypatch.setenv("DORI_RESULTS", str(tmp_path))
    config = shared.shared_config(True, {"n_items": 2, "hidden_seeds": [10, 11]})
    items = tiny_backend.memorized
    assert len(items) >= 3
    # each item's own "neurons": a different channel of the first value layer, so the scores differ per item
    layer = nemo.value_layers(tiny_backend.unet)[0]
    neurons = nemo.NeuronSearch(None, 0.5, [{layer: [i]} for i in range(len(items))])
    scores = median_score(evaluate_items(tiny_backend, [10, 11], items=items,
                                         row_context=nemo.per_item_blocking(tiny_backend, neurons.per_item)).scores)
    # a threshold between the scores: the items at or under it are the hidden ones, in the backend's order
    threshold = sorted(scores.tolist())[1]
    between = dataclasses.replace(tiny_backend, replication_threshold=threshold)
    chosen, selection = shared.choose_items(between, config, neurons)
    hidden = [item.id for item, score in zip(items, scores.tolist()) if score <= threshold]
    assert selection.hidden == hidden and [item.id for item in chosen] == hidden[:2]
    assert f"NeMo hides {len(hidden)} of the {len(items)}" in selection.describe()

    nothing_hidden = dataclasses.replace(tiny_backend, replication_threshold=-1.0)
    chosen, selection = shared.choose_items(nothing_hidden, config, neurons)
    assert selection.hidden == [] and [item.id for item in chosen] == [item.id for item in items[:2]]
    assert selection.describe().startswith("NeMo hides none")
    with pytest.raises(ValueError, match="all .* memorized items"):
        shared.choose_items(tiny_backend, config, nemo.NeuronSearch(None, 0.5, neurons.per_item[:1]))


def test_nemo_flagging_rate_is_the_share_detection_flags(tiny_backend):


    prompts = tiny_backend.prompt_sets["nonmemorized"][:3]
    statistics = SimpleNamespace()
    everything = chapter4.nemo_flagging_rate(tiny_backend, nemo.NeuronSearch(statistics, -1.0, []), prompts)
    nothing = chapter4.nemo_flagging_rate(tiny_backend, nemo.NeuronSearch(statistics, 2.0, []), prompts)
    assert (everything, nothing) == (1.0, 0.0)  # MS-SSIM lies in [-1, 1]
    with pytest.raises(ValueError, match="at least one prompt"):
        chapter4.nemo_flagging_rate(tiny_backend, nemo.NeuronSearch(statistics, 0.5, []), [])
