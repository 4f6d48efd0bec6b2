"""The book as a product: ``dori-book run | build | student | screenshots | check | setup-cell``.

``dori-book run`` executes every chapter listed in ``_toc.yml`` (in order) with papermill and a named profile of
parameters (``profiles/<name>.yaml``), times each chapter, strips volatile metadata, then builds the HTML book
with ``jupyter-book build . -W --keep-going``. ``dori-book --help`` and ``dori-book run --help`` list the options.

Conventions for chapter writers (``dori-book check`` verifies 1-4 and 9-10)
-----------------------------------------------------------------------------
1. Chapters are ``.ipynb`` files listed in ``_toc.yml`` (keep them notebooks: the Colab and Binder launch buttons
   only appear on notebook pages).
2. The first code cell is the guarded Colab setup cell printed by ``dori-book setup-cell`` (tag it ``hide-input``).
   On Colab it clones the repository, installs the package without replacing Colab's torch, puts the clone on
   ``sys.path`` (an editable install is only importable after a restart otherwise) and moves to ``chapters/``;
   elsewhere it does nothing. Chapters pick the GPU themselves when ``DEVICE`` is None.
3. One code cell tagged ``parameters`` holds plain literal assignments, at least::

       BACKEND = "organism"   # or "sd-v1-4"
       DEVICE = None          # None: the GPU when there is one, else the CPU
       SMOKE = False          # True: shrink every size so the chapter runs in seconds (tests, CI)
       BACKEND_OPTIONS = {}   # passed to load_backend: dtype, row_budget, model_id, sscd_path, item_ids ...

   plus the chapter's own sizes (``N_STEPS = 50`` ...), shrunk in the chapter when ``SMOKE`` is true. The profiles
   in ``profiles/`` override these names only: ``organism`` (nothing), ``smoke`` (``SMOKE: true``),
   ``sd-v1-4`` (``BACKEND: "sd-v1-4"``, ``DEVICE: "cuda"``, and chapter 5's fine-tuning sizes for a GPU).
4. Exercises close every chapter. A solution is a code cell tagged both ``solution`` and ``hide-cell`` (the book
   shows it folded behind a toggle; ``dori-book student`` replaces it by ``# Your solution here``). A solution in
   prose is a markdown cell tagged ``solution`` holding a ``{admonition} Solution`` with ``:class: dropdown``.
   A code cell whose source starts with ``# SOLUTION`` counts as a solution too.
5. Results (JSON, arrays, figures to reuse) go to ``results/<backend>/``: use
   ``dori_utils.book.results.results_dir(BACKEND)``. Large or regenerable files go to ``results/<backend>/cache/``
   (git-ignored). ``dori-book run`` writes ``results/timings-<profile>.json``.
6. nbval (``--nbval-lax``) compares only cells with a ``# NBVAL_CHECK_OUTPUT`` line: print stable facts there
   (shapes, counts, values rounded to 2 decimals). Timings, progress bars and sampled values stay unchecked.
   ``tests/sanitize.cfg`` masks addresses, durations, tqdm bars and ``/tmp`` paths.
7. Read packaged data through ``dori_utils`` (never ``../data`` paths): student copies live elsewhere.
8. Keep progress bars out of executed chapters (``progress=False``): with ipywidgets installed, a ``tqdm.auto``
   bar is stored as a widget with a random id plus widget state in the notebook's metadata, and renders as
   "0%" text where the widget JavaScript cannot load.
9. A chapter reads as a text: outside the setup, ``parameters``, solution and measured-text cells no code cell is
   longer than ``MAX_CELL_LINES`` lines. Figures, tables and experiments live in ``dori_utils.book``. Prose that quotes
   measured numbers is a measured-text cell (tags ``remove-input`` and ``measured-text``): a code cell
   ``results.show_text(r'''... {{key:.2f}} ...''')`` whose Markdown output holds the numbers of the run, glued
   before it (``log.glue()``, ``paper.glue_numbers()``), so that they show wherever the notebook is opened (the
   book, Jupyter, Colab, GitHub, student copies); the paper's numbers come from ``dori_utils.book.paper``.
10. A chapter never tests the backend's name: what differs between models is a capability of the backend
    (``backend.utility``, ``backend.never_seen_items()``, ...) or a parameter that a profile overrides.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROFILES = ("organism", "smoke", "sd-v1-4", "colab")
# The committed outputs are the organism's: by default every other profile's run goes beside them, into
# _build/<profile> with its results, so that a GPU run keeps the organism's book (and its tests) intact.
IN_PLACE_PROFILE = "organism"
VOLATILE_CELL_KEYS = ("papermill", "execution")
INJECTED_TAG = "injected-parameters"
ERROR_MARKER_TAG = "papermill-error-cell-tag"
SOLUTION_TAG = "solution"
MEASURED_TEXT_TAG = "measured-text"
SOLUTION_PLACEHOLDER_CODE = "# Your solution here"
SOLUTION_PLACEHOLDER_MARKDOWN = "*Your answer here.*"
# "### Exercise 2" above a solution, or its own label "Solution to exercise 2", numbers its answer cell
EXERCISE_HEADING = re.compile(r"^#+ Exercise (\d+)", re.MULTILINE)
SOLUTION_LABEL = re.compile(r"Solution to exercise (\d+)", re.IGNORECASE)
REQUIRED_PARAMETERS = ("BACKEND", "DEVICE", "SMOKE", "BACKEND_OPTIONS")
MAX_CELL_LINES = 12
NBVAL_CHECK = "# NBVAL_CHECK_OUTPUT"
# `backend.name == ...`, `BACKEND != ...`, `if BACKEND in (...)`: a model's name used as a switch
NAME_TEST = re.compile(r"(backend\.name|\bBACKEND)\s*(==|!=|\bin\b|\bnot in\b)|(==|!=)\s*(backend\.name|BACKEND)\b")
BOOK_DIRS_TO_STAGE = ("_static", "images", "figures")


class BookError(RuntimeError):
    """A failure with a message meant for the person at the terminal."""


class ChapterFailed(BookError):
    def __init__(self, chapter: Path, message: str, interrupted: bool = False):
        super().__init__(message)
        self.chapter = chapter
        self.interrupted = interrupted


# --------------------------------------------------------------------------------------------- book layout

def find_root(start: Path | str | None = None) -> Path:
    """The book's root: the first folder holding ``_toc.yml``, from ``start`` (default: cwd) upwards.

    No fallback to this package's repository: run from elsewhere, that would execute the repository's chapters in
    place, which nobody asked for."""
    start = Path(start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "_toc.yml").exists():
            return folder
    raise BookError(f"No _toc.yml in {start} or above: run dori-book from the book's folder, or pass --root.")


def book_root(path: Path | str) -> Path:
    """``--root``: the folder itself must be a book (hold ``_toc.yml``); a parent that is one does not count, so
    ``--root student`` never runs the repository's chapters."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise BookError(f"--root {path}: no such folder.")
    if not (path / "_toc.yml").is_file():
        raise BookError(f"--root {path} is not a book: it has no _toc.yml (a book's folder holds _toc.yml, "
                        "_config.yml, profiles/ and chapters/). Student copies are notebooks to open, not a book to run.")
    return path


def read_notebook(path: Path):
    """A notebook, or an error that names the file and how to get it back (a killed write leaves broken JSON)."""
    import nbformat

    try:
        return nbformat.read(path, as_version=4)
    except Exception as error:
        raise BookError(f"{path} is not a readable notebook ({type(error).__name__}: {str(error)[:200]}). "
                        f"Restore the committed version with `git checkout -- {path}`.") from None


def replace_file(source: Path, target: Path) -> None:
    """Move ``source`` over ``target`` in one step, so that ``target`` is always either the old or the new file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(source, target)
    except OSError:  # another file system: copy beside the target first, then rename
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        shutil.copy2(source, partial)
        os.replace(partial, target)
        source.unlink()


def _toc_entries(node) -> list[str]:
    entries = []
    if isinstance(node, dict):
        if "file" in node:
            entries.append(node["file"])
        for key in ("parts", "chapters", "sections"):
            for child in node.get(key, []) or []:
                entries.extend(_toc_entries(child))
    elif isinstance(node, list):
        for child in node:
            entries.extend(_toc_entries(child))
    return entries


def _resolve_page(root: Path, entry: str) -> Path:
    path = root / entry
    if path.suffix in (".ipynb", ".md"):
        return path
    for suffix in (".ipynb", ".md"):
        if path.with_suffix(suffix).exists():
            return path.with_suffix(suffix)
    return path.with_suffix(".ipynb")  # not written yet: chapters are notebooks


def toc_pages(root: Path) -> list[Path]:
    """Every page in ``_toc.yml`` order, root page first, as paths (which may not exist yet)."""
    import yaml

    toc = yaml.safe_load((root / "_toc.yml").read_text()) or {}
    if "root" not in toc:
        raise BookError(f"{root / '_toc.yml'} has no 'root:' entry.")
    return [_resolve_page(root, entry) for entry in [toc["root"], *_toc_entries(toc)]]


def toc_chapters(root: Path) -> list[Path]:
    """The notebooks of ``_toc.yml``, in order: what ``run`` executes."""
    return [page for page in toc_pages(root) if page.suffix == ".ipynb"]


def select_chapters(chapters: list[Path], root: Path, patterns: list[str] | None) -> list[Path]:
    """Chapters matching any pattern (glob on file name or path, or a prefix such as ``02``), in toc order."""
    if not patterns:
        return list(chapters)
    selected = []
    for pattern in patterns:
        hits = [c for c in chapters if fnmatch.fnmatch(c.name, pattern) or c.name.startswith(pattern)
                or fnmatch.fnmatch(c.relative_to(root).as_posix(), pattern)]
        if not hits:
            names = ", ".join(c.name for c in chapters)
            raise BookError(f"--chapters {pattern!r} matches no chapter in _toc.yml ({names}).")
        selected.extend(h for h in hits if h not in selected)
    return [c for c in chapters if c in selected]


def load_profile(name: str, root: Path) -> dict:
    """The papermill parameters of ``profiles/<name>.yaml`` (an empty file means: the notebooks' defaults)."""
    import yaml

    path = root / "profiles" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (root / "profiles").glob("*.yaml"))
        raise BookError(f"No profile {name!r}: {path} does not exist. Known profiles: {known}.")
    try:
        parameters = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise BookError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(parameters, dict):
        raise BookError(f"{path} must map parameter names to values, got {type(parameters).__name__}.")
    return parameters


def chapter_parameters(chapter: Path) -> dict:
    """The names a chapter's ``parameters`` cell assigns, with their default values (None where not a literal)."""
    import ast

    cells = [c for c in read_notebook(chapter).cells
             if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    defaults = {}
    for cell in cells:
        for node in ast.parse(cell.source).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            for target in targets:
                if isinstance(target, ast.Name):
                    try:
                        defaults[target.id] = ast.literal_eval(node.value)
                    except ValueError:
                        defaults[target.id] = None
    return defaults


def _same_kind(value, default) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def check_profile(parameters: dict, chapters: list[Path], source: str) -> None:
    """Stop before anything runs when a profile names a parameter no chapter has (a typo would silently run the
    defaults) or gives a value of another kind than the chapters' default (``MAX_ITEMS: abc``)."""
    declared = {chapter: chapter_parameters(chapter) for chapter in chapters}
    known = sorted(set().union(*declared.values())) if declared else []
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        raise BookError(f"{source} sets {unknown}, which no chapter's parameters cell has. The chapters' parameters: "
                        f"{', '.join(known)}.")
    for chapter, defaults in declared.items():
        for name, value in parameters.items():
            if name in defaults and not _same_kind(value, defaults[name]):
                raise BookError(f"{source} sets {name} to {value!r} ({type(value).__name__}), but {chapter.name} "
                                f"expects a {type(defaults[name]).__name__} like its default {defaults[name]!r}.")


def kernel_environment(parameters: dict, results: Path | None = None) -> dict:
    """Environment variables for the kernel: the organism never needs the Hugging Face Hub, so it runs offline.

    ``results`` (set for runs into an output folder, e.g. smoke runs) redirects the chapters' ``results/``
    through ``DORI_RESULTS`` (read by ``dori_utils.book.results``), so they never overwrite the book's results.
    """
    env = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if parameters.get("BACKEND", "organism") == "organism":
        env["HF_HUB_OFFLINE"] = "1"
    if results is not None:
        env["DORI_RESULTS"] = str(results)
    return env


def machine_info() -> dict:
    """CPU count, platform, Python, torch and GPU: stored next to every timing."""
    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor(), "python": platform.python_version(), "hostname": platform.node()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = info["gpu"] = None
    return info


def gpu_warning(parameters: dict) -> str | None:
    """A warning when the profile asks for a GPU that torch cannot see."""
    if parameters.get("BACKEND", "organism") == "organism" and parameters.get("DEVICE") in (None, "cpu"):
        return None
    import torch

    if torch.cuda.is_available():
        return None
    return (f"WARNING: this profile ({parameters}) needs a CUDA GPU, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}). Chapters that ask for DEVICE='cuda' will fail. Use a GPU machine "
            "(on Colab: Runtime > Change runtime type > GPU), or run the organism: dori-book run --profile organism.")


# --------------------------------------------------------------------------------------------- notebooks

def strip_volatile(nb):
    """Drop papermill's metadata, per-cell timestamps and what went to stderr (progress bars, library warnings,
    which can name this machine's paths) outside the cells nbval checks; keep the other outputs, execution counts
    and tags."""
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        for key in VOLATILE_CELL_KEYS:
            cell.metadata.pop(key, None)
        if cell.cell_type == "code" and NBVAL_CHECK not in cell.source:
            cell.outputs = [o for o in cell.outputs if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
        if cell.metadata.get("tags") == []:  # papermill adds empty tag lists
            del cell.metadata["tags"]
    return nb


def strip_file(path: Path) -> None:
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.write(strip_volatile(nb), path)


def drop_marker_cells(nb):
    """Remove a previous run's injected-parameters cell and papermill's error banners."""
    nb.cells = [c for c in nb.cells if not {INJECTED_TAG, ERROR_MARKER_TAG} & set(c.metadata.get("tags", []))]
    return nb


def _excerpt(source: str, lines: int = 8) -> str:
    rows = source.splitlines()
    text = "\n".join("    " + row for row in rows[:lines])
    return text + (f"\n    ... ({len(rows) - lines} more lines)" if len(rows) > lines else "")


def execute_chapter(chapter: Path, output: Path, parameters: dict, kernel: str = "python3",
                    progress: bool = True, start_timeout: int = 180, results: Path | None = None,
                    scratch: Path | None = None) -> float:
    """Execute one chapter with papermill into ``output`` (may equal ``chapter``) from the chapter's folder.

    Papermill writes a scratch copy (in ``scratch``, default a temporary folder), saved after every cell; only a
    chapter that finished replaces ``output``, in one rename, so an interrupted or killed run never leaves a
    half-written notebook there. A failure keeps what ran: in ``output`` when that is not the chapter itself, else
    in the scratch copy, and the error names where. Returns the wall time in seconds; raises
    :class:`ChapterFailed` naming the failing cell (its index in the chapter as written, 0-based).
    """
    import nbformat
    import papermill
    from papermill.exceptions import PapermillExecutionError

    nb = drop_marker_cells(read_notebook(chapter))
    scratch = Path(scratch) if scratch is not None else Path(tempfile.mkdtemp(prefix="dori-run-"))
    scratch.mkdir(parents=True, exist_ok=True)
    work = scratch / chapter.name
    env = kernel_environment(parameters, results)
    saved_env = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the kernel inherits this process's environment

    def keep_partial() -> Path:
        if not work.exists():
            return work
        strip_file(work)
        if output.resolve() == chapter.resolve():
            return work  # the committed chapter stays as it was
        replace_file(work, output)
        return output

    def interrupted() -> ChapterFailed:
        return ChapterFailed(chapter, f"Interrupted during {chapter}; {output} is unchanged; partial outputs in "
                                      f"{keep_partial()}.", interrupted=True)

    started = time.perf_counter()
    try:
        papermill.execute_notebook(nb, str(work), parameters=parameters, kernel_name=kernel,
                                   cwd=str(chapter.parent), request_save_on_cell_execute=True,
                                   progress_bar=progress, start_timeout=start_timeout)
    except PapermillExecutionError as error:
        if error.ename == "KeyboardInterrupt":  # Ctrl-C reached the kernel before this process: still an interrupt
            raise interrupted() from None
        cells = [c for c in nbformat.read(work, as_version=4).cells
                 if ERROR_MARKER_TAG not in c.metadata.get("tags", [])]
        injected = sum(INJECTED_TAG in c.metadata.get("tags", []) for c in cells[: error.cell_index])
        index = error.cell_index - injected
        kept = keep_partial()
        raise ChapterFailed(chapter, (
            f"{chapter} failed at cell {index} (0-based, as written; In [{error.exec_count}]):\n"
            f"{_excerpt(error.source)}\n{error.ename}: {error.evalue}\n"
            f"Partial outputs saved in {kept}.")) from None
    except KeyboardInterrupt:
        raise interrupted() from None
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    strip_file(work)
    replace_file(work, output)
    return time.perf_counter() - started


def stage_results(results: Path, stage: Path) -> Path:
    """A scratch copy of the book's results for one chapter to write into; caches are linked, not copied (they are
    not committed, their writes are atomic, and what a chapter computes there is kept even if it fails)."""
    if stage.exists():
        shutil.rmtree(stage)
    stage.parent.mkdir(parents=True, exist_ok=True)
    if results.is_dir():
        shutil.copytree(results, stage, ignore=shutil.ignore_patterns("cache", "pilots", "*.tmp"))
        for cache in results.glob("*/cache"):
            (stage / cache.parent.name).mkdir(parents=True, exist_ok=True)
            (stage / cache.parent.name / "cache").symlink_to(cache.resolve(), target_is_directory=True)
    else:
        stage.mkdir()
    return stage


def publish_results(stage: Path, results: Path) -> list[Path]:
    """Move every file a finished chapter wrote or changed in ``stage`` into ``results``, each in one rename."""
    published = []
    for folder, subfolders, files in os.walk(stage):
        subfolders[:] = [name for name in subfolders if not (Path(folder) / name).is_symlink()]
        for name in files:
            source = Path(folder) / name
            target = results / source.relative_to(stage)
            if not target.exists() or target.read_bytes() != source.read_bytes():
                replace_file(source, target)
                published.append(target)
    return published


def write_timings(path: Path, profile: str, entries: list[dict]) -> None:
    """Merge this run's chapter timings into ``path`` (one entry per chapter, latest run wins)."""
    old = json.loads(path.read_text()) if path.exists() else {}
    chapters = {entry["chapter"]: entry for entry in old.get("chapters", [])}
    chapters.update({entry["chapter"]: entry for entry in entries})
    done = [e["seconds"] for e in chapters.values() if e["status"] == "ok"]
    record = {"profile": profile, "machine": machine_info(), "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "total_seconds": round(sum(done), 1), "chapters": sorted(chapters.values(), key=lambda e: e["order"])}
    from dori_utils.book.results import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")


class _SigintRecorder:
    """Notes that Ctrl-C arrived (and raises KeyboardInterrupt as Python does), so that a chapter failure the kernel
    reports after it, whatever its name, counts as the interrupt and not as a failed chapter. Only the main thread
    can install it; elsewhere it records nothing."""

    def __init__(self):
        self.received = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        self.received = True
        raise KeyboardInterrupt

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


# --------------------------------------------------------------------------------------------- commands

def run_book(root: Path, profile: str = "organism", patterns: list[str] | None = None, build: bool = True,
             output_dir: Path | None = None, progress: bool = True, kernel: str = "python3") -> int:
    from tqdm import tqdm

    parameters = load_profile(profile, root)
    all_chapters = toc_chapters(root)
    chapters = select_chapters(all_chapters, root, patterns)
    missing = [c for c in chapters if not c.exists()]
    if missing:
        raise BookError("Chapters listed in _toc.yml do not exist: " + ", ".join(map(str, missing)))
    check_profile(parameters, [c for c in all_chapters if c.exists()], str(root / "profiles" / f"{profile}.yaml"))
    if output_dir is None and profile != IN_PLACE_PROFILE:
        output_dir = root / "_build" / profile
    in_place = output_dir is None
    warning = gpu_warning(parameters)
    if warning:
        print(warning, file=sys.stderr)
    where = f"into {output_dir}" if output_dir else "in place"
    print(f"dori-book run: profile {profile!r} {parameters or '(notebook defaults)'}, {len(chapters)} chapter(s), "
          f"executed {where}")
    # In place, a chapter writes into scratch copies (notebook and results) that replace the committed files only
    # once it has finished: an interrupted run leaves every committed file as it was.
    scratch = root / "_build" / "run"
    entries, timings = [], root / "results" / f"timings-{profile}.json"
    bar = tqdm(chapters, desc=f"chapters ({profile})", unit="chapter", disable=not progress, position=0)
    failure, finished = None, []
    sigint = _SigintRecorder()
    try:
        for chapter in bar:
            rel = chapter.relative_to(root)
            bar.set_postfix_str(rel.name)
            output = (output_dir / rel) if output_dir else chapter
            results = stage_results(root / "results", scratch / "results") if in_place else output_dir / "results"
            entry = {"chapter": rel.as_posix(), "order": all_chapters.index(chapter),
                     "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            try:
                seconds = execute_chapter(chapter, output, parameters, kernel=kernel, progress=progress,
                                          results=results, scratch=scratch / "notebooks")
            except ChapterFailed as error:
                # after a Ctrl-C any failure is the interrupt's doing, whatever the kernel reported first
                error.interrupted = error.interrupted or sigint.received
                failure = error
                if not error.interrupted:
                    entries.append({**entry, "status": "failed", "seconds": None})
                break
            if in_place:
                publish_results(results, root / "results")
            finished.append(rel.as_posix())
            entries.append({**entry, "status": "ok", "seconds": round(seconds, 1)})
            write_timings(timings, profile, entries)
            tqdm.write(f"  {rel.as_posix():<48} {seconds:7.1f} s")
    except KeyboardInterrupt:
        failure = ChapterFailed(chapter, "Interrupted between chapters.", interrupted=True)
    finally:
        sigint.restore()
    bar.close()
    if failure is not None and not failure.interrupted:  # finished chapters were recorded as they finished
        write_timings(timings, profile, entries)
    total = sum(e["seconds"] or 0 for e in entries)
    if failure:
        done = ", ".join(finished) or "none"
        print(f"\n{'INTERRUPTED' if failure.interrupted else 'FAILED'}: {failure}\nFinished and kept: {done}. "
              f"The chapters after them are unchanged. Timings: {timings}", file=sys.stderr)
        return 130 if failure.interrupted else 1
    print(f"All {len(chapters)} chapter(s) ran in {total:.1f} s. Timings: {timings}")
    if not build:
        return 0
    if output_dir:
        root = stage_book(root, output_dir)
    return build_book(root)


def stage_book(root: Path, target: Path) -> Path:
    """Copy the book's sources other than executed chapters into ``target`` so that it builds there."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(root / name, target / name)
    for page in toc_pages(root):
        if page.suffix != ".ipynb" and page.exists():
            (target / page.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(page, target / page.relative_to(root))
    for name in BOOK_DIRS_TO_STAGE:
        if (root / name).is_dir():
            shutil.copytree(root / name, target / name, dirs_exist_ok=True)
    return target


def build_book(root: Path) -> int:
    """``jupyter-book build . -W --keep-going`` in ``root``, echoed and logged to ``_build/logs/build.log``."""
    log = root / "_build" / "logs" / "build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())",
               "build", ".", "-W", "--keep-going"]
    print(f"Building the book: jupyter-book build . -W --keep-going  (in {root}; log {log})")
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            sys.stdout.write(line)
            out.write(line)
        code = process.wait()
    if code != 0:
        print(f"\nFAILED: jupyter-book build exited with {code} (warnings are errors). Log: {log}", file=sys.stderr)
        return code
    print(f"Built {root / '_build' / 'html' / 'index.html'} in {time.perf_counter() - started:.0f} s")
    return 0


def is_solution(cell) -> bool:
    return SOLUTION_TAG in cell.metadata.get("tags", []) or (
        cell.cell_type == "code" and cell.source.lstrip().startswith("# SOLUTION"))


def student_copy(nb):
    """Solutions replaced by placeholders, outputs and execution counts cleared, metadata stripped."""
    import nbformat

    nb = drop_marker_cells(nb)
    cells, exercise, answered = [], None, set()
    for cell in nb.cells:
        heading = EXERCISE_HEADING.search(cell.source) if cell.cell_type == "markdown" else None
        if heading:
            exercise = heading.group(1)
        if is_solution(cell):
            label = SOLUTION_LABEL.search(cell.source)
            number = label.group(1) if label else exercise
            if number is not None and number in answered:
                continue  # one answer cell per exercise
            answered.add(number)
            code = (f"# Exercise {number}: your solution here" if number else SOLUTION_PLACEHOLDER_CODE)
            text = (f"*Your answer to exercise {number} here.*" if number else SOLUTION_PLACEHOLDER_MARKDOWN)
            placeholder = (nbformat.v4.new_code_cell(code) if cell.cell_type == "code"
                           else nbformat.v4.new_markdown_cell(text))
            if "id" in cell:
                placeholder.id = cell.id  # same ids on every run: student copies diff cleanly
            cell = placeholder
        tags = [t for t in cell.metadata.get("tags", []) if t not in (SOLUTION_TAG, "hide-cell")]
        cell.metadata = {"tags": tags} if tags else {}
        if cell.cell_type == "code" and MEASURED_TEXT_TAG not in tags:  # students read the text, numbers included
            cell.outputs, cell.execution_count = [], None
        cells.append(cell)
    nb.cells = cells
    nb.metadata = {k: v for k, v in nb.metadata.items() if k in ("kernelspec", "language_info")}
    return nb


def write_student_copies(root: Path, out: Path) -> list[Path]:
    import nbformat

    written = []
    out.mkdir(parents=True, exist_ok=True)
    for chapter in toc_chapters(root):
        if not chapter.exists():
            print(f"  skipped (not written yet): {chapter.relative_to(root)}")
            continue
        target = out / chapter.name
        nb = student_copy(read_notebook(chapter))
        nbformat.validate(nb)
        nbformat.write(nb, target)
        written.append(target)
        print(f"  {target}")
    return written


def find_chromium(explicit: str | None = None) -> str:
    for candidate in (explicit, os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and Path(candidate).exists():
            return candidate
    raise BookError("Chromium not found. Install it (Debian/Ubuntu: `apt-get update && apt-get install -y "
                    "chromium`), or point CHROMIUM=/path/to/chrome at another build.")


def trim_page(shot: Path, margin: int = 40, content_left: int = 300, blank: int = 1000) -> None:
    """Cut a full-height screenshot where the page ends: at the first run of ``blank`` empty rows (the theme pins
    its footer to the window's bottom edge, so the page's end is a long blank gap, not the last drawn row).
    Only columns right of ``content_left`` count: the sidebar's border runs to the bottom."""
    import numpy as np
    from PIL import Image

    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"))[:, content_left:]
        rows = np.nonzero((pixels < 245).any(axis=1))[0]
        if len(rows) < 2:
            return
        gaps = np.nonzero(np.diff(rows) > blank)[0]
        last = int(rows[gaps[0]] if len(gaps) else rows[-1])
        trimmed = image.crop((0, 0, image.width, min(image.height, last + margin)))
    trimmed.save(shot)


def screenshots(root: Path, out: Path, chromium: str | None = None, timeout: int = 120, height: int = 24000,
                widths: tuple[int, ...] = (1280,)) -> list[Path]:
    """Render every built page of ``_toc.yml`` in headless Chromium and save a full-page screenshot per window
    width (``<page>-<width>.png``; 400 is a phone): the window is ``height`` pixels tall (enough for every
    chapter) and the blank space below the page is cut off."""
    html = root / "_build" / "html"
    pages = [html / page.relative_to(root).with_suffix(".html") for page in toc_pages(root)]
    missing = [p for p in pages if not p.exists()]
    if missing:
        raise BookError(f"Built pages missing ({', '.join(map(str, missing))}): run `dori-book build` first.")
    browser = find_chromium(chromium)
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    for page in pages:
        for width in widths:
            name = page.relative_to(html).with_suffix("").as_posix().replace("/", "__")
            shot = out / f"{name}-{width}.png"
            shot.unlink(missing_ok=True)
            with tempfile.TemporaryDirectory(prefix="dori-chromium-") as profile_dir:
                command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           "--hide-scrollbars", f"--user-data-dir={profile_dir}", f"--window-size={width},{height}",
                           f"--screenshot={shot}", page.as_uri()]
                result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            if not shot.exists():
                raise BookError(f"Chromium wrote no screenshot for {page} at {width} px (exit {result.returncode}):\n"
                                f"{result.stderr[-2000:]}")
            # a narrow window has no sidebar: the whole width is content
            trim_page(shot, content_left=300 if width >= 1000 else 0)
            shots.append(shot)
            print(f"  {shot}")
    return shots


def setup_cell_source(root: Path) -> str:
    """The guarded first cell of every chapter, with the repository URL read from ``_config.yml``."""
    import yaml

    repository = (yaml.safe_load((root / "_config.yml").read_text()) or {}).get("repository", {})
    url, branch = repository_url(root), repository.get("branch", "main")
    folder = "/content/" + url.split("/")[-1]
    return f'''# Setup. On Colab: fetch the book and install its package (Colab's own torch is kept). Elsewhere: nothing.
import os, subprocess, sys
if "google.colab" in sys.modules:
    if not os.path.isdir("{folder}"):
        subprocess.run(["git", "clone", "--depth", "1", "--branch", "{branch}", "{url}", "{folder}"], check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "{folder}"], check=True)
    sys.path.insert(0, "{folder}")
    os.chdir("{folder}/chapters")
    import torch
    print("GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (Runtime > Change runtime type)")'''


def repository_url(root: Path) -> str:
    """The book's repository, as ``_config.yml`` sets it: the one place it is written by hand."""
    import yaml

    return (yaml.safe_load((root / "_config.yml").read_text()) or {})["repository"]["url"].rstrip("/")


def set_repository(root: Path, url: str) -> list[Path]:
    """Publish the book under ``url``: set it in ``_config.yml`` (launch buttons, repository button) and write the
    setup cell that clones it into every chapter; returns the chapters rewritten."""
    if not re.fullmatch(r"https://[^\s\"']+", url):
        raise BookError(f"{url!r} is not an https URL of a git repository (e.g. https://github.com/you/finding-dori).")
    config = root / "_config.yml"
    text, count = re.subn(r"(?m)^(  url:\s*)\S+$", lambda m: m.group(1) + url.rstrip("/"), config.read_text(), count=1)
    if count != 1:
        raise BookError(f"{config} has no 'repository: url:' line to change.")
    config.write_text(text)
    import nbformat

    source, written = setup_cell_source(root), []
    for chapter in toc_chapters(root):
        nb = read_notebook(chapter)
        first = next((c for c in nb.cells if c.cell_type == "code"), None)
        if first is not None and "google.colab" in first.source and first.source != source:
            first.source = source
            nbformat.write(nb, chapter)
            written.append(chapter)
    return written


def check_chapter(path: Path, setup_cell: str | None = None) -> list[str]:
    """Problems with a chapter's conventions (see the module docstring); an empty list when it follows them.
    ``setup_cell``: the setup cell the book's configuration asks for (``setup_cell_source``)."""
    nb = read_notebook(path)
    problems = []
    code = [c for c in nb.cells if c.cell_type == "code"]
    if not code or "google.colab" not in code[0].source:
        problems.append("the first code cell is not the guarded Colab setup cell (`dori-book setup-cell`)")
    elif setup_cell is not None and code[0].source != setup_cell:
        problems.append("the setup cell differs from the one _config.yml's repository asks for: run "
                        "`dori-book set-repository URL` (the URL in _config.yml)")
    parameters = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    if len(parameters) != 1:
        problems.append(f"needs exactly one cell tagged 'parameters' (found {len(parameters)})")
    else:
        for name in REQUIRED_PARAMETERS:
            if not re.search(rf"^{name}\s*(:[^=]*)?=", parameters[0].source, re.MULTILINE):
                problems.append(f"the parameters cell does not set {name}")
    solutions = [c for c in nb.cells if is_solution(c)]
    if not solutions:
        problems.append("no exercise solution (a code cell tagged 'solution' and 'hide-cell')")
    for cell in solutions:
        if cell.cell_type == "code" and not {"hide-cell", "hide-input"} & set(cell.metadata.get("tags", [])):
            problems.append("a solution code cell is not tagged 'hide-cell' (it would show in the book)")
    for index, cell in enumerate(nb.cells):
        exempt = (cell is code[0] or {"parameters", INJECTED_TAG, MEASURED_TEXT_TAG} & set(cell.metadata.get("tags", []))
                  or is_solution(cell))
        if cell.cell_type == "code" and not exempt:
            lines = len(cell.source.strip().splitlines())
            if lines > MAX_CELL_LINES:
                problems.append(f"code cell {index} has {lines} lines (at most {MAX_CELL_LINES} outside the setup, "
                                "parameters and solution cells): move its logic into dori_utils")
            if NAME_TEST.search(cell.source):
                problems.append(f"code cell {index} tests the backend's name: use a capability of the backend or a "
                                "parameter that a profile overrides")
        if cell.cell_type == "markdown" and "{glue" in cell.source:
            problems.append(f"markdown cell {index} quotes glued numbers, which show only in the built book: make it "
                            "a measured-text cell (results.show_text)")
        if INJECTED_TAG in cell.metadata.get("tags", []):
            problems.append(f"cell {index} holds injected parameters from a profile run (rerun with --profile organism)")
        if any(o.get("output_type") == "error" for o in cell.get("outputs", [])) and \
                "raises-exception" not in cell.metadata.get("tags", []):
            problems.append(f"cell {index} has an error output")
    return problems


# --------------------------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dori-book", description=__doc__.split("\n\n")[0].replace("``", ""))
    parser.add_argument("--root", type=Path, help="the book's folder (default: the folder holding _toc.yml)")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="execute every chapter with a profile, then build the book")
    run.add_argument("--profile", default="organism", help=f"profiles/<name>.yaml; one of {', '.join(PROFILES)}")
    run.add_argument("--chapters", nargs="+", metavar="PATTERN",
                     help="only these chapters: glob or prefix of the file name, e.g. 02 '03_*'")
    run.add_argument("--no-build", action="store_true", help="do not build the HTML book afterwards")
    run.add_argument("--output-dir", type=Path, help="write executed notebooks (and build the book) here instead "
                     "of in place; default in place for organism, _build/<profile> for the others")
    run.add_argument("--kernel", default="python3", help="Jupyter kernel (default python3 = this environment)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars (logs)")

    commands.add_parser("build", help="only build the HTML book (jupyter-book build . -W --keep-going)")
    student = commands.add_parser("student", help="write student copies: no outputs, solutions removed")
    student.add_argument("--out", type=Path, default=Path("student"))
    shots = commands.add_parser("screenshots", help="screenshot every built page with headless Chromium")
    shots.add_argument("--out", type=Path, default=Path("_build/screenshots"))
    shots.add_argument("--chromium", help="browser binary (default /usr/bin/chromium or $CHROMIUM)")
    shots.add_argument("--width", type=int, nargs="+", default=[1280],
                       help="window widths in pixels, one screenshot each (e.g. 1280 400: desktop and phone)")
    commands.add_parser("check", help="check that the chapters follow the book's conventions")
    commands.add_parser("setup-cell", help="print the guarded Colab setup cell that opens every chapter")
    publish = commands.add_parser("set-repository", help="publish under another repository: set its URL in "
                                  "_config.yml and in every chapter's setup cell")
    publish.add_argument("url", help="https URL of the repository, e.g. https://github.com/you/finding-dori")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        root = book_root(args.root) if args.root else find_root()

        def under_root(path: Path) -> Path:
            return path if path.is_absolute() else root / path

        if args.command == "run":
            output_dir = under_root(args.output_dir) if args.output_dir else None
            if output_dir is not None and output_dir.resolve() == root:
                raise BookError(f"--output-dir {output_dir} is the book's own folder: leave --output-dir out to run "
                                "in place, or name another folder.")
            return run_book(root, args.profile, args.chapters, build=not args.no_build, output_dir=output_dir,
                            progress=not args.no_progress, kernel=args.kernel)
        if args.command == "build":
            return build_book(root)
        if args.command == "student":
            chapter_folders = {c.parent.resolve() for c in toc_chapters(root)} | {root}
            if under_root(args.out).resolve() in chapter_folders:
                raise BookError(f"--out {args.out} holds the book's own chapters or sources: student copies would "
                                "replace them. Name another folder (default: student/).")
            written = write_student_copies(root, under_root(args.out))
            print(f"Wrote {len(written)} student notebook(s) to {under_root(args.out)}")
            return 0
        if args.command == "screenshots":
            shots = screenshots(root, under_root(args.out), args.chromium, widths=tuple(args.width))
            print(f"Wrote {len(shots)} screenshot(s) to {under_root(args.out)}")
            return 0
        if args.command == "check":
            failures = 0
            for chapter in toc_chapters(root):
                try:
                    problems = (["missing"] if not chapter.exists()
                                else check_chapter(chapter, setup_cell_source(root)))
                except BookError as error:
                    problems = [str(error)]
                failures += bool(problems)
                print(f"{'ok  ' if not problems else 'FAIL'} {chapter.relative_to(root)}")
                for problem in problems:
                    print(f"     - {problem}")
            return 1 if failures else 0
        if args.command == "setup-cell":
            print(setup_cell_source(root))
            return 0
        if args.command == "set-repository":
            written = set_repository(root, args.url)
            print(f"_config.yml and {len(written)} chapter setup cell(s) now name {args.url}")
            return 0
    except BookError as error:
        print(f"dori-book: {error}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
