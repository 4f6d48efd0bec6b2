"""The Stable Diffusion backend on a tiny random SD-1.x pipeline saved to disk: no Hub, no downloads."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from dori_utils.backends import BackendError, load_backend
from dori_utils.metrics import load_sscd, sscd_scorer
from dori_utils.sampling import generate

from dori_utils.book.tiny_sd import save_tiny_sscd as _save_tiny_sscd

# SSCD ships only as TorchScript, which torch 2.13 deprecates; the stand-in must be TorchScript too.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")

FIXTURES = Path(__file__).parent / "fixtures"
MEMORIZED = FIXTURES / "nemo_memorized_6.csv"
UNMEMORIZED = FIXTURES / "nemo_unmemorized_4.csv"
VM_IDS = ["1030727993", "567947515", "851022632"]


def _load(tiny_sd, **options):
    options = {"prompt_table": MEMORIZED, "unmemorized_table": UNMEMORIZED, "reference_seeds": (), **options}
    return load_backend("sd-v1-4", device="cpu", model_id=tiny_sd, **options)


@pytest.fixture(scope="module")
def backend(tiny_sd, tmp_path_factory):
    sscd_path = tmp_path_factory.mktemp("sscd") / "tiny_sscd.pt"  # written after loading: SSCD loads lazily
    backend = _load(tiny_sd, reference_seeds=(0, 1), sscd_path=str(sscd_path),
                    reference_cache=tmp_path_factory.mktemp("references"))
    _save_tiny_sscd(sscd_path)
    return backend


def test_loads_through_load_backend(backend):
    assert backend.name == "sd-v1-4"
    assert [m.id for m in backend.memorized] == VM_IDS
    assert {m.kind for m in backend.memorized} == {"VM"}
    assert backend.embedding_shape == (77, 32)
    assert backend.latent_shape == (4, 8, 8)
    assert backend.memorized[0].references.shape[-2:] == (16, 16)  # the VAE's 8 x 8 latents decode to 16 x 16
    assert backend.vae is not None and backend.tokenizer is not None and backend.manifest is None
    assert (backend.num_inference_steps, backend.guidance_scale, backend.replication_threshold) == (50, 7.0, 0.7)
    assert backend.embedding_spread == 1.0
    assert len(backend.prompt_sets["nonmemorized"]) == 4
    assert backend.prompt_sets["statistics"] == backend.prompt_sets["nonmemorized"]


def test_references_are_the_models_own_generations(backend):
    item = backend.memorized_item("567947515")
    assert item.reference_source == "unmitigated model's generation"
    assert item.references.shape == (2, 3, 16, 16)
    again = generate(backend, backend.encode_prompts([item.prompt] * 2), [0, 1])
    # stored as 8-bit images; another batch size is not bit-equal everywhere
    assert torch.allclose(again.images, item.references, atol=0.5 / 255 + 1e-5)


def test_shapes(backend, generator):
    embeddings = backend.encode_prompts(["a cat", "Sony Won't Release <i>The Interview</i> on VOD"])
    assert embeddings.shape == (2, 77, 32)
    assert backend.empty_embedding().shape == (1, 77, 32)
    images = torch.rand(3, 3, 16, 16, generator=generator)
    latents = backend.to_model_space(images)
    assert latents.shape == (3, 4, 8, 8)
    decoded = backend.to_image_space(latents)
    assert decoded.shape == (3, 3, 16, 16)
    assert decoded.min() >= 0 and decoded.max() <= 1


def test_seeded_generation_is_bit_identical(backend):
    embeddings = backend.encode_prompts(["a cat", "a dog"])
    first = generate(backend, embeddings, [3, 4], num_inference_steps=3)
    second = generate(backend, embeddings, [3, 4], num_inference_steps=3)
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.wen_scores, second.wen_scores)
    assert not torch.equal(first.images[0], first.images[1])


def test_wen_score_is_the_mean_of_per_step_norms(backend):
    from dori_utils.sampling import initial_noise

    embeddings = backend.encode_prompts(["a cat", "a dog"])
    samples = generate(backend, embeddings, [3, 4], num_inference_steps=3)
    assert samples.wen_per_step.shape == (2, 3)
    assert torch.allclose(samples.wen_scores, samples.wen_per_step.mean(dim=1))
    # The first step, recomputed by hand: conditional minus unconditional noise prediction on the initial noise.
    backend.scheduler.set_timesteps(3)
    t = backend.scheduler.timesteps[0]
    x = initial_noise(backend, [3, 4]) * backend.scheduler.init_noise_sigma
    with torch.no_grad():
        cond = backend.unet(x, t, embeddings).sample
        uncond = backend.unet(x, t, backend.empty_embedding().expand_as(embeddings)).sample
    assert torch.allclose(samples.wen_per_step[:, 0], (cond - uncond).flatten(1).norm(dim=1), rtol=1e-4)
    assert not torch.allclose(samples.wen_per_step[:, 0], samples.wen_per_step[:, 1])


def test_sscd_loads_lazily_and_scores(backend, generator):
    images = torch.rand(2, 3, 16, 16, generator=generator)
    scores = backend.replication_score(images, images[:1])
    assert scores.shape == (2,)
    assert scores[0] == pytest.approx(1.0, abs=1e-5)
    assert "SSCD" in backend.replication_metric and "320x320" in backend.replication_metric


def test_load_sscd_and_scorer(tmp_path, generator):
    model = load_sscd(str(_save_tiny_sscd(tmp_path / "sscd.pt")))
    score = sscd_scorer(model)
    images = torch.rand(3, 3, 32, 32, generator=generator)
    scores = score(images, images[1:])
    assert scores.shape == (3,)
    assert torch.allclose(scores[1:], torch.ones(2), atol=1e-5)


def test_all_items_and_max_items(tiny_sd):
    backend = _load(tiny_sd, vm_only=False, max_items=5)
    assert [m.kind for m in backend.memorized] == ["VM", "TM", "VM", "VM", "TM"]
    assert backend.memorized[0].reference_source == "none"
    assert backend.memorized[0].references.shape == (0, 3, 16, 16)


def test_item_ids_pick_items_in_their_order_and_unknown_ids_say_which(tiny_sd):
    backend = _load(tiny_sd, item_ids=[VM_IDS[2], VM_IDS[0]])
    assert [m.id for m in backend.memorized] == [VM_IDS[2], VM_IDS[0]]
    with pytest.raises(BackendError, match=r"item_ids \['42'\] are not in the memorized table"):
        _load(tiny_sd, item_ids=["42", VM_IDS[0]])


def test_reference_generations_are_cached_per_item_and_reused(tiny_sd, tmp_path, monkeypatch):
    from dori_utils import sampling

    first = _load(tiny_sd, reference_seeds=(0, 1), max_items=2, reference_cache=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    references = first.memorized[0].references
    assert references.shape == (2, 3, 16, 16) and torch.equal(references, (references * 255).round() / 255)

    def no_generation(*args, **kwargs):
        raise AssertionError("references were generated again")

    monkeypatch.setattr(sampling, "generate_for_prompts", no_generation)
    again = _load(tiny_sd, reference_seeds=(0, 1), item_ids=[VM_IDS[1], VM_IDS[0]], reference_cache=tmp_path)
    assert torch.equal(again.memorized[1].references, references)
    with pytest.raises(AssertionError, match="generated again"):  # other seeds are another entry
        _load(tiny_sd, reference_seeds=(0, 2), max_items=1, reference_cache=tmp_path)


def test_reference_images_are_sampled_in_the_profiles_batches(tiny_sd, tmp_path):
    from dori_utils.book import costs

    with costs.count_model_calls() as calls:
        backend = _load(tiny_sd, reference_seeds=(0, 1), max_items=2, reference_cache=None, sampling_batch=2,
                        num_inference_steps=2)
    assert backend.sampling_batch == 2
    references = [t for (phase, *_), t in calls.unet.items() if phase == "reference images"]
    # one prompt's two seeds per call, each with its guidance branch: 4 rows, not the 8 of both prompts at once
    assert references and max(t.max_rows_per_call for t in references) == 4


def test_ground_truth_dir(tiny_sd, tmp_path):
    for item_id in VM_IDS:
        (tmp_path / item_id).mkdir()
        Image.new("RGB", (64, 48), (0, 0, 255)).save(tmp_path / item_id / "0.png")
    backend = _load(tiny_sd, ground_truth_dir=tmp_path)
    item = backend.memorized[0]
    assert item.reference_source == "user-supplied ground truth"
    assert item.references.shape == (1, 3, 16, 16)
    assert torch.allclose(item.references[0, :, 5, 5], torch.tensor([0.0, 0.0, 1.0]))


def test_unreachable_hub_raises_backend_error(tmp_path):
    with pytest.raises(BackendError, match="HF_HOME") as raised:
        load_backend("sd-v1-4", device="cpu", model_id="dori-tests/no-such-model", cache_dir=str(tmp_path))
    message = str(raised.value)
    assert "HF_HUB_OFFLINE=1" in message and "save_pretrained" in message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_incomplete_local_directory_raises(tiny_sd, tmp_path):
    (tmp_path / "unet").symlink_to(Path(tiny_sd) / "unet")
    with pytest.raises(BackendError, match="not a complete Stable Diffusion checkpoint"):
        load_backend("sd-v1-4", device="cpu", model_id=str(tmp_path))


def test_unknown_backend_raises():
    with pytest.raises(BackendError, match="Unknown backend 'sd-v2'"):
        load_backend("sd-v2")


def test_the_books_methods_run_unchanged_on_the_sd_backend(backend):
    """Chapters switch backends by one parameter: every method must accept the SD backend as it is."""
    from dori_utils import analysis, attack, nemo, wanda
    from dori_utils.evaluation import evaluate_items

    items = backend.memorized[:2]
    statistics, threshold, localized = nemo.find_neurons(backend, items, n_statistics=4, n_calibration=4,
                                                           statistics="recompute")
    assert len(localized) == 2 and threshold > 0
    masks = wanda.pruning_masks(backend, backend.encode_prompts([i.prompt for i in items]), union_steps=2,
                               num_inference_steps=4)
    assert set(masks) == set(wanda.ff_layers(backend.unet))
    targets = torch.cat([i.references[:1] for i in items])
    start = backend.encode_prompts([i.prompt for i in items])
    with wanda.prune(backend, masks):
        found = attack.dori_attack(backend, targets, start, steps=2)
    assert found.embeddings.shape == start.shape and torch.isfinite(found.losses).all()
    evaluation = evaluate_items(backend, [5], found.embeddings, items=items, num_inference_steps=3)
    assert evaluation.scores.shape == (2, 1)
    activations = analysis.layer_activations(backend, found.embeddings, "nemo")
    assert list(activations) == nemo.value_layers(backend.unet)


def test_nemo_reads_published_statistics_in_nemos_format_and_checks_their_widths(backend, tmp_path, generator):
    """NeMo ships (means, stds), one tensor per value layer in its order; the tiny UNet has two such layers."""
    from dori_utils import nemo

    layers = nemo.value_layers(backend.unet)
    widths = [backend.unet.get_submodule(n).out_features for n in layers]
    means, stds = [torch.rand(w, generator=generator) for w in widths], [torch.rand(w, generator=generator) + 0.5 for w in widths]
    path = tmp_path / "statistics.pt"
    torch.save((means, stds), path)
    statistics = nemo.published_statistics(backend, path)
    assert list(statistics.mean) == layers and torch.equal(statistics.std[layers[-1]], stds[-1])
    torch.save(([torch.rand(320, generator=generator)] * len(widths), [torch.rand(320, generator=generator)] * len(widths)), path)
    with pytest.raises(ValueError, match="recompute the statistics"):
        nemo.published_statistics(backend, path)
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a NeMo statistics file"):
        nemo.published_statistics(backend, path)
    with pytest.raises(ValueError, match="statistics must be one of"):
        nemo.find_neurons(backend, [], statistics="laion")


def test_sd_encode_prompts_rejects_an_empty_list(backend):
    with pytest.raises(ValueError, match="at least one prompt"):
        backend.encode_prompts([])


def test_nemo_reads_published_statistics_only_for_a_model_of_sd_v1_4s_shapes(backend):
    import dataclasses

    from dori_utils import nemo

    assert nemo.default_statistics_source(backend) == "recompute"  # the tiny pipeline's layers are narrower
    full_size = dataclasses.replace(backend, embedding_shape=(77, 768), latent_shape=(4, 64, 64))
    assert nemo.default_statistics_source(full_size) == "published"
