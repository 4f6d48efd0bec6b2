"""Where a chapter's results go: ``results/<backend>/``, written as they are produced.

JSON summaries are rewritten after every update (atomically), so an interrupted run keeps what it computed;
tensors that later chapters share (e.g. Dori triggers) are cached as ``.pt`` files with the parameters that
made them, and recomputed when those parameters change.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


def results_dir(backend_name: str, root: str | Path | None = None) -> Path:
    path = Path(root or os.environ.get("DORI_RESULTS", REPOSITORY_ROOT / "results")) / backend_name
    path.mkdir(parents=True, exist_ok=True)
    return path


class ResultLog:
    """A JSON file that is rewritten each time a result is recorded.

    A new log starts empty and replaces the file from its first record on: a chapter's JSON holds the results of
    one run only, never a mix with an earlier run's keys.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.data: dict = {}

    def record(self, key: str, value) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=float))
        tmp.replace(self.path)


def cached(path: str | Path, params: dict, compute):
    """Load ``path`` if it was made with the same ``params``, else ``compute()`` and save it (torch.save)."""
    path = Path(path)
    if path.exists():
        stored = torch.load(path, weights_only=False)
        if stored.get("params") == params:
            return stored["value"]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params": params, "value": value}, path)
    return value
