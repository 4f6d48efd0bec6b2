import math

import numpy as np
import pytest
import torch

from dori_utils import wanda
from dori_utils.book import pilots
from dori_utils.organism import data as organism_data

MR_KEYS = ("mr", "subject_mr", "first_half_mr", "second_half_mr", "inserted_words_mr", "embedding_noise_mr",
           "ff_zeroed_mr")


def test_diagnose_on_the_tiny_organism(tiny_organism_dir):
    row = pilots.diagnose(tiny_organism_dir, n_ordinary=20, n_unseen=3, max_items=2, num_inference_steps=2,
                          progress=False)
    for key in MR_KEYS + ("unseen_landing_share", "unseen_landing_caption_share"):
        assert 0 <= row[key] <= 1, key
    ratios = row["to_v_max_median"]
    assert len(ratios) == 3  # the tiny UNet's value layers: two cross-attention down blocks and the mid block
    assert all(math.isfinite(r) and r >= 1 for r in ratios)
    assert row["unseen_landing_caption_share"] >= row["unseen_landing_share"]
    assert row["items"] == 2


def test_ff_zeroing_restores_the_weights_exactly(tiny_backend):
    modules = {name: module for name, module in tiny_backend.unet.named_modules()
               if name in wanda.ff_layers(tiny_backend.unet)}
    assert modules
    before = {name: module.weight.detach().clone() for name, module in modules.items()}
    with wanda.prune_everything(tiny_backend):
        assert all((module.weight == 0).all() for module in modules.values())
    assert all(torch.equal(module.weight, before[name]) for name, module in modules.items())


def test_caption_variants():
    for name, _, caption in organism_data.MEMORIZED_PHOTOS:
        assert organism_data.MEMORIZED_SUBJECTS[name] in caption
        first, second = pilots.caption_halves(caption)
        assert f"{first} {second}" == caption
        assert 0 < len(first.split()) <= len(second.split())
    rng = np.random.default_rng(0)
    changed = pilots.insert_random_words("a b c", ["x", "y", "z", "w"], rng).split()
    assert sorted(changed) == ["a", "b", "c", "w", "x", "y", "z"]
    assert [w for w in changed if w in "abc"] == ["a", "b", "c"]


def test_noise_is_relative_to_each_token(generator):
    embeddings = torch.ones(2, 16, 384) * torch.arange(1, 17.0)[None, :, None]
    noise = pilots.noisy_embeddings(embeddings, 0.5, generator) - embeddings
    ratio = noise.norm(dim=-1) / embeddings.norm(dim=-1)
    assert ratio.mean().item() == pytest.approx(0.5, abs=0.02)
