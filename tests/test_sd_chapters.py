"""Every chapter on the Stable Diffusion path, as a GPU user runs it, on a tiny random SD-1.x pipeline: no Hub, no
downloads. The pipeline is saved with ``save_pretrained`` and passed through ``BACKEND_OPTIONS``, with an SSCD
stand-in and prompt tables in NeMo's schema. A row budget of 4 guards the UNet: any call with gradients over 4
rows fails its chapter, so a pass shows that every method splits its batches to fit.

The second test takes the path of a Colab user who leaves ``BACKEND_OPTIONS`` empty: the same pipeline sits in
the Hugging Face cache under ``CompVis/stable-diffusion-v1-4`` (``HF_HUB_OFFLINE=1``), SSCD in torch's hub cache
and NeMo's tables in ``dori_utils``' download cache, all under a fresh home folder, so every default path and
loader is the real one and only the network is missing.

Part of the README's test command: the six chapters take about 100 seconds on 2 free cores, and 150 seconds on one
core in the second test (50 sampling steps, the default). (Measured at 13
minutes for chapter 0 alone while another torch job held a core: the kernels' threads then wait on each other.)"""
import os
import shutil
from pathlib import Path

import pytest

from dori_utils.book.tiny_sd import save_tiny_sscd, write_unmemorized_table
from dori_utils import data
from dori_utils.book.cli import execute_chapter
from dori_utils.metrics import SSCD_URL
from dori_utils.sd import SD_MODEL_ID

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "chapters").glob("0*.ipynb"))
FIXTURES = Path(__file__).parent / "fixtures"
ROW_BUDGET = 4


def write_full_memorized_table(path: Path) -> Path:
    """The 6-row fixture padded with template (TM) rows to the 500 rows that the default loader checks for, as
    NeMo's file has; its verbatim (VM) rows, the ones the chapters use, stay the fixture's three."""
    lines = (FIXTURES / "nemo_memorized_6.csv").read_text().splitlines()
    lines += [f"{i};a template caption number {i};https://example.com/t{i}.jpg;TM;;;{2000 + i}"
              for i in range(len(lines) - 1, data.UPSTREAM_ROWS)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def sd_options(tiny_sd, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd-inputs")
    return {"model_id": tiny_sd, "sscd_path": str(save_tiny_sscd(folder / "sscd.pt")),
            "prompt_table": str(FIXTURES / "nemo_memorized_6.csv"),
            "unmemorized_table": str(write_unmemorized_table(folder / "unmemorized.csv")),
            "reference_cache": str(folder / "references"), "row_budget": ROW_BUDGET, "sampling_batch": 4,
            "num_inference_steps": 4, "item_ids": ["1030727993", "567947515"]}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return tmp_path_factory.mktemp("sd-results")  # one folder: chapter 5 reads chapter 1's results


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_every_chapter_runs_on_stable_diffusion_within_the_row_budget(chapter, sd_options, results, tmp_path):
    parameters = {"BACKEND": "sd-v1-4", "SMOKE": True, "DEVICE": "cpu", "BACKEND_OPTIONS": sd_options}
    execute_chapter(chapter, tmp_path / chapter.name, parameters, progress=False, results=results)
    assert (results / "sd-v1-4").is_dir()


@pytest.fixture(scope="module")
def colab_home(tiny_sd, tmp_path_factory) -> Path:
    """A home folder as a first online run leaves it: the pipeline in the Hugging Face cache under the real model id,
    SSCD where ``load_sscd`` downloads it, NeMo's two tables where ``data.fetch_file`` downloads them."""
    home = tmp_path_factory.mktemp("home")
    revision = "0" * 40
    repository = home / ".cache" / "huggingface" / "hub" / f"models--{SD_MODEL_ID.replace('/', '--')}"
    shutil.copytree(tiny_sd, repository / "snapshots" / revision)
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(revision)
    sscd = home / ".cache" / "torch" / "hub" / "sscd" / os.path.basename(SSCD_URL)
    sscd.parent.mkdir(parents=True)
    save_tiny_sscd(sscd)
    cache = home / ".cache" / "dori_utils"
    memorized = data.cached_file_path(data.NEMO_MEMORIZED_URL, cache)
    memorized.parent.mkdir(parents=True)
    write_full_memorized_table(memorized)
    write_unmemorized_table(data.cached_file_path(data.NEMO_UNMEMORIZED_URL, cache), rows=data.UPSTREAM_ROWS)
    return home


@pytest.fixture
def as_colab_user(colab_home, monkeypatch):
    """Every cache at its default place under ``colab_home``, and no network (the kernel inherits this)."""
    monkeypatch.setenv("HOME", str(colab_home))
    for variable in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def colab_results(tmp_path_factory):
    return tmp_path_factory.mktemp("colab-results")


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_every_chapter_runs_from_the_caches_with_empty_backend_options(chapter, as_colab_user, colab_results,
                                                                       tmp_path):
    parameters = {"BACKEND": "sd-v1-4", "SMOKE": True, "DEVICE": "cpu"}  # BACKEND_OPTIONS: the chapter's own {}
    execute_chapter(chapter, tmp_path / chapter.name, parameters, progress=False, results=colab_results)
    assert (colab_results / "sd-v1-4").is_dir()
