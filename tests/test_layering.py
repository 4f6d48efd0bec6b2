"""Issue 31: the library never imports the book, checked with import-linter's contract in pyproject.toml."""
import shutil
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_library_does_not_import_the_book():
    command = shutil.which("lint-imports")
    assert command, "import-linter is not installed: python -m pip install -r requirements.txt"
    run = subprocess.run([command], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def test_the_contract_lists_every_library_module():
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    package = ROOT / "dori_utils"
    library = {f"dori_utils.{path.stem}" for path in package.glob("*.py") if path.stem != "__init__"}
    library |= {f"dori_utils.{path.name}" for path in package.iterdir()
                if (path / "__init__.py").exists() and path.name != "book"}
    assert set(contract["source_modules"]) == library
    assert contract["forbidden_modules"] == ["dori_utils.book"]
