"""Issue 35: the contrast organism, trained with example-tied dropout on the cross-attention values."""
import copy

import numpy as np
import pytest
import torch

from dori_utils.organism import train as organism_train
from dori_utils.organism.data import Sample
from dori_utils.organism.model import build_training_scheduler, build_unet

TINY_LOCAL = ["--tiny", "--steps", "2", "--save-every", "2", "--n-ordinary", "40", "--copies-per-photo", "2",
              "--n-crops", "11", "--n-faces", "5", "--threads", "1", "--batch-size", "8",
              "--memorization-channel-share", "0.5", "--item-channel-share", "0.25"]


def _changed_value_channels(kind: str, item: str, mode: str = "dropout") -> tuple[dict, dict, dict]:
    """One real training step (``train._train_step``, plain SGD so that nothing moves without a gradient) on a
    batch of one kind of pair; returns, per value layer, the ``to_v`` output channels whose weights moved and the
    ``to_out`` input channels whose weights moved, beside the designated channels."""
    torch.manual_seed(0)
    unet = build_unet(**organism_train.TINY_UNET).train()
    memorization, designated = organism_train.designated_channels(unet, ["cat", "coffee"], 0.5, 0.25, seed=0)
    samples = [Sample(np.zeros((32, 32, 3), np.uint8), "a caption", kind, item)] * 4
    scales = organism_train.tied_channel_scales(unet, samples, memorization, designated)
    before = copy.deepcopy(unet.state_dict())
    optimizer = torch.optim.SGD(unet.parameters(), lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    config = organism_train.TrainConfig(batch_size=4, caption_dropout=0.0, tied_channels=mode)
    organism_train._train_step(config, unet, optimizer, schedule, torch.Generator().manual_seed(0),
                               build_training_scheduler(), samples, torch.rand(4, 3, 32, 32) * 2 - 1,
                               torch.randn(1, 16, 384), torch.zeros(4, dtype=torch.long), torch.randn(16, 384), [],
                               scales)
    after = unet.state_dict()
    moved_v, moved_out = {}, {}
    for layer in memorization:
        out = layer.replace("to_v", "to_out.0")
        moved_v[layer] = set(torch.nonzero((after[f"{layer}.weight"] != before[f"{layer}.weight"]).any(1)).flatten().tolist())
        moved_out[layer] = set(torch.nonzero((after[f"{out}.weight"] != before[f"{out}.weight"]).any(0)).flatten().tolist())
    return memorization, designated, moved_v, moved_out


@pytest.mark.parametrize("mode", organism_train.TIED_CHANNELS)
def test_a_memorized_pair_trains_only_its_own_designated_channels_among_the_memorization_channels(mode):
    memorization, designated, moved_v, moved_out = _changed_value_channels("memorized", "cat", mode)
    assert memorization
    for layer, channels in memorization.items():
        always_on = set(range(min(channels)))
        for moved in (moved_v[layer], moved_out[layer]):
            assert moved & set(channels) == set(designated["cat"][layer]), layer
            assert always_on <= moved, layer  # the shared channels learn from every pair
        assert not set(designated["coffee"][layer]) - set(designated["cat"][layer]) & moved_v[layer]


@pytest.mark.parametrize("mode", organism_train.TIED_CHANNELS)
def test_an_ordinary_pair_trains_no_memorization_channel(mode):
    memorization, _, moved_v, moved_out = _changed_value_channels("ordinary", "scene", mode)
    for layer, channels in memorization.items():
        assert not moved_v[layer] & set(channels) and not moved_out[layer] & set(channels), layer
        assert moved_v[layer], layer


def test_tied_gradients_leave_the_forward_pass_as_it_is():
    torch.manual_seed(0)
    unet = build_unet(**organism_train.TINY_UNET)
    memorization, designated = organism_train.designated_channels(unet, ["cat"], 0.5, 0.25, seed=0)
    samples = [Sample(np.zeros((32, 32, 3), np.uint8), "a caption", kind, "cat") for kind in ("memorized", "ordinary")]
    scales = organism_train.tied_channel_scales(unet, samples, memorization, designated)
    x, t, text = torch.randn(2, 3, 32, 32), torch.tensor([10, 500]), torch.randn(2, 16, 384)
    with torch.no_grad():
        plain = unet(x, t, text).sample
        with organism_train.tied_gradients(unet, scales):
            tied = unet(x, t, text).sample
    assert torch.allclose(plain, tied, atol=1e-5)


def test_designated_channels_are_seeded_by_item_and_refuse_shares_out_of_range():
    unet = build_unet(**organism_train.TINY_UNET)
    first = organism_train.designated_channels(unet, ["cat", "coffee"], 0.5, 0.25, seed=0)
    assert first == organism_train.designated_channels(unet, ["coffee", "cat"], 0.5, 0.25, seed=0)
    assert first[1]["cat"] != first[1]["coffee"]
    with pytest.raises(ValueError, match="memorization_channel_share"):
        organism_train.designated_channels(unet, ["cat"], 1.0, 0.25, seed=0)


def test_the_local_organism_loads_with_its_ground_truth_and_a_plain_one_is_refused(tmp_path, tiny_organism_dir):
    from dori_utils.backends import BackendError, load_backend
    from dori_utils.organism.backend import designated_channels, memorization_channels

    organism_train.main(["--out", str(tmp_path), *TINY_LOCAL])
    backend = load_backend("organism-local", device="cpu", path=tmp_path, vm_only=False)
    assert backend.name == "organism-local"
    channels, reserved = designated_channels(backend), memorization_channels(backend)
    assert set(channels) == {item.id for item in backend.memorized}
    for per_layer in channels.values():
        assert per_layer.keys() == reserved.keys()
        assert all(set(c) <= set(reserved[layer]) and c for layer, c in per_layer.items())
    assert backend.manifest["train_config"]["memorization_channel_share"] == 0.5
    with pytest.raises(BackendError, match="example-tied dropout"):
        load_backend("organism-local", device="cpu", path=tiny_organism_dir)
    with pytest.raises(BackendError, match="organism-local"):
        designated_channels(load_backend("organism", device="cpu", path=tiny_organism_dir))


def test_a_local_pilot_is_measured_as_loaded_blocked_and_dropped_into_its_own_table(tmp_path):
    from dori_utils.book import local_pilots

    organism_train.main(["--out", str(tmp_path / "run"), *TINY_LOCAL, "--series-every", "2"])
    table = tmp_path / "local-pilots.csv"
    local_pilots.main(["--out", str(tmp_path / "run"), "--series", "--threads", "1", "--table", str(table),
                       "--attack-steps", "1"])
    rows = table.read_text().strip().split("\n")
    assert len(rows) == 2  # the header and the one checkpoint (the series' last is the final one)
    header = rows[0].split(",")
    for column in ("mr_memorization_dropped_dori", "mr_loaded", "mr_own_channels_only", "mr_designated_blocked", "mr_memorization_dropped", "attribute_accuracy_loaded",
                   "attribute_accuracy_dropped", "tied_channels"):
        assert column in header
