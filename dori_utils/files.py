"""Files the library writes: a check that a folder takes them before the work that fills it starts."""
from __future__ import annotations

import tempfile
from pathlib import Path


def check_writable(folder: str | Path) -> Path:
    """Make ``folder`` and write a file in it, before hours of computing would be lost to a folder that cannot
    take the result; the error names the folder and what to do."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise PermissionError(f"Cannot write results to {folder} ({error.strerror or error}). Make it writable, or "
                              "point DORI_RESULTS at a writable folder.") from None
    return folder
