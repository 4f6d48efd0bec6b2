"""Where a chapter's results go: ``results/<backend>/``, written as they are produced.

JSON summaries are rewritten after every update (atomically), so an interrupted run keeps what it computed;
results that later chapters share (NeMo's neurons, Dori triggers) are cached under ``results/<backend>/cache/``,
one file per set of parameters with a readable sidecar of them (``cached``).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
import time
import warnings
from pathlib import Path

import torch

from dori_utils.files import check_writable

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


def results_dir(backend_name: str, root: str | Path | None = None, smoke: bool = False) -> Path:
    """``results/<backend>/`` (or under ``DORI_RESULTS``); a smoke-sized run's results go to ``<backend>-smoke/``,
    never over the full run's (a chapter run with papermill or Jupyter writes here as ``dori-book run`` does)."""
    folder = f"{backend_name}-smoke" if smoke else backend_name
    path = Path(root or os.environ.get("DORI_RESULTS", REPOSITORY_ROOT / "results")) / folder
    path.mkdir(parents=True, exist_ok=True)
    return path


PROVENANCE_KEY = "_provenance"


def write_atomic(path: Path, write) -> None:
    """Replace ``path`` in one rename: ``write(temporary_path)`` fills a file of this writer's own beside it (two
    writers never share one, and a killed write leaves only a stray ``.tmp``)."""
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    write(partial)
    os.replace(partial, path)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda partial: Path(partial).write_text(text))


class ResultLog:
    """A JSON file that is rewritten each time a result is recorded.

    A new log starts empty and replaces the file from its first record on: a chapter's JSON holds the results of
    one run only, never a mix with an earlier run's keys. ``provenance`` (the backend, whether the run was
    smoke-sized, ...) is stored under ``_provenance`` so that a chapter reading these results can check that they
    come from a run like its own (:func:`read_results`); it is not glued.
    """

    def __init__(self, path: str | Path, provenance: dict | None = None):
        self.path = Path(path)
        self.data: dict = {PROVENANCE_KEY: {**provenance, "dori_utils": _package_version()}} if provenance else {}

    def record(self, key: str, value) -> None:
        self.data[key] = value
        write_text_atomic(self.path, json.dumps(self.data, indent=1, default=float))

    def glue(self) -> list[str]:
        """Glue every number of this log for the chapter's prose (see :func:`glue_values`)."""
        values = {k: v for k, v in self.data.items() if k != PROVENANCE_KEY}
        return glue_values(json.loads(json.dumps(values, default=float)))


def chapter_log(name: str, backend_name: str, smoke: bool) -> ResultLog:
    """A chapter's ``ResultLog``: ``<name>.json`` in its results folder, with the run's provenance."""
    return ResultLog(results_dir(backend_name, smoke=smoke) / f"{name}.json",
                     provenance={"chapter": name, "backend": backend_name, "smoke": bool(smoke)})


class ResultsMissing(RuntimeError):
    """A chapter needs another chapter's results, and they are absent, partial or from another kind of run."""


def read_results(name: str, backend_name: str, smoke: bool, required: tuple[str, ...]) -> dict:
    """Another chapter's results, checked: written by a run on the same backend and of the same size (smoke or
    not), and holding every key in ``required`` (a run stopped half-way leaves some out)."""
    path = results_dir(backend_name, smoke=smoke) / f"{name}.json"
    chapter = name[2:].split("_")[0]
    rerun = (f"Run chapter {chapter} first, the same way (`dori-book run --chapters 0{chapter}"
             f"{' --profile smoke' if smoke else ''}`, or in Jupyter with BACKEND = {backend_name!r} and "
             f"SMOKE = {smoke}).")
    if not path.exists():
        raise ResultsMissing(f"{path} does not exist. {rerun}")
    recorded = json.loads(path.read_text())
    provenance = recorded.get(PROVENANCE_KEY, {})
    expected = {"backend": backend_name, "smoke": bool(smoke)}
    found = {key: provenance.get(key) for key in expected}
    if found != expected:
        raise ResultsMissing(f"{path} comes from another run ({found}, this one is {expected}). {rerun}")
    missing = [key for key in required if key not in recorded]
    if missing:
        raise ResultsMissing(f"{path} lacks {missing}: its run stopped before recording them. {rerun}")
    return recorded


# Every value glued in this kernel, by name: what the chapter's measured text quotes (``show_text``).
GLUED: dict[str, object] = {}
# ``{{name}}`` or ``{{name:format spec}}`` in a chapter's measured text
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_.-]+)\s*(?::([^{}]*))?\}\}")


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
    """Glue every scalar in ``values`` (nested dicts and lists are walked) so that the chapter's measured text can
    quote it: ``{{nemo_dori.mr:.2f}}`` (numbers take a format spec; strings ``:s``). Returns the names."""
    return glue_named(list(_scalars(values, [prefix] if prefix else [])))


def glue_named(named: list[tuple[str, object]]) -> list[str]:
    """Glue each (name, scalar) pair as it is named; see :func:`glue_values`."""
    GLUED.update(named)
    return [name for name, _ in named]


NOT_MEASURED = "[not measured in this run: {name}]"


def render_text(template: str, values: dict | None = None, strict: bool = False) -> str:
    """``template`` with every ``{{name:spec}}`` replaced by ``format(values[name], spec)`` (default: the glued
    values). A name this run did not glue (a backend without template items, say) shows as
    ``[not measured in this run: name]`` with a warning, or stops with ``strict``; the organism's committed
    chapters are tested to hold none."""
    values = GLUED if values is None else values

    def number(match: re.Match) -> str:
        name, spec = match.group(1), match.group(2) or ""
        if name not in values:
            close = sorted(key for key in values if key.split(".")[0] == name.split(".")[0])[:10]
            message = (f"The text quotes {{{{{name}}}}}, which this run did not glue (log.glue(), "
                       f"paper.glue_numbers()); glued names like it: {close or 'none'}")
            if strict:
                raise KeyError(message)
            warnings.warn(message, stacklevel=3)
            return NOT_MEASURED.format(name=name)
        if values[name] is None and spec:  # recorded as not applicable (a number a backend cannot give)
            return NOT_MEASURED.format(name=name)
        return format(values[name], spec)

    return PLACEHOLDER.sub(number, template)


def show_text(template: str) -> None:
    """Display a chapter's measured text as Markdown, its numbers filled in from this run: the web book, Jupyter,
    Colab, GitHub and the student copies all show the same numbers, which Markdown cells with glue roles did not."""
    from IPython.display import Markdown, display

    display(Markdown(render_text(template)))


def cache_path(cache_dir: str | Path, name: str, params: dict) -> Path:
    """Where ``cached`` keeps the result of ``name`` computed with ``params``: ``<name>-<hash>.pt``, the hash of
    the parameters, the package's version and the library's code (``library_fingerprint``), so that a changed
    method never answers from a result its earlier version computed."""
    if not name or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"A cache name is letters, digits, '_', '-' or '.', got {name!r}")
    canonical = json.dumps({"params": params, "dori_utils": _package_version(), "library": library_fingerprint()},
                           sort_keys=True, default=str)
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
    check_writable(path.parent)
    value = compute()
    # The key travels inside the payload; two processes filling the same entry both succeed (the last rename wins).
    write_atomic(path, lambda partial: torch.save({"params": params, "value": value}, partial))
    sidecar = {"name": name, "params": json.loads(json.dumps(params, default=str)), "dori_utils": _package_version(),
               "library": library_fingerprint(),
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_text_atomic(path.with_suffix(".json"), json.dumps(sidecar, indent=1))
    return value


@functools.lru_cache(maxsize=1)
def library_fingerprint() -> str:
    """A hash of the library's source (every module of ``dori_utils`` outside the book): what computed a cached
    result. The book's own modules (figures, prose, this cache) are left out, so that editing them keeps the cache."""
    library = REPOSITORY_ROOT / "dori_utils"
    digest = hashlib.sha1()
    for path in sorted(library.rglob("*.py")):
        if "book" not in path.relative_to(library).parts:
            digest.update(path.relative_to(library).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dori-utils")
    except PackageNotFoundError:  # run from a checkout that was never installed (e.g. Colab's sys.path)
        return "not installed"
