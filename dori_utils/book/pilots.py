"""Pilot organisms: train one configuration, then measure whether pruning looks like a fix on it.

``python -m dori_utils.book.pilots --name no-up-cross-attention`` trains the named configuration (one lever against the
shipped organism's recipe, see ``PILOTS``) into ``--out`` and measures it; ``--measure-only DIR`` measures a
checkpoint that is already there. Each run appends one row to ``results/organism/pilots.csv``: the configuration,
the steps, the numbers below and the time, failures included.

What a row measures, on the verbatim items (evaluation seeds 10 and 11, as chapter 1):

- MR unmitigated; attribute accuracy and the highest replication score of held-out scene captions;
- z-order blocking: the share of NeMo's value neurons that must be blocked, in |z| order, before a photograph
  stops replicating (first seed; median and range over the replicating items);
- NeMo as its authors run it: items flagged, neurons selected per flagged item (median), MR under each item's
  own neurons;
- Wanda at 1%: MR and attribute accuracy under the mask;
- Dori, 50 steps from the prompt, on the first three items under NeMo and under Wanda 1%: MR.

``--series-every 250`` also keeps a checkpoint every 250 steps under ``<out>/series/step-NNNNN/``, ``--resume``
continues an interrupted training from its last checkpoint, and ``--measure-only --series-step 1000`` (or
``latest``, or ``all``) measures the series checkpoints instead of the last one; each row then records its steps
and the checkpoint's folder.

``--diagnose`` measures instead why a checkpoint is or is not local (see ``diagnose``) and appends its row to a
table of its own, ``results/organism/pilot-diagnostics.csv``, so that the pilot table that chapter 0 reads does
not change.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dori_utils import attack, hooks, nemo, wanda
from dori_utils.backends import load_backend
from dori_utils.evaluation import evaluate_items, score_against_all_references
from dori_utils.organism.model import UNET_CONFIG
from dori_utils.organism.train import TrainConfig, series_checkpoint, series_steps, train_organism
from dori_utils.book.results import REPOSITORY_ROOT

EVAL_SEEDS = [10, 11]
PILOT_TABLE = REPOSITORY_ROOT / "results" / "organism" / "pilots.csv"
# The pilot numbers of checkpoints part of the way through a training (series checkpoints, a stopped run): kept
# out of PILOT_TABLE, whose rows chapter 0 shows as finished pilots.
PILOT_SERIES_TABLE = REPOSITORY_ROOT / "results" / "organism" / "pilot-series.csv"
DIAGNOSTICS_TABLE = REPOSITORY_ROOT / "results" / "organism" / "pilot-diagnostics.csv"

# One lever each, against the shipped recipe ("control"); the issue lists them most promising first.
PILOTS = {
    "control": {},
    # Text reaches the image only through NeMo's layers (down and mid blocks).
    "no-up-cross-attention": {"unet_overrides": {"up_block_types": ["UpBlock2D"] * 4}},
    # Closer to SD, whose NeMo neurons sit mostly in its first, highest-resolution cross-attention: text at 16 x 16.
    "cross-attention-16": {"unet_overrides": {
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}},
    # Levers 1 and its SD-like variant together: text enters at 16 x 16 in the down path, and only there and in
    # the mid block (NeMo's layers), so every text path is one that NeMo searches.
    "cross-attention-16-down-only": {"unet_overrides": {
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["UpBlock2D"] * 4}},
    # Memorization closer to LAION's rarity: 25 copies per photograph instead of 80.
    "copies-25": {"copies_per_photo": 25},
    # Levers 1 and 2 together: text only through NeMo's layers, and memorization held by fewer copies (40).
    "no-up-cross-attention-copies-40": {"copies_per_photo": 40,
                                        "unet_overrides": {"up_block_types": ["UpBlock2D"] * 4}},
    # Lever 3 on the best lever-1 run (no up-block cross-attention, 80 copies: MR 1.0, z-order share 57%): the
    # second half of each memorized caption also ends unrelated natural captions, so only its combination with
    # the first half is unique, as a LAION caption's words are not.
    "no-up-cross-attention-shared-words": {"shared_caption_words": True,
                                           "unet_overrides": {"up_block_types": ["UpBlock2D"] * 4}},
    # Lever 5 on the same lever-1 run: three in four ordinary captions leave out the relation, the background or
    # both, so text steers ordinary samples weakly and only the memorized captions pin their images down.
    "no-up-cross-attention-loose-captions": {"loose_scene_captions": True,
                                             "unet_overrides": {"up_block_types": ["UpBlock2D"] * 4}},
    # The "combine the best two": levers 3 and 5 were the two that lowered NeMo's MR on the lever-1 run
    # (0.70 and 0.40, from 0.80), so both on it.
    "no-up-cross-attention-shared-words-loose-captions": {
        "shared_caption_words": True, "loose_scene_captions": True,
        "unet_overrides": {"up_block_types": ["UpBlock2D"] * 4}},
    # Lever 2 between the two lever-1 runs that bracket it (80 copies: MR 1.0; 40 copies: MR 0.20), with lever 5,
    # the one that lowered NeMo's MR most (0.40): fewer copies should leave each memorized image held more
    # narrowly, if memorization survives at 60.
    "no-up-cross-attention-loose-captions-copies-60": {
        "copies_per_photo": 60, "loose_scene_captions": True,
        "unet_overrides": {"up_block_types": ["UpBlock2D"] * 4}},
    # Lever 4 on the lever-1 + lever-5 run (80 copies: MR 1.0, NeMo MR 0.40): twice the channels in the three
    # blocks at 16 x 16 and below, so each of NeMo's layers holds 128 value neurons instead of 64. Widening the
    # blocks widens everything in them, not only the value projections; diffusers ties a Transformer2DModel's
    # width to its block's, and a wider `to_v` alone would need an attention processor of our own.
    "no-up-cross-attention-loose-captions-wide": {
        "loose_scene_captions": True,
        "unet_overrides": {"up_block_types": ["UpBlock2D"] * 4, "block_out_channels": [32, 128, 128, 128]}},
    # Lever 1's SD-like variant on the lever-1 + lever-5 run: text enters at 16 x 16 in the down path too, where
    # SD's NeMo neurons mostly are, and nowhere in the up path, so NeMo searches every text path (4 layers, 256
    # value neurons). Lever 4 (wider) spread memorization wider; this asks whether a higher-resolution text path
    # concentrates it.
    "cross-attention-16-down-only-loose-captions": {
        "loose_scene_captions": True,
        "unet_overrides": {
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["UpBlock2D"] * 4}},
    # The best two levers combined: text at 16 x 16 in the down path only (lever 1, z-order median 44% at MR 1.0)
    # with 60 copies (lever 2, which lowered the z-order median from 65% to 30% on the no-up run at MR 0.80),
    # both with lever 5's loose captions.
    "cross-attention-16-down-only-loose-captions-copies-60": {
        "copies_per_photo": 60, "loose_scene_captions": True,
        "unet_overrides": {
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["UpBlock2D"] * 4}},
    # Issue 30's lever "keys made of combinations", on the shipped recipe (pilot 9): the shipped organism's
    # captions are keyed by any one of their words (the subject alone replicates 9 of 10). Here every phrase of
    # every memorized caption (opening, subject, each modifier) also occurs in 24 natural pairs of its own and as
    # a filler in others, recombined with the other captions' phrases and paired with crops of other photographs
    # (720 pairs; each content word in 44-111 other captions), so that only the whole caption is unique.
    "cross-attention-16-down-only-loose-captions-combination-keys": {
        "loose_scene_captions": True, "combination_keys": 24,
        "unet_overrides": {
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["UpBlock2D"] * 4}},
    # Issue 30's lever "SD's text path", on the combination keys: a transformer block (cross-attention and a GEGLU
    # feed-forward) at 32 x 32 in the first down block, text at 32, 16 and 8 in the down path and in the last
    # three up blocks, as SD v1.4 has it at 64, 32 and 16. NeMo's layer set follows the architecture as NeMo's
    # follows SD's (the down and mid blocks: 4 value layers); most of SD's NeMo neurons sit in its first,
    # highest-resolution layer, which the organism never had. About 9 s per training step on one CPU thread
    # (self-attention over 1,024 positions): a run for a GPU.
    "sd-text-path-loose-captions-combination-keys": {
        "loose_scene_captions": True, "combination_keys": 24,
        "unet_overrides": {
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}},
    # The same lever at a CPU's cost: the text path starts at 32 x 32 in the first down block, whose transformer
    # attends to the text in place of itself (``only_cross_attention``: self-attention over 1,024 positions is
    # what made the SD layout 5x slower), and the up path keeps no text, as lever 1 found best. About 1.5 s per
    # step on one thread, like the shipped recipe.
    "cross-attention-32-down-only-loose-captions-combination-keys": {
        "loose_scene_captions": True, "combination_keys": 24,
        "unet_overrides": {
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D"] * 4, "only_cross_attention": [True, False, False, False]}},
}


def measure(path: str | Path, n_heldout: int = 48, n_attacked: int = 3, attack_steps: int = 50,
            max_items: int | None = None, num_inference_steps: int | None = None, progress: bool = True) -> dict:
    """The pilot numbers of one organism checkpoint (about 4 minutes on 2 CPU cores); ``max_items`` and
    ``num_inference_steps`` shrink it for tests."""
    from dori_utils.sampling import generate_for_prompts

    backend = load_backend("organism", device="cpu", path=path)
    backend.num_inference_steps = num_inference_steps or backend.num_inference_steps
    items = backend.memorized[:max_items]
    embeddings = backend.encode_prompts([item.prompt for item in items])
    row = {}
    unmitigated = evaluate_items(backend, EVAL_SEEDS, embeddings, items=items)
    row["mr"] = unmitigated.mr
    pool = backend.prompt_sets["heldout_ordinary"]
    heldout = list(np.random.default_rng(2).choice(pool, min(n_heldout, len(pool)), replace=False))
    images = generate_for_prompts(backend, heldout, [0]).images
    row["attribute_accuracy"] = backend.utility(images, heldout)
    row["heldout_max_score"] = score_against_all_references(backend, images)[0].max().item()

    search = nemo.find_neurons(backend, items, progress=progress)
    statistics, threshold, localized = search
    n_value = search.n_value_neurons
    needed = [k for k, _ in nemo.neurons_needed(backend, items, statistics, seeds=EVAL_SEEDS[:1]) if k > 0]
    row["zorder_share_median"] = float(np.median(needed)) / n_value if needed else None
    row["zorder_share_min"] = min(needed) / n_value if needed else None
    row["zorder_share_max"] = max(needed) / n_value if needed else None
    flagged = [r for r in localized if r.memorized]
    row["nemo_threshold"] = threshold
    row["nemo_flagged"] = len(flagged)
    row["nemo_share_median"] = float(np.median([r.count for r in flagged])) / n_value if flagged else None
    blocking = nemo.per_item_blocking(backend, localized)
    row["nemo_mr"] = evaluate_items(backend, EVAL_SEEDS, embeddings, items=items, row_context=blocking).mr

    masks = wanda.pruning_masks(backend, embeddings, sparsity=0.01, union_steps=min(10, backend.num_inference_steps))
    with wanda.prune(backend, masks):
        row["wanda1_mr"] = evaluate_items(backend, EVAL_SEEDS, embeddings, items=items).mr
        row["wanda1_attribute_accuracy"] = backend.utility(generate_for_prompts(backend, heldout, [0]).images, heldout)

    attacked = items[:n_attacked]
    targets = torch.cat([item.references[:1] for item in attacked])
    # the attack's rows index the first items, so each is attacked under its own NeMo neurons
    found = attack.dori_attack(backend, targets, embeddings[:n_attacked], steps=attack_steps, row_context=blocking)
    row["nemo_dori_mr"] = evaluate_items(backend, EVAL_SEEDS, found.embeddings, items=attacked, row_context=blocking).mr
    with wanda.prune(backend, masks):
        found = attack.dori_attack(backend, targets, embeddings[:n_attacked], steps=attack_steps, seed=2)
        row["wanda1_dori_mr"] = evaluate_items(backend, EVAL_SEEDS, found.embeddings, items=attacked).mr
    row["value_neurons"] = n_value
    return row


def caption_subject(item) -> str:
    """What a memorized photograph shows, in its caption's words (``organism.data.MEMORIZED_SUBJECTS``, written by
    hand with the captions: the noun phrase naming the pictured thing, "an officer" for "a portrait of an officer
    in a navy uniform")."""
    from dori_utils.organism.data import MEMORIZED_SUBJECTS

    if item.id not in MEMORIZED_SUBJECTS:
        raise KeyError(f"No subject for the memorized item {item.id!r}: add one to "
                       "dori_utils.organism.data.MEMORIZED_SUBJECTS")
    return MEMORIZED_SUBJECTS[item.id]


def caption_halves(caption: str) -> tuple[str, str]:
    """The caption's words split in two at the middle word (the second half is the longer one for an odd count, as
    ``organism.data.shared_caption_halves`` splits them)."""
    words = caption.split()
    return " ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2 :])


def insertion_vocabulary(backend) -> list[str]:
    """Ordinary words to insert: every alphabetic word of the training scene captions (``prompt_sets
    ["training_ordinary"]``), less the words of the memorized captions, sorted (so a seed fixes a draw). On the
    organism: 12 words of colour, shape, relation and background. The natural captions' words are left out: many
    of them key a photograph of their own ("moon", "galaxies"), and inserting those pulled generations to it.

    The organism's text encoder reads 16 tokens: 4 inserted words push the end of the longer captions out."""
    memorized = {word for item in backend.memorized for word in item.prompt.split()}
    words = {word.strip(",.:;") for caption in backend.prompt_sets["training_ordinary"] for word in caption.split()}
    return sorted(word for word in words - memorized if word.isalpha())


def insert_random_words(caption: str, vocabulary: list[str], rng: np.random.Generator, n: int = 4) -> str:
    """Somepalli et al.'s mitigation: ``n`` distinct words of ``vocabulary``, each at a random position."""
    words = caption.split()
    for word in rng.choice(vocabulary, n, replace=False):
        words.insert(int(rng.integers(len(words) + 1)), str(word))
    return " ".join(words)


def noisy_embeddings(embeddings: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise on every token of N x L x D embeddings, of norm about ``scale`` times the token's norm
    (per-coordinate std scale * ||token|| / sqrt(D)), drawn from ``generator`` on the CPU."""
    noise = torch.randn(embeddings.shape, generator=generator)
    std = scale * embeddings.float().cpu().norm(dim=-1, keepdim=True) / embeddings.shape[-1] ** 0.5
    return embeddings + (noise * std).to(embeddings.device, embeddings.dtype)


def value_channel_peaks(backend, prompts: list[str]) -> list[float]:
    """Per NeMo value layer, in forward order: the largest channel's mean |``to_v`` output| over ``prompts``,
    divided by the median channel's (1 for flat channels; SD v1.4's first four layers: 6.7-17.2)."""
    activations = nemo.value_activations(backend, backend.encode_prompts(prompts))
    means = [activations[name].mean(dim=0) for name in nemo.value_layers(backend.unet)]
    return [(mean.max() / mean.quantile(0.5).clamp_min(1e-12)).item() for mean in means]


def diagnose(path: str | Path, n_ordinary: int = 200, n_unseen: int | None = None, n_inserted: int = 4,
             noise_scale: float = 0.5, seed: int = 0, max_items: int | None = None,
             num_inference_steps: int | None = None, progress: bool = True) -> dict:
    """Why an organism checkpoint is or is not local: how much of a memorized caption keys its photograph, how
    robust the key is, where the model holds it. On the verbatim items with ``EVAL_SEEDS``, as ``measure``:

    - ``mr``: MR of the whole caption (what the others compare with);
    - ``subject_mr``: MR of the subject alone (``caption_subject``: "a cup of coffee", "old coins");
    - ``first_half_mr``, ``second_half_mr``: MR of each half of the caption's words (``caption_halves``);
    - ``inserted_words_mr``: MR with ``n_inserted`` words of ``insertion_vocabulary`` inserted at random positions
      (Somepalli et al.'s mitigation; one draw per caption, numpy generator seeded with ``seed``);
    - ``embedding_noise_mr``: MR with Gaussian noise of about ``noise_scale`` times each token's norm on the caption
      embedding (``noisy_embeddings``; one draw per caption, torch generator seeded with ``seed``);
    - ``ff_zeroed_mr``: MR with every ``ff.net.2`` weight zeroed (``wanda.prune_everything``);
    - ``to_v_max_median``: per NeMo value layer in forward order (``nemo.value_layers``), the max/median ratio over
      channels of the mean |``to_v`` output| over ``n_ordinary`` training scene captions drawn with ``seed``;
    - ``unseen_landing_share``: the share of generations of the unseen natural captions (the first ``n_unseen``
      of ``prompt_sets["unseen_natural"]``, all by default; ``EVAL_SEEDS`` each) whose replication score against
      any memorized photograph exceeds the threshold; ``unseen_landing_caption_share``: the share of those
      captions with at least one such generation.

    ``max_items`` and ``num_inference_steps`` shrink it for tests.
    """
    from dori_utils.sampling import generate_for_prompts

    backend = load_backend("organism", device="cpu", path=path)
    backend.num_inference_steps = num_inference_steps or backend.num_inference_steps
    items = backend.memorized[:max_items]
    captions = [item.prompt for item in items]
    embeddings = backend.encode_prompts(captions)

    def mr(prompts=None, caption_embeddings=None, context=None) -> float:
        if caption_embeddings is None:
            caption_embeddings = backend.encode_prompts(prompts)
        return evaluate_items(backend, EVAL_SEEDS, caption_embeddings, items=items, context=context,
                              progress=progress).mr

    row = {"mr": mr(caption_embeddings=embeddings)}
    row["subject_mr"] = mr([caption_subject(item) for item in items])
    halves = [caption_halves(caption) for caption in captions]
    row["first_half_mr"] = mr([first for first, _ in halves])
    row["second_half_mr"] = mr([second for _, second in halves])
    vocabulary = insertion_vocabulary(backend)
    rng = np.random.default_rng(seed)
    row["inserted_words_mr"] = mr([insert_random_words(c, vocabulary, rng, n_inserted) for c in captions])
    noisy = noisy_embeddings(embeddings, noise_scale, torch.Generator().manual_seed(seed))
    row["embedding_noise_mr"] = mr(caption_embeddings=noisy)
    row["ff_zeroed_mr"] = mr(caption_embeddings=embeddings, context=wanda.prune_everything(backend))

    pool = backend.prompt_sets["training_ordinary"]
    ordinary = list(np.random.default_rng(seed).choice(pool, min(n_ordinary, len(pool)), replace=False))
    row["to_v_max_median"] = value_channel_peaks(backend, ordinary)

    unseen = backend.prompt_sets["unseen_natural"][:n_unseen]
    images = generate_for_prompts(backend, unseen, EVAL_SEEDS, progress=progress).images
    landed = score_against_all_references(backend, images)[0] > backend.replication_threshold
    row["unseen_landing_share"] = landed.float().mean().item()
    row["unseen_landing_caption_share"] = landed.view(len(unseen), len(EVAL_SEEDS)).any(dim=1).float().mean().item()
    row["items"] = len(items)
    return row


def describe_config(config: dict) -> str:
    """What a pilot changes against the shipped recipe, in words read off its configuration."""
    defaults = TrainConfig()
    unet = {**UNET_CONFIG, **config.get("unet_overrides", {})}
    changes = []
    down = list(unet["down_block_types"])
    if down != list(UNET_CONFIG["down_block_types"]):
        first = next(i for i, kind in enumerate(down) if kind.startswith("CrossAttn"))
        size = unet["sample_size"] // 2 ** first
        changes.append(f"text enters the down path at {size} x {size}")
    if list(unet["up_block_types"]) != list(UNET_CONFIG["up_block_types"]):
        text_up = sum(kind.startswith("CrossAttn") for kind in unet["up_block_types"])
        changes.append("no text in the up path" if not text_up else f"text in {text_up} up blocks")
    if tuple(unet["block_out_channels"]) != tuple(UNET_CONFIG["block_out_channels"]):
        changes.append(f"channels {tuple(unet['block_out_channels'])}")
    copies = config.get("copies_per_photo", defaults.copies_per_photo)
    if copies != defaults.copies_per_photo:
        changes.append(f"{copies} copies per photograph")
    if config.get("shared_caption_words"):
        changes.append("memorized captions of shared words")
    if config.get("loose_scene_captions"):
        changes.append("loose ordinary captions")
    if config.get("combination_keys"):
        changes.append(f"memorized captions' phrases recombined in {config['combination_keys']} other pairs each")
    return "; ".join(changes) or "the shipped recipe"


def pilot_table(table: str | Path = PILOT_TABLE) -> pd.DataFrame:
    """The committed pilot rows, numbered in the order they ran, with readable columns (shares as fractions)."""
    table = Path(table)
    if not table.exists():
        raise FileNotFoundError(f"No pilot table at {table}: run `python -m dori_utils.book.pilots --name control` "
                                "to start one.")
    rows = pd.read_csv(table)
    if rows.empty:
        raise ValueError(f"The pilot table {table} has no rows: run a pilot first.")
    columns = {"mr": "MR", "zorder_share_median": "z-order share (median)", "zorder_share_min": "z-order min",
               "zorder_share_max": "z-order max", "value_neurons": "value neurons searched",
               "nemo_flagged": "NeMo flagged", "nemo_share_median": "NeMo share (median)", "nemo_mr": "NeMo MR",
               "wanda1_mr": "Wanda 1% MR", "nemo_dori_mr": "NeMo + Dori MR", "wanda1_dori_mr": "Wanda + Dori MR",
               "attribute_accuracy": "attribute accuracy", "heldout_max_score": "held-out max score"}
    readable = rows[["name", *columns]].rename(columns=columns).rename_axis("pilot")
    readable.insert(1, "what changes", [describe_config(json.loads(c)) for c in rows["config"]])
    readable["training minutes"] = rows["train_seconds"].div(60).round().astype("Int64").to_numpy()
    return readable


def pilot_numbers(table: pd.DataFrame) -> dict:
    """The table's numbers by pilot name, NeMo's share across all pilots and how many pilots Wanda 1% lowered MR
    on, for the chapter's prose (glued as ``pilots.<name>.<column>``: ``pilots.control.nemo_mr``)."""
    numbers = {row["name"]: row.drop(["name", "what changes"]).dropna().to_dict() for _, row in table.iterrows()}
    shares = table["NeMo share (median)"]
    return {**numbers, "all": {"count": len(table), "nemo_share_min": shares.min(), "nemo_share_max": shares.max(),
                               "wanda_lowered_mr": int((table["Wanda 1% MR"] < table["MR"]).sum())}}


def append_row(row: dict, table: Path = PILOT_TABLE) -> None:
    """Append one pilot's row; a new column (a new measurement) rewrites the table with it, older rows blank."""
    table.parent.mkdir(parents=True, exist_ok=True)
    rows = list(csv.DictReader(table.open())) if table.exists() else []
    columns = list(dict.fromkeys([*(rows[0].keys() if rows else []), *row]))
    with table.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows + [row])


def _format(value):
    if isinstance(value, (list, tuple)):
        return json.dumps([round(v, 3) for v in value])
    return f"{value:.3f}" if isinstance(value, float) else ("" if value is None else value)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, choices=sorted(PILOTS), help="the configuration (see PILOTS)")
    parser.add_argument("--steps", type=int, default=3000, help="training steps (the shipped organism: 3000)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="checkpoint folder (default: pilots/<name> under the results)")
    parser.add_argument("--measure-only", action="store_true", help="measure the checkpoint in --out, do not train")
    parser.add_argument("--table", default=None,
                        help=f"where the pilot numbers go (default: {PILOT_TABLE.name}, or {PILOT_SERIES_TABLE.name} "
                             "for series checkpoints)")
    parser.add_argument("--diagnose", action="store_true",
                        help="measure the diagnostics (see diagnose) instead of the pilot numbers, into "
                             "--diagnostics-table; with --measure-only, of the checkpoint already in --out")
    parser.add_argument("--diagnostics-table", default=str(DIAGNOSTICS_TABLE))
    parser.add_argument("--max-items", type=int, default=None,
                        help="with --diagnose: only the first memorized items (to time it; the row says how many)")
    parser.add_argument("--series-every", type=int, default=None,
                        help="also keep a checkpoint every so many steps under <out>/series/step-NNNNN/")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted training in --out")
    parser.add_argument("--series-step", action="append", default=None,
                        help="with --measure-only: measure the series checkpoint of this step (or 'latest', or "
                             "'all') instead of the one in --out; may be given several times")
    args = parser.parse_args(argv)
    out = Path(args.out or REPOSITORY_ROOT / "results" / "organism" / "pilots" / args.name)
    config = TrainConfig(steps=args.steps, threads=args.threads, series_every=args.series_every, **PILOTS[args.name])
    if args.series_step and not args.measure_only:
        raise SystemExit("--series-step measures checkpoints that are already there: add --measure-only.")
    if not args.measure_only:
        train_organism(out, config, resume=args.resume)
        trained = json.loads((out / "manifest.json").read_text()).get("trained_steps")
        if trained != (config.stop_at or config.steps):  # stopped by a SIGTERM: measure the finished run only
            print(f"Training stopped after step {trained} of {config.steps}; nothing measured. Continue it with "
                  f"the same command and --resume.")
            return
    torch.set_num_threads(args.threads)
    for checkpoint in checkpoints_to_measure(out, args.series_step):
        measure_checkpoint(args, checkpoint)


def checkpoints_to_measure(out: Path, series: list[str] | None) -> list[Path]:
    """The checkpoint folders that ``--series-step`` names under ``out`` (``out`` itself without it)."""
    if not series:
        if not (out / "manifest.json").exists():
            raise SystemExit(f"No organism checkpoint in {out}: train it first (leave out --measure-only).")
        return [out]
    kept = series_steps(out)
    if not kept:
        raise SystemExit(f"No series checkpoints under {out}: train with --series-every first.")
    steps = []
    for wanted in series:
        if wanted == "all":
            steps += kept
        elif wanted == "latest":
            steps.append(kept[-1])
        elif wanted.isdigit() and int(wanted) in kept:
            steps.append(int(wanted))
        else:
            raise SystemExit(f"No series checkpoint {wanted!r} under {out}: kept steps are {kept} "
                             "(or say 'latest' or 'all').")
    return [series_checkpoint(out, step) for step in dict.fromkeys(steps)]


def _checkpoint_name(checkpoint: Path) -> str:
    try:
        return str(checkpoint.resolve().relative_to(REPOSITORY_ROOT))
    except ValueError:
        return str(checkpoint)


def measure_checkpoint(args, out: Path) -> None:
    """Measure one checkpoint as ``args`` asks and append its row."""
    manifest = json.loads((out / "manifest.json").read_text())
    started = time.time()
    if args.diagnose:
        diagnosed = diagnose(out, max_items=args.max_items)
        row = {"name": args.name, "steps": manifest.get("trained_steps"),
               **{k: _format(v) for k, v in diagnosed.items()}, "seconds": round(time.time() - started),
               "checkpoint": _checkpoint_name(out)}
        append_row(row, Path(args.diagnostics_table))
        print(json.dumps(row, indent=1))
        return
    measured = measure(out)
    row = {"name": args.name, "config": json.dumps(PILOTS[args.name]), "steps": manifest.get("trained_steps"),
           "threads": manifest["train_config"]["threads"], "train_seconds": manifest.get("train_seconds"),
           **{k: _format(v) for k, v in measured.items()}, "measure_seconds": round(time.time() - started)}
    series = out.parent.name == "series"
    if series:
        row["checkpoint"] = _checkpoint_name(out)
    append_row(row, Path(args.table or (PILOT_SERIES_TABLE if series else PILOT_TABLE)))
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
