"""Prompt tables of memorized and non-memorized LAION prompts, and user-supplied ground-truth images.

Three public tables, read in their upstream schemas and returned as one pandas schema (``TABLE_COLUMNS``):

- NeMo's ``prompts/memorized_laion_prompts.csv`` (``;``-separated, 500 rows,
  ``<row>;Caption;URL;type;mean_sscd;max_sscd;Index``). ``type`` is VM (verbatim, NeMo's max SSCD >= 0.7)
  or TM (template); 13 TM rows have no SSCD values.
- NeMo's ``prompts/unmemorized_laion_prompts.csv`` (500 rows, ``<row>;Caption;URL;Index``).
- Wen et al.'s ``examples/sdv1_500_memorized.jsonl`` (500 lines of ``{"caption", "index", "url"}``): the
  same prompts in the same order as NeMo's memorized table, without VM/TM labels.

Files come from the upstream repositories at pinned commits, are downloaded once into a cache folder and
checked on every use (:func:`fetch_file`); every loader also takes a local path.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

NEMO_COMMIT = "f952ede"
WEN_COMMIT = "c8fe471"
NEMO_MEMORIZED_URL = (
    "https://raw.githubusercontent.com/ml-research/localizing_memorization_in_diffusion_models/"
    f"{NEMO_COMMIT}/prompts/memorized_laion_prompts.csv"
)
NEMO_UNMEMORIZED_URL = (
    "https://raw.githubusercontent.com/ml-research/localizing_memorization_in_diffusion_models/"
    f"{NEMO_COMMIT}/prompts/unmemorized_laion_prompts.csv"
)
WEN_MEMORIZED_URL = (
    f"https://raw.githubusercontent.com/YuxinWenRick/diffusion_memorization/{WEN_COMMIT}/"
    "examples/sdv1_500_memorized.jsonl"
)
DEFAULT_CACHE_DIR = Path("~/.cache/dori_utils")
UPSTREAM_ROWS = 500

# id: the LAION index as a string; kind: "VM", "TM", or "none" where the table has no label
# (non-memorized prompts, and Wen's table, which labels nothing).
TABLE_COLUMNS = ["id", "prompt", "url", "kind"]
NEMO_MEMORIZED_COLUMNS = ["Caption", "URL", "type", "mean_sscd", "max_sscd", "Index"]
NEMO_UNMEMORIZED_COLUMNS = ["Caption", "URL", "Index"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, path: Path) -> None:
    """Download to a ``.part`` file first, so an interrupted download never looks like a cached file."""
    partial = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
    except (OSError, ValueError) as error:
        partial.unlink(missing_ok=True)
        raise ConnectionError(
            f"Could not download {url} ({error}). Check the network connection, or download the file yourself "
            f"and pass its local path instead of the URL (or put it at {path}, where it is looked for first)."
        ) from None
    partial.replace(path)


def _verify(path: Path, expected: str, where: str) -> None:
    got = file_sha256(path)
    if got != expected.lower():
        raise ValueError(
            f"Checksum mismatch for {path}: expected sha256 {expected} ({where}), got {got}. The file is corrupt "
            "or was changed: delete it to download it again, or pass a local copy you trust."
        )


def cached_file_path(url: str, cache_dir: str | Path | None = None) -> Path:
    """Where :func:`fetch_file` keeps ``url``: a copy placed there by hand (e.g. on a machine with no network) is
    used as if it had been downloaded."""
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
    # The URL's hash keeps files of the same name from different commits or repositories apart.
    name = url.rstrip("/").rsplit("/", 1)[-1].split("?")[0]
    return cache_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}"


def fetch_file(url: str, cache_dir: str | Path | None = None, sha256: str | None = None) -> Path:
    """Download ``url`` once into ``cache_dir`` (default ``~/.cache/dori_utils``) and return the local path.

    With ``sha256`` the file must have that digest. Without it (the upstream digests cannot be known in
    advance), the digest of the first download is recorded next to the file in ``<name>.sha256`` and every
    later call checks against it, so a file truncated or edited in the cache is caught, not parsed.
    """
    path = cached_file_path(url, cache_dir)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        _download(url, path)
    if sha256 is not None:
        _verify(path, sha256, "as requested")
        return path
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.exists():
        sidecar.write_text(file_sha256(path) + "\n")
    _verify(path, sidecar.read_text().strip(), f"recorded in {sidecar} at first download")
    return path


def _local_file(path_or_url: str | Path, cache_dir, sha256: str | None) -> Path:
    if str(path_or_url).startswith(("http://", "https://", "file://")):
        return fetch_file(str(path_or_url), cache_dir, sha256)
    path = Path(path_or_url).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"No file {path}. Pass the path of a local copy, or leave it out to download "
                                "the pinned upstream file.")
    if sha256 is not None:
        _verify(path, sha256, "as requested")
    return path


def _check_rows(table: pd.DataFrame, path: Path, expected_rows: int | None, what: str) -> None:
    if expected_rows is not None and len(table) != expected_rows:
        raise ValueError(
            f"{path}: expected {expected_rows} rows in {what}, got {len(table)}. The file may be truncated: delete "
            "it to download it again, or pass expected_rows=None for a table of your own."
        )


def _read_nemo_csv(path: Path, columns: list[str], expected_rows: int | None, what: str) -> pd.DataFrame:
    """Read one of NeMo's ``;``-separated tables as strings, checking its columns and required fields."""
    try:
        raw = pd.read_csv(path, sep=";", index_col=0, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a valid {what} ({error}).") from None
    if list(raw.columns) != columns:
        raise ValueError(f"{path}: expected columns {columns} (';'-separated, after a row-number column) in "
                         f"{what}, got {list(raw.columns)}.")
    # A row with too few fields is padded with NaN by pandas; a LAION index must be a whole number.
    required = [c for c in columns if c not in ("URL", "mean_sscd", "max_sscd")]
    bad = raw[required].isna().any(axis=1) | (raw["Caption"] == "") | ~raw["Index"].fillna("").str.fullmatch(r"\d+")
    if bad.any():
        rows = np.flatnonzero(bad.to_numpy())[:10].tolist()
        raise ValueError(f"{path}: unparseable rows in {what} (0-based data rows {rows}): missing fields or a "
                         "LAION index that is not a whole number.")
    _check_rows(raw, path, expected_rows, what)
    return raw.fillna("")


def load_nemo_memorized(path_or_url: str | Path | None = None, cache_dir: str | Path | None = None,
                        sha256: str | None = None, expected_rows: int | None = UPSTREAM_ROWS) -> pd.DataFrame:
    """NeMo's 500 memorized LAION prompts: ``TABLE_COLUMNS`` plus ``mean_sscd`` and ``max_sscd`` (NaN if empty)."""
    path = _local_file(path_or_url or NEMO_MEMORIZED_URL, cache_dir, sha256)
    raw = _read_nemo_csv(path, NEMO_MEMORIZED_COLUMNS, expected_rows, "NeMo's memorized_laion_prompts.csv")
    unknown = sorted(set(raw["type"]) - {"VM", "TM"})
    if unknown:
        raise ValueError(f"{path}: column 'type' must be VM or TM, got {unknown}.")
    try:
        scores = raw[["mean_sscd", "max_sscd"]].replace("", np.nan).astype(float)
    except ValueError as error:
        raise ValueError(f"{path}: mean_sscd and max_sscd must be numbers or empty ({error}).") from None
    return pd.DataFrame({
        "id": raw["Index"].to_numpy(),
        "prompt": raw["Caption"].to_numpy(),
        "url": raw["URL"].to_numpy(),
        "kind": raw["type"].to_numpy(),
        "mean_sscd": scores["mean_sscd"].to_numpy(),
        "max_sscd": scores["max_sscd"].to_numpy(),
    })


def load_nemo_unmemorized(path_or_url: str | Path | None = None, cache_dir: str | Path | None = None,
                          sha256: str | None = None, expected_rows: int | None = UPSTREAM_ROWS) -> pd.DataFrame:
    """NeMo's 500 non-memorized LAION prompts (``kind`` is "none")."""
    path = _local_file(path_or_url or NEMO_UNMEMORIZED_URL, cache_dir, sha256)
    raw = _read_nemo_csv(path, NEMO_UNMEMORIZED_COLUMNS, expected_rows, "NeMo's unmemorized_laion_prompts.csv")
    return pd.DataFrame({"id": raw["Index"].to_numpy(), "prompt": raw["Caption"].to_numpy(),
                         "url": raw["URL"].to_numpy(), "kind": "none"})


def load_wen_memorized(path_or_url: str | Path | None = None, cache_dir: str | Path | None = None,
                       sha256: str | None = None, expected_rows: int | None = UPSTREAM_ROWS) -> pd.DataFrame:
    """Wen et al.'s 500 memorized prompts (``kind`` is "none": join with NeMo's table on ``id`` for VM/TM)."""
    path = _local_file(path_or_url or WEN_MEMORIZED_URL, cache_dir, sha256)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            index = str(record["index"])
            if not index.isdigit() or not record["caption"]:
                raise ValueError("empty caption or an index that is not a whole number")
            rows.append((index, record["caption"], record.get("url") or ""))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}, line {number}: not a Wen et al. record with 'caption', 'index' and 'url' "
                             f"({type(error).__name__}: {error}).") from None
    table = pd.DataFrame(rows, columns=["id", "prompt", "url"]).assign(kind="none")
    _check_rows(table, path, expected_rows, "Wen et al.'s sdv1_500_memorized.jsonl")
    return table


def _read_image(path: Path, size: int) -> torch.Tensor:
    # Resized to a square without cropping, as SSCD's preprocessing does.
    image = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def load_ground_truth_folder(folder: str | Path, ids, size: int = 512) -> dict[str, torch.Tensor]:
    """Ground-truth training images laid out as Wen et al.'s ``gt_images``: ``<folder>/<laion_index>/*.png|jpg``.

    Returns ``{id: R x 3 x size x size}`` in [0, 1], every image of an id in file-name order. An id without
    images raises, so a metric is never computed against a silently missing reference.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"No ground-truth folder {folder}; expected <folder>/<laion_index>/*.png|jpg.")
    images, missing = {}, []
    for item_id in map(str, ids):
        files = sorted(p for p in (folder / item_id).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            images[item_id] = torch.stack([_read_image(p, size) for p in files])
        else:
            missing.append(item_id)
    if missing:
        raise FileNotFoundError(
            f"No ground-truth images for {len(missing)} of {len(missing) + len(images)} ids in {folder} "
            f"(first: {missing[:5]}); expected <folder>/<laion_index>/*.png|jpg. Add them, or restrict the "
            "items (max_items, or a prompt table without them)."
        )
    return images
