"""Where a chapter's results go: ``results/<backend>/``, written as they are produced.

JSON summaries are rewritten after every update (atomically), so an interrupted run keeps what it computed;
results that later chapters share (NeMo's neurons, Dori triggers) are cached under ``results/<backend>/cache/``,
one file per set of parameters with a readable sidecar of them (``cached``).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
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


def cache_path(cache_dir: str | Path, name: str, params: dict) -> Path:
    """Where ``cached`` keeps the result of ``name`` computed with ``params``: ``<name>-<hash of params>.pt``."""
    if not name or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"A cache name is letters, digits, '_', '-' or '.', got {name!r}")
    canonical = json.dumps(params, sort_keys=True, default=str)
    return Path(cache_dir) / f"{name}-{hashlib.sha1(canonical.encode()).hexdigest()[:12]}.pt"


def cached(cache_dir: str | Path, name: str, params: dict, compute):
    """The result of ``compute()`` for ``params``, from ``cache_dir`` when it was computed before.

    Each set of parameters has its own file (``cache_path``), so runs with different sizes sit side by side
    instead of evicting each other; beside it a readable ``.json`` sidecar records the parameters, the package
    version and when it was made. An unreadable file (an interrupted write, another torch) is recomputed.
    """
    path = cache_path(cache_dir, name, params)
    if path.exists():
        try:
            return torch.load(path, weights_only=False)["value"]
        except Exception as error:  # a corrupt entry is only a cache miss, but say so
            warnings.warn(f"Cache entry {path} could not be read ({error}); recomputing it.", stacklevel=2)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"params": params, "value": value}, tmp)
    tmp.replace(path)
    sidecar = {"name": name, "params": json.loads(json.dumps(params, default=str)), "dori_utils": _package_version(),
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=1))
    return value


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dori-utils")
    except PackageNotFoundError:  # run from a checkout that was never installed (e.g. Colab's sys.path)
        return "not installed"
