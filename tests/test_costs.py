"""Counting the UNet and VAE calls of a run, and turning them into GPU estimates."""
import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from dori_utils.book import costs


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=4, norm_num_groups=8).requires_grad_(False)


def test_calls_are_counted_by_phase_mode_and_rows(unet, monkeypatch):
    x, t = torch.randn(3, 4, 8, 8), torch.tensor(10)
    text = torch.randn(3, 5, 8)

    def dori_attack():  # a phase is read off the functions on the stack
        embedding = text.clone().requires_grad_(True)
        unet(x[:2], t, embedding[:2]).sample.sum().backward()

    @torch.no_grad()  # found under its decorator
    def reference_generations():
        unet(x, t, text)

    def evaluate_items():
        reference_generations()  # references inside an evaluation count as references

    phases = {name: () for name in costs.PHASES}
    phases.update({"reference images": (reference_generations,), "Dori": (dori_attack,),
                   "sampling and evaluation": (evaluate_items,)})
    monkeypatch.setattr(costs, "_RANK", costs.phase_ranks(phases))
    with costs.count_model_calls() as calls:
        dori_attack()
        dori_attack()
        evaluate_items()
        with torch.no_grad():
            unet(x[:1], t, text[:1])
        unet.requires_grad_(True)
        unet.enable_gradient_checkpointing()
        unet.train()
        unet(x, t, text)
        unet.disable_gradient_checkpointing()
        unet.eval().requires_grad_(False)
    unet(x, t, text)  # after the block: not counted, the class is restored
    assert UNet2DConditionModel.forward is not None and "counted" not in UNet2DConditionModel.forward.__name__
    tallies = {key: (tally.rows, tally.calls, tally.max_rows_per_call) for key, tally in calls.unet.items()}
    assert {tally.max_live_unet_bytes for tally in calls.unet.values()} == {4}  # one float32 UNet
    assert tallies == {("Dori", "embedding-grad", "float32", False): (4, 2, 2),
                       ("reference images", "forward", "float32", False): (3, 1, 3),
                       ("other", "forward", "float32", False): (1, 1, 1),
                       ("other", "weight-grad", "float32", True): (3, 1, 3)}
    assert costs.ModelCalls.from_dict(calls.to_dict()).to_dict() == calls.to_dict()


def test_every_phase_is_a_function_of_the_package_and_none_is_in_two_phases():
    functions = [function for group in costs.PHASES.values() for function in group]
    assert all(callable(f) and f.__module__.startswith("dori_utils") for f in functions)
    assert len(costs.phase_ranks(costs.PHASES)) == len(functions)


def test_vae_images_are_counted_with_their_dtype():
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=4)
    with costs.count_model_calls() as calls, torch.no_grad():
        vae.decode(vae.encode(torch.randn(2, 3, 8, 8)).latent_dist.mode())
    assert dict(calls.vae) == {("other", "encode", "float32"): 2, ("other", "decode", "float32"): 2}


def _calls(mode, dtype, checkpointing, rows=1000, per_call=8, live_dtypes=None):
    live_dtypes = live_dtypes or [dtype]
    live_bytes = sum(getattr(torch, d).itemsize for d in live_dtypes)
    calls = costs.ModelCalls()
    calls.unet[("Dori", mode, dtype, checkpointing)] = costs.CallTally(rows, rows // per_call, per_call,
                                                                       len(live_dtypes), live_bytes)
    return calls


def test_estimates_follow_the_flops_and_the_saved_activations():
    half, full = (costs.estimate(_calls("embedding-grad", d, False), "A100") for d in ("float16", "float32"))
    assert full["hours"] == pytest.approx(half["hours"] * 312 / 19.5)
    assert full["peak_gb"] > half["peak_gb"]
    checkpointed = costs.estimate(_calls("embedding-grad", "float16", True), "A100")
    assert checkpointed["hours"] > half["hours"] and checkpointed["peak_gb"] < half["peak_gb"]
    assert half["hours_by_phase"] == {"Dori": pytest.approx(half["hours"])}
    # four live UNets in float32 and a weight-gradient call do not fit a T4; one float16 row without does
    assert not costs.estimate(_calls("weight-grad", "float32", True, live_dtypes=["float32"] * 4), "T4")["fits"]
    # each live UNet weighs what its own dtype does: three float16 models beside the float32 one in training
    mixed = costs.estimate(_calls("weight-grad", "float32", True, live_dtypes=["float16"] * 3 + ["float32"]), "T4")
    alone = costs.estimate(_calls("weight-grad", "float32", True), "T4")
    assert mixed["peak_gb"] - alone["peak_gb"] == pytest.approx(3 * 2 * costs.PARAMETERS["unet"] / 1e9)
    assert costs.estimate(_calls("embedding-grad", "float16", True, per_call=1), "T4")["fits"]
    adamw = costs.estimate(_calls("weight-grad", "float32", True), "A100", optimizer="adamw")
    assert adamw["peak_gb"] > costs.estimate(_calls("weight-grad", "float32", True), "A100")["peak_gb"]
    statistics = costs.ModelCalls()
    statistics.unet[("NeMo statistics", "forward", "float16", False)] = costs.CallTally(5000, 20, 256, 1, 2)
    assert costs.estimate(statistics, "T4")["hours"] == 0


def test_estimate_rejects_what_it_does_not_know():
    with pytest.raises(ValueError, match="known: \\['A100', 'T4'\\]"):
        costs.estimate(costs.ModelCalls(), "H100")
    with pytest.raises(ValueError, match="optimizer"):
        costs.estimate(costs.ModelCalls(), "T4", optimizer="sgd")


def _per_item(n):
    """Calls of a run on n items: 100 reference rows and 8 attack rows per item beside 50 fixed control rows, one
    phase that only shows from three items on, and two decoded images per item."""
    calls = costs.ModelCalls()
    calls.unet[("reference images", "forward", "float16", False)] = costs.CallTally(100 * n, 10 * n, 8, 1, 2)
    calls.unet[("Dori", "embedding-grad", "float16", False)] = costs.CallTally(8 * n + 50, n + 50, 8, 1, 2)
    if n >= 3:
        calls.unet[("NeMo", "forward", "float16", False)] = costs.CallTally(4 * (n - 2), n - 2, 4, 2, 4)
    calls.vae[("reference images", "decode", "float16")] = 2 * n
    return calls


def test_calls_are_extrapolated_along_their_per_item_slope():
    grown = costs.extrapolate_calls(_per_item(2), _per_item(4), 2, 4, 112)
    assert grown.to_dict() == _per_item(112).to_dict()
    assert costs.extrapolate_calls(_per_item(2), _per_item(4), 2, 4, 1).unet[
        ("reference images", "forward", "float16", False)].rows == 100
    for bad in [(4, 2, 112), (0, 4, 112), (2, 4, 0)]:
        with pytest.raises(ValueError, match="item"):
            costs.extrapolate_calls(_per_item(2), _per_item(4), *bad)


def test_the_table_marks_extrapolated_chapters():
    entry = {"calls": {}, "estimates": {gpu: costs.estimate(_per_item(112), gpu) for gpu in costs.GPUS}}
    record = {"profiles": {"colab": {"00_memorization": entry, "02_trigger_spread": entry},
                           "sd-v1-4": {"00_memorization": {**entry, "items": 112, "extrapolated_from_items": [2, 4]}}}}
    lines = costs.cost_table(record).splitlines()
    assert lines[2].endswith("GB\\* |") and lines[3].endswith("| - | - |")
    assert lines[4].endswith(" h without 02 (not counted) |") and "without" not in lines[4].split("|")[2]
    assert lines[-1] == "\\* Counted at 2 and 4 items and extrapolated to 112 (`costs.extrapolate_calls`: each " \
                        "count affine in the items)."


def test_the_pages_show_the_committed_cost_table():
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    table = costs.cost_table(json.loads((root / "benchmarks" / "results" / "chapter-costs.json").read_text()))
    for page in ("intro.md", "README.md"):
        text = (root / page).read_text()
        assert costs.replace_cost_table(text, table) == text, f"{page}: rerun benchmarks/chapter_costs.py"


def test_a_page_without_markers_is_a_clear_error():
    with pytest.raises(ValueError, match="chapter-costs:start"):
        costs.replace_cost_table("no table here", "| a |")


def test_run_time_note_reads_the_timings_and_the_estimates(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "results" / "timings-organism.json").write_text(json.dumps({
        "machine": {"cpu_count": 2},
        "chapters": [{"chapter": "chapters/01_x.ipynb", "status": "ok", "seconds": 90, "finished": "2026-12-07T10:00"},
                     {"chapter": "chapters/02_y.ipynb", "status": "failed", "seconds": None, "finished": "2026"}]}))
    (tmp_path / "benchmarks" / "results" / "chapter-costs.json").write_text(json.dumps(
        {"profiles": {"colab": {"01_x": {"estimates": {"T4": {"hours": 0.74, "peak_gb": 5.2, "fits": True}}},
                                "02_y": {"estimates": {"T4": {"hours": 3.0, "peak_gb": 21, "fits": False}}},
                                "04_w": {"estimates": {"T4": {"hours": 0.04, "peak_gb": 3, "fits": True}}}}}}))
    assert costs.run_time_note("01_x", tmp_path) == (
        "*Run time: 1.5 minutes on the organism (2 CPU cores, the book's run of 2026-12-07); about 0.7 h and 5 GB "
        "on a Colab T4 with Stable Diffusion (`colab` profile; estimated).*")
    assert "not yet timed" in costs.run_time_note("02_y", tmp_path)  # a failed run is no time
    assert "does not fit" in costs.run_time_note("02_y", tmp_path)
    assert costs.run_time_note("03_z", tmp_path).endswith("not yet estimated on a GPU.*")
    assert "about 2 minutes and 3 GB on a Colab T4" in costs.run_time_note("04_w", tmp_path)  # not "0.0 h"
