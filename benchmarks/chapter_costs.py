"""What each chapter costs on Stable Diffusion v1.4, estimated (not a test; CPU, offline).

    python benchmarks/chapter_costs.py                       # profiles colab and sd-v1-4, every chapter
    python benchmarks/chapter_costs.py --profiles colab --chapters 01
    python benchmarks/chapter_costs.py --profiles sd-v1-4 --chapters 00 01 --extrapolate-from 2 4

Chapters 0 and 1 load every verbatim item on the sd-v1-4 profile (112), which takes hours on the CPU: the last
command counts them at 2 and 4 items and extrapolates to 112 (``costs.extrapolate_calls``); the table marks them.

Each chapter runs through papermill with a GPU profile's parameters, on the CPU, on a tiny random SD-1.x pipeline
(saved with ``save_pretrained``), an SSCD stand-in and prompt tables in NeMo's schema with as many rows as NeMo's
(112 verbatim items among 500, and 500 non-memorized prompts): the same UNet and VAE calls, with the same rows, as
on SD v1.4. ``dori_utils.book.costs`` counts them and estimates hours and peak memory on a T4 and an A100.

Writes ``benchmarks/results/chapter-costs.json`` and the table between the ``chapter-costs`` markers of intro.md
and README.md. On a GPU, ``run_benchmarks.py --sd-unet`` measures an attack step, which corrects the efficiency.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent

from dori_utils import data
from dori_utils.book import cli, costs
from dori_utils.book.tiny_sd import save_tiny_sd_pipeline, save_tiny_sscd, write_unmemorized_table

RESULT = ROOT / "benchmarks" / "results" / "chapter-costs.json"
PAGES = [ROOT / "intro.md", ROOT / "README.md"]
VERBATIM_ROWS = 112  # NeMo's table: 112 VM prompts among 500


def write_tables(folder: Path) -> dict:
    memorized = [";Caption;URL;type;mean_sscd;max_sscd;Index"]
    for i in range(data.UPSTREAM_ROWS):
        kind = "VM" if i < VERBATIM_ROWS else "TM"
        memorized.append(f"{i};a memorized caption number {i};https://example.com/{i}.jpg;{kind};0.9;0.9;{3000 + i}")
    (folder / "memorized.csv").write_text("\n".join(memorized) + "\n")
    unmemorized = write_unmemorized_table(folder / "unmemorized.csv", rows=data.UPSTREAM_ROWS)
    return {"prompt_table": str(folder / "memorized.csv"), "unmemorized_table": str(unmemorized)}


def counting_copy(chapter: Path, out: Path, calls_path: Path) -> Path:
    """The chapter with a first cell that starts counting and a last one that writes the tally."""
    notebook = nbformat.read(chapter, as_version=4)
    start = nbformat.v4.new_code_cell("from dori_utils.book import costs as _costs\n"
                                      "_counting = _costs.count_model_calls()\n_calls = _counting.__enter__()")
    stop = nbformat.v4.new_code_cell(f"import json as _json\n_counting.__exit__(None, None, None)\n"
                                     f"open({str(calls_path)!r}, 'w').write(_json.dumps(_calls.to_dict()))")
    notebook.cells = [start, *notebook.cells, stop]
    nbformat.write(notebook, out)
    return out


def count_chapters(profiles: list[str], patterns: list[str] | None, overrides: dict | None = None) -> dict:
    chapters = cli.select_chapters(cli.toc_chapters(ROOT), ROOT, patterns)
    record = {}
    with tempfile.TemporaryDirectory(prefix="dori-costs-") as scratch:
        scratch = Path(scratch)
        options = {"model_id": save_tiny_sd_pipeline(scratch), "sscd_path": str(save_tiny_sscd(scratch / "sscd.pt")),
                   **write_tables(scratch)}
        for profile in profiles:
            parameters = {**cli.load_profile(profile, ROOT), **(overrides or {})}
            results = scratch / f"results-{profile}"  # one folder per profile: chapter 5 reads chapter 1's results
            record[profile] = {}
            for chapter in chapters:
                calls_path = scratch / f"{profile}-{chapter.stem}.json"
                run = {**parameters, "DEVICE": "cpu",
                       "BACKEND_OPTIONS": {**parameters.get("BACKEND_OPTIONS", {}), **options,
                                           "reference_cache": str(scratch / f"references-{profile}")}}
                started = time.time()
                copy = counting_copy(chapter, scratch / f"{profile}-{chapter.name}", calls_path)
                cli.execute_chapter(copy, scratch / f"executed-{profile}-{chapter.name}", run, progress=False,
                                     results=results)
                record[profile][chapter.stem] = {"calls": json.loads(calls_path.read_text()),
                                                 "cpu_seconds": round(time.time() - started)}
                print(f"{profile} {chapter.stem}: counted in {record[profile][chapter.stem]['cpu_seconds']} s",
                      flush=True)
    return record


def extrapolated(small: dict, large: dict, n_small: int, n_large: int) -> dict:
    """A profile's chapters counted in ``small`` and ``large`` (runs on ``n_small`` and ``n_large`` items), each with
    its calls extrapolated to the table's 112 verbatim items."""
    chapters = {}
    for chapter in small:
        calls = costs.extrapolate_calls(*(costs.ModelCalls.from_dict(run[chapter]["calls"]) for run in (small, large)),
                                        n_small, n_large, VERBATIM_ROWS)
        chapters[chapter] = {"calls": calls.to_dict(), "items": VERBATIM_ROWS,
                             "extrapolated_from_items": [n_small, n_large],
                             "cpu_seconds": small[chapter]["cpu_seconds"] + large[chapter]["cpu_seconds"]}
    return chapters


def reestimate(record: dict) -> None:
    """Every entry's estimates from its calls, on the current cost model. A book run computes the reference images
    once, in its first chapter; later chapters read them from the cache, so only the first pays for them (a chapter
    counted on its own, as here, computes its own)."""
    first = cli.toc_chapters(ROOT)[0].stem
    for profile, chapters in record["profiles"].items():
        optimizer = cli.load_profile(profile, ROOT).get("OPTIMIZER", "adafactor")
        for chapter, entry in chapters.items():
            paid = ("NeMo statistics",) if chapter == first else ("NeMo statistics", "reference images")
            calls = costs.ModelCalls.from_dict(entry["calls"])
            entry["estimates"] = {gpu: costs.estimate(calls, gpu, optimizer, exclude_phases=paid) for gpu in costs.GPUS}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", nargs="+", default=["colab", "sd-v1-4"])
    parser.add_argument("--chapters", nargs="+", default=None, help="glob or prefix of the chapters' file names")
    parser.add_argument("--extrapolate-from", nargs=2, type=int, metavar=("N_SMALL", "N_LARGE"),
                        help=f"count the chapters at MAX_ITEMS N_SMALL and N_LARGE and extrapolate to {VERBATIM_ROWS} "
                             "items (for chapters that load every item, whose full count takes hours of CPU)")
    args = parser.parse_args(argv)
    record = json.loads(RESULT.read_text()) if RESULT.exists() else {"profiles": {}}
    if args.extrapolate_from:
        n_small, n_large = args.extrapolate_from
        small, large = (count_chapters(args.profiles, args.chapters, {"MAX_ITEMS": n}) for n in (n_small, n_large))
        counted = {profile: extrapolated(small[profile], large[profile], n_small, n_large) for profile in small}
    else:
        counted = count_chapters(args.profiles, args.chapters)
    for profile, chapters in counted.items():
        record["profiles"].setdefault(profile, {}).update(chapters)
    reestimate(record)
    record["cost_model"] = costs.cost_model()
    record["updated"] = time.strftime("%Y-%m-%d")
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(record, indent=1) + "\n")
    table = costs.cost_table(record)
    for page in PAGES:
        page.write_text(costs.replace_cost_table(page.read_text(), table))
    print(table)


if __name__ == "__main__":
    main()
