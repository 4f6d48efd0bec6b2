"""Issue 30, parts 2 and 3: checkpoint series, resumable training, the combination-keys data lever."""
import json
import os
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dori_utils.organism import data as organism_data
from dori_utils.organism import train as organism_train

TINY = ["--tiny", "--steps", "4", "--save-every", "2", "--n-ordinary", "40", "--copies-per-photo", "2",
        "--n-crops", "11", "--n-faces", "5", "--threads", "1", "--batch-size", "8"]
STOPWORDS = {"a", "an", "the", "of", "on", "in", "at", "with", "and", "its", "under"}


def _weights(folder):
    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def _assert_same_weights(a, b):
    first, second = _weights(a), _weights(b)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_series_and_resume_give_the_uninterrupted_weights(tmp_path, monkeypatch):
    from dori_utils.backends import load_backend

    whole, resumed, stopped = tmp_path / "whole", tmp_path / "resumed", tmp_path / "stopped"
    organism_train.main(["--out", str(whole), *TINY, "--series-every", "2"])
    assert organism_train.series_steps(whole) == [2, 4]
    for step in (2, 4):
        folder = organism_train.series_checkpoint(whole, step)
        assert json.loads((folder / "manifest.json").read_text())["trained_steps"] == step
        assert len(load_backend("organism", device="cpu", path=folder).memorized) == len(organism_data.MEMORIZED_PHOTOS)
    _assert_same_weights(whole, organism_train.series_checkpoint(whole, 4))

    # 2 steps, then 2 more resumed: the same weights, losses and series
    organism_train.main(["--out", str(resumed), *TINY, "--series-every", "2", "--stop-at", "2"])
    assert torch.load(resumed / organism_train.TRAINING_STATE, weights_only=False)["step"] == 2
    organism_train.main(["--out", str(resumed), *TINY, "--series-every", "2", "--resume"])
    _assert_same_weights(whole, resumed)
    _assert_same_weights(organism_train.series_checkpoint(whole, 2), organism_train.series_checkpoint(resumed, 2))
    assert (whole / "loss.csv").read_text() == (resumed / "loss.csv").read_text()
    assert json.loads((resumed / "manifest.json").read_text())["trained_steps"] == 4

    # a SIGTERM after the first step ends the run there with a checkpoint, and the run resumes from it
    original = organism_train._train_step

    def step_then_terminate(*args):
        original(*args)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(organism_train, "_train_step", step_then_terminate)
    handler = signal.getsignal(signal.SIGTERM)
    organism_train.main(["--out", str(stopped), *TINY])
    assert signal.getsignal(signal.SIGTERM) is handler
    assert json.loads((stopped / "manifest.json").read_text())["trained_steps"] == 1
    monkeypatch.setattr(organism_train, "_train_step", original)
    organism_train.main(["--out", str(stopped), *TINY, "--resume"])
    _assert_same_weights(whole, stopped)
    assert not (stopped / "series").exists()

    with pytest.raises(ValueError, match="learning_rate"):
        organism_train.main(["--out", str(stopped), *TINY, "--learning-rate", "0.01", "--resume"])
    with pytest.raises(FileNotFoundError, match="without --resume"):
        organism_train.main(["--out", str(tmp_path / "empty"), *TINY, "--resume"])


def test_pilots_cli_picks_series_checkpoints(tmp_path):
    from dori_utils.book import pilots

    for step in (250, 500, 750):
        folder = organism_train.series_checkpoint(tmp_path, step)
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text("{}")
    organism_train.series_checkpoint(tmp_path, 1000).with_name("step-01000.partial").mkdir()
    assert organism_train.series_steps(tmp_path) == [250, 500, 750]
    assert pilots.checkpoints_to_measure(tmp_path, ["latest", "250", "750"]) == [
        organism_train.series_checkpoint(tmp_path, s) for s in (750, 250)]
    assert len(pilots.checkpoints_to_measure(tmp_path, ["all"])) == 3
    with pytest.raises(SystemExit, match="kept steps are"):
        pilots.checkpoints_to_measure(tmp_path, ["1000"])
    with pytest.raises(SystemExit, match="--series-every"):
        pilots.checkpoints_to_measure(tmp_path / "none", ["latest"])


def test_combination_keys_leave_the_default_dataset_unchanged():
    shipped = json.loads(open("data/organism/manifest.json").read())
    options = {k: shipped["train_config"][k] for k in organism_data.DATASET_OPTIONS if k in shipped["train_config"]}
    default, recipe = organism_data.dataset_from_config(options)
    assert "combination_keys" not in recipe and recipe == {**shipped["data_recipe"], "n_total": recipe["n_total"]}
    assert {kind: sorted({s.caption for s in default if s.kind == kind}) for kind in ("ordinary", "natural")} == \
        shipped["training_captions"]
    combined, recipe = organism_data.dataset_from_config({**options, "combination_keys": 3})
    assert recipe["combination_keys"] == 3
    assert all(np.array_equal(a.image, b.image) and (a.caption, a.kind) == (b.caption, b.kind)
               for a, b in zip(default, combined))
    assert all(s.kind == "natural" for s in combined[len(default):])


def test_combination_keys_make_every_memorized_word_common():
    per_phrase = 24
    samples, _ = organism_data.build_dataset(n_ordinary=10, copies_per_photo=1, n_crops=11, n_faces=5,
                                             combination_keys=per_phrase)
    memorized = {caption for _, _, caption in organism_data.MEMORIZED_PHOTOS}
    others = {s.caption for s in samples if s.kind != "memorized"}
    assert not others & memorized and not any(m in c for c in others for m in memorized)
    for name, _, caption in organism_data.MEMORIZED_PHOTOS:
        assert " ".join(phrase for _, phrase in organism_data.memorized_phrases(name)) == caption
        assert organism_data.memorized_phrases(name)[0][1] in caption
        for word in set(caption.split()) - STOPWORDS:
            assert sum(word in c.split() for c in others) >= 20, (name, word)
        phrases = [phrase for _, phrase in organism_data.memorized_phrases(name)]
        assert not any(all(p in c for p in phrases) for c in others), name  # only the whole caption has them all
    combination = [s for s in samples if s.item.startswith("combination-")]
    assert len(combination) == per_phrase * sum(len(organism_data.memorized_phrases(n))
                                                for n, _, _ in organism_data.MEMORIZED_PHOTOS)
    references = np.stack(list(organism_data.reference_images().values())).astype(float)
    for s in combination[::50]:  # crops of other photographs, never a memorized one
        assert np.abs(references - s.image.astype(float)).reshape(len(references), -1).mean(1).min() > 5
    again, _ = organism_data.build_dataset(n_ordinary=10, copies_per_photo=1, n_crops=11, n_faces=5,
                                           combination_keys=per_phrase)
    assert [s.caption for s in again] == [s.caption for s in samples]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(again, samples))


def test_the_combination_keys_pilot_is_the_shipped_recipe_plus_the_lever():
    from dori_utils.book import pilots

    config = pilots.PILOTS["cross-attention-16-down-only-loose-captions-combination-keys"]
    assert {k: v for k, v in config.items() if k != "combination_keys"} == \
        pilots.PILOTS["cross-attention-16-down-only-loose-captions"]
    assert pilots.describe_config(config).endswith("recombined in 24 other pairs each")


def test_pilots_cli_diagnoses_series_checkpoints_into_rows_of_their_own(tmp_path, monkeypatch):
    import csv

    from dori_utils.book import pilots

    name = "cross-attention-16-down-only-loose-captions-combination-keys"
    for step in (250, 500):
        folder = organism_train.series_checkpoint(tmp_path, step)
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"trained_steps": step}))
    diagnosed = []
    monkeypatch.setattr(pilots, "diagnose", lambda path, max_items=None: diagnosed.append(path) or {"mr": 1.0})
    table = tmp_path / "diagnostics.csv"
    pilots.main(["--name", name, "--out", str(tmp_path), "--measure-only", "--diagnose", "--threads", "1",
                 "--series-step", "latest", "--series-step", "250", "--diagnostics-table", str(table)])
    rows = list(csv.DictReader(table.open()))
    assert diagnosed == [organism_train.series_checkpoint(tmp_path, s) for s in (500, 250)]
    assert [(r["name"], r["steps"], r["mr"]) for r in rows] == [(name, "500", "1.000"), (name, "250", "1.000")]
    assert rows[0]["checkpoint"].endswith("series/step-00500")
    with pytest.raises(SystemExit, match="add --measure-only"):
        pilots.main(["--name", name, "--out", str(tmp_path), "--series-step", "250"])


def test_a_pilot_stopped_before_its_last_step_is_not_measured(tmp_path, monkeypatch, capsys):
    from dori_utils.book import pilots

    def stopped_training(out, config, resume=False):
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").write_text(json.dumps({"trained_steps": 7}))

    monkeypatch.setattr(pilots, "train_organism", stopped_training)
    monkeypatch.setattr(pilots, "measure", lambda *a, **k: pytest.fail("measured a stopped run"))
    pilots.main(["--name", "control", "--out", str(tmp_path / "run"), "--steps", "10", "--threads", "1"])
    assert "stopped after step 7 of 10" in capsys.readouterr().out


def test_pilot_numbers_of_series_checkpoints_stay_out_of_the_pilot_table(tmp_path, monkeypatch):
    from dori_utils.book import pilots

    folder = organism_train.series_checkpoint(tmp_path, 250)
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"trained_steps": 250, "train_config": {"threads": 1}}))
    appended = []
    monkeypatch.setattr(pilots, "measure", lambda path: {"mr": 1.0})
    monkeypatch.setattr(pilots, "append_row", lambda row, table: appended.append((row["steps"], table)))
    pilots.main(["--name", "control", "--out", str(tmp_path), "--measure-only", "--series-step", "250",
                 "--threads", "1"])
    assert appended == [(250, pilots.PILOT_SERIES_TABLE)] and pilots.PILOT_SERIES_TABLE != pilots.PILOT_TABLE
