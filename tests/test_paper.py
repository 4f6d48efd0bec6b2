import pytest

from dori_utils.book import paper, results, shared


def test_glue_keys_name_each_number_by_its_path():
    names = results.glue_values({"NeMo + Dori": {"mr": 0.99, "scores": [0.1, 0.2]}, "Wanda 1%": {"mr": 0.0}})
    assert names == ["nemo_dori.mr", "nemo_dori.scores.0", "nemo_dori.scores.1", "wanda_1.mr"]
    assert results.glue_values({"x": 1}, prefix="ch1") == ["ch1.x"]


def test_paper_numbers_are_glued_under_their_dotted_keys():
    names = paper.glue_numbers()
    assert len(names) == len(paper.NUMBERS) == len(set(names))
    assert "paper.nemo_dori.mr" in names and "paper.iou.wanda.y_adv.6" in names


def test_paper_rows_and_missing_keys():
    assert paper.series("mr_by_attack_step.NeMo") == [0.20, 0.73, 0.79, 0.94, 0.99]
    assert len(paper.series("iou.Wanda.Y_adv")) == 7
    with pytest.raises(KeyError, match="no row"):
        paper.series("iou.Wanda")
    with pytest.raises(KeyError, match="known keys"):
        paper.number("NeMo + Dori.sscd")
    assert str(paper.number("NeMo + Dori.score")) == "0.91 ± 0.03"
    assert str(paper.number("iou.NeMo.Y_mem.0")) == "≈0.58"


def test_beside_paper_sets_ours_next_to_the_paper_and_marks_what_did_not_run():
    table = paper.beside_paper({"NeMo": {"score_mean": 0.5, "score_sd": 0.1, "mr": 1.0}}, ["NeMo", "ESD + Dori"],
                               sources={"ESD + Dori": "paper only"})
    assert table.to_dict("records") == [
        {"setting": "NeMo", "source": "this chapter", "score (ours)": "0.50 ± 0.10", "MR (ours)": "1.00",
         "SSCD (paper)": "0.33 ± 0.18", "MR (paper)": "0.20"},
        {"setting": "ESD + Dori", "source": "paper only", "score (ours)": "n/a", "MR (ours)": "n/a",
         "SSCD (paper)": "0.90 ± 0.04", "MR (paper)": "0.98"}]


def test_print_checks(capsys):
    paper.print_checks("claims", {"a holds": True, "b holds": False})
    assert capsys.readouterr().out == "claims\nyes  a holds\nNO   b holds\n"
    with pytest.raises(ValueError):
        paper.print_checks("claims", {})


def test_shared_config_applies_smoke_sizes_then_overrides():
    assert shared.shared_config() == shared.SharedConfig()
    smoke = shared.shared_config(smoke=True, overrides={"n_random": 3, "eval_seeds": [5, 6]})
    assert (smoke.n_random, smoke.n_statistics, smoke.eval_seeds) == (3, shared.SMOKE_SIZES["n_statistics"], (5, 6))
    with pytest.raises(ValueError, match="n_randoms"):
        shared.shared_config(overrides={"n_randoms": 3})


def test_measured_text_fills_in_glued_numbers_and_names_a_missing_one():
    results.glue_values({"NeMo + Dori": {"mr": 0.5}, "item": "cat", "n": 3})
    assert results.render_text("MR {{nemo_dori.mr:.2f}} on the {{item:s}}, {{n:d}} items, {{n}}") == \
        "MR 0.50 on the cat, 3 items, 3"
    with pytest.raises(KeyError, match=r"\{\{nemo_dori.score\}\}.*nemo_dori.mr"):
        results.render_text("{{nemo_dori.score:.2f}}", strict=True)
    with pytest.warns(UserWarning, match="did not glue"):  # another backend may lack a measurement: say so
        assert results.render_text("MR {{template.mr:.2f}}") == "MR [not measured in this run: template.mr]"
    results.glue_values({"auc": None})
    assert results.render_text("AUC {{auc:.2f}}") == "AUC [not measured in this run: auc]"
    assert results.render_text("no numbers, {braces} and $\\{x\\}$ stay") == "no numbers, {braces} and $\\{x\\}$ stay"
