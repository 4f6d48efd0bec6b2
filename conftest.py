"""Shared by the unit tests and by nbval's chapter runs (``pytest tests chapters ...``).

nbval executes the chapters as they are, and a chapter writes its results into ``results/<backend>/``, the
committed files beside the committed notebooks. So that the test command never edits tracked files, the
session points ``DORI_RESULTS`` (read by ``dori_utils.book.results``; inherited by nbval's kernels) at a temporary
copy of ``results/``, caches included, so that a local run still reuses what earlier runs computed.
"""
import os
import shutil
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
_session_results: list[Path] = []


def pytest_configure(config):
    if "DORI_RESULTS" in os.environ:  # the caller chose where results go
        return
    copy = Path(tempfile.mkdtemp(prefix="dori-results-"))
    # Pilot checkpoints are hundreds of megabytes and no chapter reads them.
    shutil.copytree(RESULTS, copy, dirs_exist_ok=True, ignore=shutil.ignore_patterns("pilots"))
    os.environ["DORI_RESULTS"] = str(copy)
    _session_results.append(copy)


def pytest_unconfigure(config):
    while _session_results:
        os.environ.pop("DORI_RESULTS", None)
        shutil.rmtree(_session_results.pop(), ignore_errors=True)
