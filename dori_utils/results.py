"""Where a chapter's results go: ``results/<backend>/``, written as they are produced.

JSON summaries are rewritten after every update (atomically), so an interrupted run keeps what it computed;
tensors that later chapters share (e.g. Dori triggers) are cached as ``.pt`` files with the parameters that
made them, and recomputed when those parameters change.
"""
from __future__ import annotations

import json
import os
import re
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

    def glue(self) -> list[str]:
        """Glue every number of this log for the chapter's prose (see :func:`glue_values`)."""
        return glue_values(json.loads(json.dumps(self.data, default=float)))


# myst-nb reads glued values from outputs under this prefix, which Jupyter and Colab do not display.
GLUE_PREFIX = "application/papermill.record/"


def glue_key(path: list[str]) -> str:
    """The name a value is glued under: its path in the results, each part in lower case with every run of other
    characters turned into ``_`` ("NeMo + Dori" -> "nemo_dori"), parts joined by dots."""
    return ".".join(re.sub(r"[^a-z0-9]+", "_", str(part).lower()).strip("_") for part in path)


def _scalars(value, path: list[str]):
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _scalars(inner, [*path, key])
    elif isinstance(value, (list, tuple)):
        for index, inner in enumerate(value):
            yield from _scalars(inner, [*path, str(index)])
    elif isinstance(value, (bool, int, float, str)) or value is None:
        yield glue_key(path), value


def glue_values(values: dict, prefix: str = "") -> list[str]:
    """Glue every scalar in ``values`` (nested dicts and lists are walked) so that a chapter's Markdown can quote
    it: ``{glue:text}`nemo_dori.mr:.2f``` (numbers take a format spec; strings ``:s``). Outside a notebook kernel
    nothing is displayed; the names are returned either way."""
    return glue_named(list(_scalars(values, [prefix] if prefix else [])))


def glue_named(named: list[tuple[str, object]]) -> list[str]:
    """Glue each (name, scalar) pair as it is named; see :func:`glue_values`."""
    from IPython import get_ipython
    from IPython.display import display

    if get_ipython() is not None:
        for name, value in named:
            # a Python literal, which is what myst-nb's format spec is applied to
            text = repr(float(value)) if isinstance(value, float) else repr(value)
            display({GLUE_PREFIX + "text/plain": text}, raw=True,
                    metadata={"scrapbook": {"name": name, "mime_prefix": GLUE_PREFIX}})
    return [name for name, _ in named]


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
