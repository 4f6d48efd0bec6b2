"""Every chapter on the Stable Diffusion path, as a GPU user runs it, on a tiny random SD-1.x pipeline: no Hub, no
downloads. The pipeline is saved with ``save_pretrained`` and passed through ``BACKEND_OPTIONS``, with an SSCD
stand-in and prompt tables in NeMo's schema. A row budget of 4 guards the UNet: any call with gradients over 4
rows fails its chapter, so a pass shows that every method splits its batches to fit.

Part of the README's test command: the six chapters take about 100 seconds on 2 free cores. (Measured at 13
minutes for chapter 0 alone while another torch job held a core: the kernels' threads then wait on each other.)"""
from pathlib import Path

import pytest

from conftest import save_tiny_sscd
from dori_utils.book import execute_chapter

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = sorted((ROOT / "chapters").glob("0*.ipynb"))
FIXTURES = Path(__file__).parent / "fixtures"
ROW_BUDGET = 4


@pytest.fixture(scope="module")
def sd_options(tiny_sd, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd-inputs")
    # NeMo's schema (";"-separated, an unnamed row column): 16 non-memorized prompts, enough for every control set
    rows = [f"{i};a photo of object number {i} on a table;https://example.com/{i}.jpg;{1000 + i}" for i in range(16)]
    (folder / "unmemorized.csv").write_text(";Caption;URL;Index\n" + "\n".join(rows) + "\n")
    return {"model_id": tiny_sd, "sscd_path": str(save_tiny_sscd(folder / "sscd.pt")),
            "prompt_table": str(FIXTURES / "nemo_memorized_6.csv"), "unmemorized_table": str(folder / "unmemorized.csv"),
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
