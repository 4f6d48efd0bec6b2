"""Candidate contrast organisms (issue 35): is memorization where training put it, and is the model still usable?

``python -m dori_utils.book.local_pilots --out results/organism/pilots/organism-local [--series]`` measures a
checkpoint trained with example-tied channels (``organism.train --memorization-channel-share``), and with
``--series`` every series checkpoint under it, and appends one row each to ``results/organism/local-pilots.csv``:
MR and attribute accuracy as loaded (every channel on), MR with each item's own memorization channels only (as
the dropout trained it), MR with each item's designated channels blocked, and MR and attribute accuracy with
every memorization channel dropped (Maini et al.'s test-time drop); with ``--attack-steps 50``, also the MR after
chapter 1's Dori attack on that dropped model. Failed candidates keep their rows: they are results.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from dori_utils import hooks, nemo
from dori_utils.backends import load_backend
from dori_utils.book.chapter1 import blocked_attack
from dori_utils.book.pilots import _checkpoint_name, _format, append_row
from dori_utils.book.results import REPOSITORY_ROOT
from dori_utils.evaluation import evaluate_items
from dori_utils.metrics import median_score
from dori_utils.organism.backend import designated_channels, memorization_channels
from dori_utils.organism.train import series_checkpoint, series_steps
from dori_utils.sampling import generate_for_prompts

LOCAL_PILOT_TABLE = REPOSITORY_ROOT / "results" / "organism" / "local-pilots.csv"
EVAL_SEEDS = [10, 11]


def measure(path: str | Path, n_heldout: int = 48, attack_steps: int = 0) -> dict:
    """The contrast organism in ``path``: per state (as loaded; each item with only its own memorization channels,
    as example-tied dropout trained it; designated channels blocked per item; every memorization channel dropped)
    the MR of its verbatim items over ``EVAL_SEEDS`` and each item's median score,
    and the attribute accuracy on ``n_heldout`` held-out scene captions as loaded and dropped. With
    ``attack_steps``, also the Dori attack from each prompt on the model with every memorization channel dropped
    (chapter 1's attack, ``chapter1.blocked_attack``): does it bring back what training confined to those channels?"""
    backend = load_backend("organism-local", path=path, device="cpu")
    items, prompts = backend.memorized, backend.prompt_sets["heldout_ordinary"][:n_heldout]
    designated, reserved = designated_channels(backend), memorization_channels(backend)

    def utility(context):
        with context:
            return backend.utility(generate_for_prompts(backend, prompts, [0]).images, prompts)

    # as trained by example-tied dropout: each item with its own memorization channels on and the others off
    others = [{layer: sorted(set(channels) - set(designated[item.id][layer])) for layer, channels in reserved.items()}
              for item in items]
    states = {"loaded": {}, "own_channels_only": {"row_context": nemo.per_item_blocking(backend, others)},
              "designated_blocked": {"row_context": nemo.per_item_blocking(
                  backend, [designated[item.id] for item in items])},
              "memorization_dropped": {"context": hooks.zero_output_channels(backend.unet, reserved)}}
    row = {}
    for state, edit in states.items():
        evaluation = evaluate_items(backend, EVAL_SEEDS, items=items, **edit)
        row[f"mr_{state}"] = evaluation.mr
        row[f"scores_{state}"] = median_score(evaluation.scores).tolist()
    if attack_steps:
        run = blocked_attack(backend, items, "memorization channels dropped", [reserved] * len(items), EVAL_SEEDS,
                             attack_steps)
        row["attack_steps"] = attack_steps
        row["mr_memorization_dropped_dori"] = run.attacked.mr
        row["scores_memorization_dropped_dori"] = median_score(run.attacked.scores).tolist()
    row["attribute_accuracy_loaded"] = utility(contextlib.nullcontext())
    row["attribute_accuracy_dropped"] = utility(hooks.zero_output_channels(backend.unet, reserved))
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the checkpoint folder the training wrote")
    parser.add_argument("--series", action="store_true", help="also measure every series checkpoint under --out")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table", default=str(LOCAL_PILOT_TABLE))
    parser.add_argument("--attack-steps", type=int, default=0,
                        help="also attack each prompt this many steps with every memorization channel dropped "
                             "(the paper's budget: 50; about a minute on 2 cores)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    steps = series_steps(out) if args.series else []
    checkpoints = [series_checkpoint(out, step) for step in steps]
    if not steps or steps[-1] != json.loads((out / "manifest.json").read_text()).get("trained_steps"):
        checkpoints.append(out)  # the last series checkpoint is the final one when the run ended on it
    for checkpoint in checkpoints:
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        config = manifest["train_config"]
        started = time.time()
        measured = measure(checkpoint, attack_steps=args.attack_steps)
        row = {"checkpoint": _checkpoint_name(checkpoint), "steps": manifest.get("trained_steps"),
               "tied_channels": config.get("tied_channels", "dropout"),
               "memorization_channel_share": config["memorization_channel_share"],
               "item_channel_share": config["item_channel_share"],
               **{k: _format(v) for k, v in measured.items()}, "measure_seconds": round(time.time() - started)}
        append_row(row, Path(args.table))
        print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
