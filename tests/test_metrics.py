import numpy as np
import pytest
import torch

from dori_utils import metrics
from dori_utils.organism import data as organism_data
from dori_utils.organism.attributes import attribute_accuracy, check_scene, parse_scene_caption


def test_ssim_is_one_for_a_copy_and_low_for_noise(generator):
    image = torch.rand(1, 3, 32, 32, generator=generator)
    assert metrics.ssim_score(image, image).item() == pytest.approx(1.0, abs=1e-5)
    assert metrics.ssim_score(torch.rand(4, 3, 32, 32, generator=generator), image).max() < 0.2
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        metrics.ssim_score(torch.rand(4, 1, 32, 32, generator=generator), torch.rand(1, 1, 32, 32, generator=generator))


def test_memorization_rate_uses_the_median_over_seeds(generator):
    scores = torch.tensor([[0.9, 0.9, 0.1], [0.9, 0.1, 0.1], [0.8, 0.8, 0.8]])
    assert metrics.memorization_rate(scores, 0.7) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="items x seeds"):
        metrics.memorization_rate(torch.rand(3, generator=generator), 0.7)
    with pytest.raises(ValueError, match="at least one item"):
        metrics.memorization_rate(torch.empty(0, 2), 0.7)


def test_memorization_rate_with_two_seeds_takes_the_mean_of_both():
    # torch.median would take the lower score (0.65) and call the first item not replicated
    scores = torch.tensor([[0.80, 0.65], [0.72, 0.60], [0.10, 0.95]])
    assert metrics.median_score(scores).tolist() == pytest.approx([0.725, 0.66, 0.525])
    assert metrics.memorization_rate(scores, 0.7) == pytest.approx(1 / 3)


def test_roc_auc_separates_perfectly_ordered_scores():
    assert metrics.roc_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert metrics.roc_auc([1.0, 2.0], [3.0, 4.0]) == 0.0


def test_sscd_preprocessing_resizes_without_cropping_and_normalises():
    x = metrics.sscd_preprocess(torch.ones(2, 3, 64, 48))
    assert x.shape == (2, 3, 320, 320)
    expected = (1 - torch.tensor(metrics.IMAGENET_MEAN)) / torch.tensor(metrics.IMAGENET_STD)
    assert torch.allclose(x[0, :, 100, 100], expected, atol=1e-4)


def test_attribute_checker_reads_real_scenes_and_rejects_wrong_captions():
    rng = np.random.default_rng(0)
    specs = organism_data.all_scene_specs()[::97]
    images = [organism_data.draw_scene(rng, *spec) for spec in specs]
    captions = [organism_data.scene_caption(*spec) for spec in specs]
    assert attribute_accuracy(images, captions)["overall"] > 0.95
    spec = parse_scene_caption(captions[0])
    wrong = organism_data.scene_caption(spec["colour_b"], spec["shape_a"], spec["relation"], spec["colour_a"],
                                        spec["shape_b"], spec["background"])
    assert not check_scene(images[0], wrong)["relation"]
    with pytest.raises(ValueError, match="Not a scene caption"):
        parse_scene_caption("a photo of a cat")
