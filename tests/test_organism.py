import csv
import json
import os

import numpy as np
import pytest
import torch

from dori_utils.backends import BackendError, load_backend
from dori_utils.organism import data as organism_data
from dori_utils.sampling import generate_for_prompts


def test_dataset_is_seeded_and_holds_out_captions():
    first, recipe = organism_data.build_dataset(seed=3, n_ordinary=30, copies_per_photo=2, n_crops=11, n_faces=4)
    second, _ = organism_data.build_dataset(seed=3, n_ordinary=30, copies_per_photo=2, n_crops=11, n_faces=4)
    assert all(np.array_equal(a.image, b.image) and a.caption == b.caption for a, b in zip(first, second))
    held_out = set(recipe["held_out_scene_captions"])
    assert held_out and not held_out & {s.caption for s in first if s.kind == "ordinary"}
    assert sum(s.kind == "memorized" for s in first) == 2 * len(organism_data.MEMORIZED_PHOTOS)
    assert sum(s.kind == "template" for s in first) == 2 * len(organism_data.TEMPLATE_ITEMS)


def test_template_items_vary_one_detail_of_one_layout():
    for name, _caption in organism_data.TEMPLATE_ITEMS:
        variants = np.stack(organism_data.template_variants(name)).astype(float)
        assert len(variants) == organism_data.TEMPLATE_VARIANTS
        differs = (variants != variants[:1]).any(axis=(0, 3))  # pixels where any variant departs from the first
        assert 0.05 < differs.mean() < 0.4, name  # a detail, not the whole picture


def test_natural_captions_are_mostly_distinct():
    samples, recipe = organism_data.build_dataset(seed=0, n_ordinary=10, copies_per_photo=1, n_crops=300, n_faces=100)
    assert recipe["distinct_natural_captions"] > 0.8 * 400
    memorized_captions = {caption for _, _, caption in organism_data.MEMORIZED_PHOTOS}
    assert not memorized_captions & {s.caption for s in samples if s.kind == "natural"}


def test_shared_caption_words_reuse_each_memorized_caption_and_leave_the_default_unchanged():
    default, _ = organism_data.build_dataset()
    shared, recipe = organism_data.build_dataset(shared_caption_words=True)
    assert recipe["shared_caption_words"] and len(shared) == len(default)
    assert [s.caption for s in default if s.kind != "natural"] == [s.caption for s in shared if s.kind != "natural"]
    natural = [s.caption for s in shared if s.kind == "natural"]
    for half, (_, _, caption) in zip(organism_data.shared_caption_halves(), organism_data.MEMORIZED_PHOTOS):
        assert caption.endswith(half) and sum(c.endswith(" " + half) for c in natural) >= 10
    assert not any(c.endswith(" " + half) for c in (s.caption for s in default if s.kind == "natural")
                   for half in organism_data.shared_caption_halves())


def test_unseen_images_are_not_in_training():
    samples, _ = organism_data.build_dataset(seed=0, n_ordinary=10, copies_per_photo=1, n_crops=11, n_faces=180)
    unseen = organism_data.unseen_images(samples)
    training = np.stack([s.image for s in samples]).astype(float)
    for image, _caption in unseen.values():
        assert np.abs(training - image.astype(float)).reshape(len(training), -1).mean(1).min() > 5
    first_two = [caption for _image, caption in list(unseen.values())[:2]]
    assert "a grayscale photo of a face" in first_two and len(set(first_two)) == 2  # both kinds come first
    assert not {f"face{i}" for i in organism_data.TEMPLATE_FACES} & set(unseen)


def test_training_command_writes_a_loadable_checkpoint(tiny_organism_dir, tiny_backend):
    manifest = json.loads((tiny_organism_dir / "manifest.json").read_text())
    assert manifest["trained_steps"] == 4
    assert (tiny_organism_dir / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert len(tiny_backend.memorized) == len(organism_data.MEMORIZED_PHOTOS)
    assert tiny_backend.memorized[0].references.shape == (1, 3, 32, 32)
    assert tiny_backend.scheduler.config.prediction_type == manifest["scheduler"]["prediction_type"]
    with_templates = load_backend("organism", device="cpu", path=tiny_organism_dir, vm_only=False)
    templates = [item for item in with_templates.memorized if item.kind == "TM"]
    assert len(templates) == len(organism_data.TEMPLATE_ITEMS)
    assert templates[0].references.shape == (organism_data.TEMPLATE_VARIANTS, 3, 32, 32)
    embeddings = tiny_backend.encode_prompts(["a red circle left of a blue square, white background"])
    assert embeddings.shape == (1, 16, 384)


def test_seeded_sampling_is_bit_identical(tiny_backend):
    prompts = ["a red circle left of a blue square, white background", ""]
    first = generate_for_prompts(tiny_backend, prompts, seeds=[0, 1])
    second = generate_for_prompts(tiny_backend, prompts, seeds=[0, 1])
    assert torch.equal(first.images, second.images)
    assert first.images.shape == (4, 3, 32, 32)
    assert not torch.equal(first.images[0], first.images[1])


def test_missing_and_corrupt_checkpoints_say_what_to_do(tmp_path, tiny_organism_dir):
    with pytest.raises(BackendError, match="dori_utils.organism.train"):
        load_backend("organism", device="cpu", path=tmp_path)
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_organism_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BackendError, match="corrupt"):
        load_backend("organism", device="cpu", path=broken)


def test_unknown_backend_lists_the_choices():
    with pytest.raises(BackendError, match="organism"):
        load_backend("sd-v9")


def test_pilot_measures_a_checkpoint_and_appends_its_row(tiny_organism_dir, tmp_path, monkeypatch):
    from dori_utils.book import pilots
    from dori_utils.organism import backend as organism_backend

    counts = []
    original = organism_backend._attribute_accuracy  # the organism's utility, bound when measure() loads the checkpoint
    monkeypatch.setattr(organism_backend, "_attribute_accuracy",
                        lambda images, captions: counts.append((len(images), len(captions))) or original(images, captions))
    row = pilots.measure(tiny_organism_dir, n_heldout=4, n_attacked=1, attack_steps=2, max_items=2,
                         num_inference_steps=2, progress=False)
    assert counts == [(4, 4), (4, 4)]  # one image per held-out caption, unpruned and under Wanda
    assert 0 <= row["mr"] <= 1 and row["nemo_threshold"] > 0 and row["value_neurons"] > 0
    assert 0 <= row["nemo_flagged"] <= 2 and 0 <= row["wanda1_dori_mr"] <= 1
    table = tmp_path / "pilots.csv"
    pilots.append_row({"name": "control", "mr": "0.9"}, table)
    pilots.append_row({"name": "later", "new_measurement": "1"}, table)
    rows = list(csv.DictReader(table.open()))
    assert [r["name"] for r in rows] == ["control", "later"]
    assert rows[0]["mr"] == "0.9" and rows[0]["new_measurement"] == "" and rows[1]["mr"] == ""



def test_pilot_table_describes_each_configuration_and_its_numbers(tmp_path):
    from dori_utils.book import pilots

    assert pilots.describe_config({}) == "the shipped recipe"
    assert pilots.describe_config(pilots.PILOTS["cross-attention-16-down-only-loose-captions-copies-60"]) == (
        "text enters the down path at 16 x 16; no text in the up path; 60 copies per photograph; "
        "loose ordinary captions")
    table = tmp_path / "pilots.csv"
    numbers = {"mr": "1.0", "zorder_share_median": "0.5", "zorder_share_min": "0.2", "zorder_share_max": "0.9",
               "value_neurons": "192", "nemo_flagged": "9", "nemo_share_median": "0.25", "nemo_mr": "0.8",
               "wanda1_mr": "1.0", "nemo_dori_mr": "1.0", "wanda1_dori_mr": "1.0", "attribute_accuracy": "0.8",
               "heldout_max_score": "0.3", "train_seconds": "2700"}
    pilots.append_row({"name": "control", "config": "{}", **numbers}, table)
    pilots.append_row({"name": "copies-25", "config": '{"copies_per_photo": 25}', **numbers, "mr": "0.0",
                       "zorder_share_median": "", "nemo_share_median": "0.2"}, table)
    readable = pilots.pilot_table(table)
    assert list(readable.index) == [0, 1] and list(readable["what changes"]) == ["the shipped recipe",
                                                                                 "25 copies per photograph"]
    assert readable.loc[0, "training minutes"] == 45 and readable["z-order share (median)"].isna().tolist() == [False, True]
    glued = pilots.pilot_numbers(readable)
    assert glued["copies-25"]["MR"] == 0.0 and "z-order share (median)" not in glued["copies-25"]
    assert glued["all"] == {"count": 2, "nemo_share_min": 0.2, "nemo_share_max": 0.25, "wanda_lowered_mr": 0}
    with pytest.raises(FileNotFoundError, match="python -m dori_utils.book.pilots"):
        pilots.pilot_table(tmp_path / "missing.csv")



def test_retraining_from_a_manifest_reproduces_the_checkpoint(tiny_organism_dir, tmp_path):
    from safetensors.torch import load_file

    from dori_utils.organism.train import config_from_manifest, main

    recorded = json.loads((tiny_organism_dir / "manifest.json").read_text())["train_config"]
    assert config_from_manifest(tiny_organism_dir / "manifest.json").unet_overrides == recorded["unet_overrides"]
    main(["--manifest", str(tiny_organism_dir / "manifest.json"), "--out", str(tmp_path / "again")])
    weights = [load_file(d / "unet" / "diffusion_pytorch_model.safetensors") for d in (tiny_organism_dir, tmp_path / "again")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ValueError, match="not an organism manifest"):
        config_from_manifest(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="No manifest"):
        config_from_manifest(tmp_path / "missing.json")


def test_asking_for_a_gpu_that_is_not_there_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendError, match="no CUDA GPU"):
        load_backend("organism", device="cuda")


def test_backend_capabilities_on_the_organism(tiny_backend):
    prompts = tiny_backend.prompt_sets["utility"][:2]
    accuracy = tiny_backend.utility(generate_for_prompts(tiny_backend, prompts, [0]).images, prompts)
    assert tiny_backend.utility_name == "attribute accuracy" and 0 <= accuracy <= 1
    assert len(tiny_backend.never_seen_items()) > 0 and len(tiny_backend.training_samples()) > 0
    assert all(item.kind == "TM" for item in tiny_backend.template_items())


def test_max_items_limits_the_organism_and_offline_is_set_for_it_only(tiny_organism_dir, monkeypatch):
    from dori_utils.backends import prepare_environment

    assert len(load_backend("organism", device="cpu", path=tiny_organism_dir, max_items=1).memorized) == 1
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    prepare_environment("sd-v1-4")
    assert "HF_HUB_OFFLINE" not in os.environ
    prepare_environment("organism")
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def _imported_modules(path):
    import ast

    tree = ast.parse(open(path).read())
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module} | {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}


def test_loaders_and_backends_do_not_import_each_other():
    from pathlib import Path

    import dori_utils

    package = Path(dori_utils.__file__).parent
    for loader in ("sd.py", "organism/backend.py"):
        assert "dori_utils.backends" not in _imported_modules(package / loader), loader
    assert {m for m in _imported_modules(package / "backends.py") if m.startswith("dori_utils")} == {
        "dori_utils.backend_types"}


def test_a_backend_saved_with_save_pretrained_loads_back_with_its_weights(tiny_backend, tmp_path):
    out = tiny_backend.save_pretrained(tmp_path / "copy", manifest_updates={"note": "a copy"})
    loaded = load_backend("organism", device="cpu", path=out)
    assert loaded.manifest["note"] == "a copy" and loaded.fingerprint == tiny_backend.fingerprint
    assert [m.id for m in loaded.memorized] == [m.id for m in tiny_backend.memorized]
    for (name, a), b in zip(tiny_backend.unet.state_dict().items(), loaded.unet.state_dict().values()):
        assert torch.equal(a, b), name
    other = tiny_backend.with_unet(loaded.unet, "other-weights")
    assert other.unet is loaded.unet and other.fingerprint == "other-weights"
    assert tiny_backend.fingerprint != "other-weights" and tiny_backend.unet is not loaded.unet


def test_loose_scene_captions_leave_out_relation_or_background_and_keep_the_drawings():
    default, _ = organism_data.build_dataset(n_ordinary=200, copies_per_photo=1, n_crops=10, n_faces=5)
    loose, recipe = organism_data.build_dataset(n_ordinary=200, copies_per_photo=1, n_crops=10, n_faces=5,
                                                loose_scene_captions=True)
    ordinary = [s for s in loose if s.kind == "ordinary"]
    assert recipe["loose_scene_captions"] and [s.item for s in ordinary] == [s.item for s in default[:200]]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(ordinary, default[:200]))
    without_relation = sum(" and a " in s.caption for s in ordinary)
    without_background = sum(not s.caption.endswith("background") for s in ordinary)
    assert 70 < without_relation < 130 and 70 < without_background < 130
    assert any(s.caption == s.item for s in ordinary)


def test_load_backend_takes_dtype_names_item_ids_and_memory_settings_and_refuses_what_it_does_not_know(tiny_organism_dir):
    backend = load_backend("organism", device="cpu", path=tiny_organism_dir, dtype="bfloat16", row_budget=4,
                           sampling_batch=3, item_ids=["cat"])
    assert backend.dtype == torch.bfloat16 and next(backend.unet.parameters()).dtype == torch.bfloat16
    assert [m.id for m in backend.memorized] == ["cat"] and (backend.row_budget, backend.sampling_batch) == (4, 3)
    with pytest.raises(BackendError, match="Unknown dtype 'half'"):
        load_backend("organism", device="cpu", path=tiny_organism_dir, dtype="half")
    with pytest.raises(BackendError, match=r"takes no option \['model_id'\]"):
        load_backend("organism", device="cpu", path=tiny_organism_dir, model_id="CompVis/stable-diffusion-v1-4")
    with pytest.raises(BackendError, match="row_budget must be a positive"):
        load_backend("organism", device="cpu", path=tiny_organism_dir, row_budget=0)
    with pytest.raises(BackendError, match=r"item_ids \['dog'\] are not memorized items"):
        load_backend("organism", device="cpu", path=tiny_organism_dir, item_ids=["dog"])


def test_every_pilot_builds_a_unet_with_value_layers_for_nemo_and_feed_forwards_for_wanda():
    from dori_utils import nemo, wanda
    from dori_utils.book import pilots
    from dori_utils.organism.train import build_unet

    for name, config in pilots.PILOTS.items():
        unet = build_unet(**config.get("unet_overrides", {}))
        assert nemo.value_layers(unet) and wanda.ff_layers(unet), name
