"""Tests of the book tooling (dori_utils/book/cli.py) on throwaway notebooks, and of the built book when there is one."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import nbformat
import pytest
import yaml

from dori_utils.book import cli

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = ["00_memorization", "01_pruning_is_fragile", "02_trigger_spread", "03_activation_divergence",
            "04_inconsistent_weights", "05_adversarial_finetuning"]


def code(source, tags=(), outputs=(), count=None):
    cell = nbformat.v4.new_code_cell(source, outputs=list(outputs), execution_count=count)
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def markdown(source, tags=()):
    cell = nbformat.v4.new_markdown_cell(source)
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def notebook(*cells):
    nb = nbformat.v4.new_notebook(cells=list(cells))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


PARAMETERS = 'BACKEND = "organism"\nDEVICE = None\nSMOKE = False\nBACKEND_OPTIONS = {}\nN = 3'


def make_book(root: Path, chapters: dict[str, nbformat.NotebookNode]) -> Path:
    """A tiny book: intro.md, chapters/<name>.ipynb in toc order, the real _config.yml and profiles."""
    (root / "chapters").mkdir(parents=True)
    (root / "profiles").mkdir()
    (root / "intro.md").write_text("# Intro\n")
    for name, nb in chapters.items():
        nbformat.write(nb, root / "chapters" / f"{name}.ipynb")
    toc = {"format": "jb-book", "root": "intro",
           "parts": [{"caption": "Book", "chapters": [{"file": f"chapters/{n}"} for n in chapters]}]}
    (root / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))
    (root / "_config.yml").write_text((ROOT / "_config.yml").read_text())
    for profile in (ROOT / "profiles").glob("*.yaml"):
        (root / "profiles" / profile.name).write_text(profile.read_text())
    return root


# --------------------------------------------------------------------------------------------- the repository

def test_repository_toc_lists_the_six_chapters_then_the_course_and_the_reference_pages():
    pages = [p.relative_to(ROOT).with_suffix("").as_posix() for p in cli.toc_pages(ROOT)]
    assert pages[0] == "intro"
    assert pages[1:7] == [f"chapters/{c}" for c in CHAPTERS]
    assert all(p.startswith("course/") for p in pages[7:-2]) and pages[7:-2]
    assert pages[-2:] == ["glossary", "references"]
    assert [c.name for c in cli.toc_chapters(ROOT)] == [f"{c}.ipynb" for c in CHAPTERS]
    for page in cli.toc_pages(ROOT):
        assert page.suffix == ".ipynb" or page.exists(), page


def test_config_renders_stored_outputs_and_launches_colab():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "off"  # quoted: a bare off would be False
    assert config["only_build_toc_files"] is True
    assert config["repository"]["url"].startswith("https://") and config["repository"]["branch"] == "main"
    assert config["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    assert config["launch_buttons"]["binderhub_url"] == "https://mybinder.org"
    for pattern in ("_build", "student", "results", "benchmarks", ".ci", "tests", "README.md"):
        assert pattern in config["exclude_patterns"]
    # The URL is set in _config.yml; the setup cell is generated from it.
    assert config["repository"]["url"] in cli.setup_cell_source(ROOT)


def test_profiles():
    assert cli.load_profile("organism", ROOT) == {}
    assert cli.load_profile("smoke", ROOT) == {"SMOKE": True}  # a bool, not the string "true"
    sd = cli.load_profile("sd-v1-4", ROOT)
    assert {k: sd[k] for k in ("BACKEND", "DEVICE")} == {"BACKEND": "sd-v1-4", "DEVICE": "cuda"}
    # chapter 5's fine-tuning sizes for a GPU: numbers, not strings
    assert sd["LEARNING_RATE"] == 1e-5 and sd["DM_BATCH"] == 1 and sd["GRADIENT_CHECKPOINTING"] is True
    with pytest.raises(cli.BookError, match="Known profiles"):
        cli.load_profile("nope", ROOT)


def test_the_gpu_profiles_pass_options_that_load_backend_takes():
    import inspect

    from dori_utils.backends import DTYPES, load_backend
    from dori_utils.sd import load_stable_diffusion

    takes = set(inspect.signature(load_backend).parameters) | set(inspect.signature(load_stable_diffusion).parameters)
    for name in ("sd-v1-4", "colab"):
        profile = cli.load_profile(name, ROOT)
        options = profile["BACKEND_OPTIONS"]
        assert profile["BACKEND"] == "sd-v1-4" and set(options) <= takes, name
        assert options["dtype"] in DTYPES and isinstance(options["row_budget"], int) and options["row_budget"] >= 1
    assert cli.load_profile("colab", ROOT)["MAX_ITEMS"] <= 8  # the T4 runs a subset of the 112 items


def test_kernel_environment_is_offline_for_the_organism_only():
    assert cli.kernel_environment({})["HF_HUB_OFFLINE"] == "1"
    assert cli.kernel_environment({"SMOKE": True})["HF_HUB_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in cli.kernel_environment(cli.load_profile("sd-v1-4", ROOT))


def test_setup_cell_is_valid_python_and_guarded():
    source = cli.setup_cell_source(ROOT)
    compile(source, "setup-cell", "exec")
    assert 'if "google.colab" in sys.modules:' in source
    assert "torch" not in source.split("pip")[1].split("\n")[0]  # installs the package, not torch


# --------------------------------------------------------------------------------------------- toc, selection

def test_toc_parsing_nested_sections_and_extensions(tmp_path):
    (tmp_path / "a.md").write_text("# A")
    (tmp_path / "b.ipynb").write_text("{}")
    toc = {"format": "jb-book", "root": "a",
           "parts": [{"caption": "P", "chapters": [{"file": "b", "sections": [{"file": "c/d.ipynb"}]},
                                                   {"file": "e"}]}]}
    (tmp_path / "_toc.yml").write_text(yaml.safe_dump(toc))
    pages = cli.toc_pages(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in pages] == ["a.md", "b.ipynb", "c/d.ipynb", "e.ipynb"]
    assert [p.name for p in cli.toc_chapters(tmp_path)] == ["b.ipynb", "d.ipynb", "e.ipynb"]
    assert cli.find_root(tmp_path / "c") == tmp_path


def test_select_chapters_by_prefix_or_glob(tmp_path):
    chapters = [tmp_path / "chapters" / f"{c}.ipynb" for c in CHAPTERS]
    assert cli.select_chapters(chapters, tmp_path, None) == chapters
    assert [c.stem for c in cli.select_chapters(chapters, tmp_path, ["03", "01_*"])] == [CHAPTERS[1], CHAPTERS[3]]
    assert cli.select_chapters(chapters, tmp_path, ["chapters/05*"]) == chapters[5:]
    with pytest.raises(cli.BookError, match="matches no chapter"):
        cli.select_chapters(chapters, tmp_path, ["99"])


# --------------------------------------------------------------------------------------------- notebooks

def test_strip_volatile_keeps_outputs_and_counts():
    stream = nbformat.v4.new_output("stream", name="stdout", text="hi\n")
    nb = notebook(code("print('hi')", outputs=[stream], count=1))
    nb.metadata["papermill"] = {"duration": 1.0}
    nb.cells[0].metadata["papermill"] = {"start_time": "2026"}
    nb.cells[0].metadata["execution"] = {"iopub.execute_input": "2026"}
    nb.cells[0].metadata["tags"] = ["keep"]
    nb = cli.strip_volatile(nb)
    assert "papermill" not in nb.metadata and nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.cells[0].metadata == {"tags": ["keep"]}
    assert nb.cells[0].outputs == [stream] and nb.cells[0].execution_count == 1


def test_strip_volatile_drops_stderr_outside_the_checked_cells():
    out = nbformat.v4.new_output("stream", name="stdout", text="MR 1.00\n")
    bar = nbformat.v4.new_output("stream", name="stderr", text="sampling: 100%|##| 4/4 [/home/me/x.py]\n")
    nb = cli.strip_volatile(notebook(code("run()", outputs=[out, bar]),
                                      code("# NBVAL_CHECK_OUTPUT\nrun()", outputs=[out, bar])))
    assert nb.cells[0].outputs == [out]  # progress bars and warnings (with machine paths) are not stored
    assert nb.cells[1].outputs == [out, bar]  # what nbval compares stays as it ran


def test_student_copy_removes_solutions_and_outputs(tmp_path):
    stream = nbformat.v4.new_output("stream", name="stdout", text="42\n")
    nb = notebook(
        markdown("## Exercise 1\nCompute the answer."),
        code("answer = 6 * 7\nprint(answer)", tags=["solution", "hide-cell"], outputs=[stream], count=3),
        code("# SOLUTION\nx = 1", outputs=[stream], count=4),
        markdown("```{admonition} Solution\n:class: dropdown\nBecause.\n```", tags=["solution"]),
        code(PARAMETERS, tags=["parameters"], outputs=[stream], count=1),
    )
    nb.metadata["papermill"] = {"x": 1}
    nb.metadata["widgets"] = {"y": 2}
    make_book(tmp_path, {"00_x": nb})
    written = cli.write_student_copies(tmp_path, tmp_path / "student")
    assert [p.name for p in written] == ["00_x.ipynb"]
    copy = nbformat.read(written[0], as_version=4)
    nbformat.validate(copy)
    sources = [c.source for c in copy.cells]
    assert sources == ["## Exercise 1\nCompute the answer.", "# Exercise 1: your solution here", PARAMETERS]
    assert copy.cells[1].id == nb.cells[1].id  # stable ids: copies diff cleanly
    assert all(c.outputs == [] and c.execution_count is None for c in copy.cells if c.cell_type == "code")
    assert copy.cells[2].metadata == {"tags": ["parameters"]}
    assert set(copy.metadata) <= {"kernelspec", "language_info"}
    assert "answer = 6 * 7" not in written[0].read_text()


def test_check_chapter_conventions(tmp_path):
    good = notebook(code(cli.setup_cell_source(ROOT), tags=["hide-input"]), code(PARAMETERS, tags=["parameters"]),
                    markdown("## Exercises"), code("x = 1", tags=["solution", "hide-cell"]))
    bad = notebook(code("import torch"), code("SMOKE = False", tags=["parameters"]), code("# SOLUTION\nx = 1"),
                   code("1/0", outputs=[nbformat.v4.new_output("error", ename="ZeroDivisionError", evalue="",
                                                               traceback=[])]))
    nbformat.write(good, tmp_path / "good.ipynb")
    nbformat.write(bad, tmp_path / "bad.ipynb")
    assert cli.check_chapter(tmp_path / "good.ipynb") == []
    problems = "\n".join(cli.check_chapter(tmp_path / "bad.ipynb"))
    for expected in ("setup cell", "does not set BACKEND", "does not set DEVICE", "hide-cell", "error output"):
        assert expected in problems


def test_check_chapter_rejects_long_cells_and_tests_of_the_backend_name(tmp_path):
    long_cell = "\n".join(f"x{i} = {i}" for i in range(cli.MAX_CELL_LINES + 1))
    nb = notebook(code(cli.setup_cell_source(ROOT), tags=["hide-input"]), code(PARAMETERS, tags=["parameters"]),
                  code(long_cell), code('if backend.name == "organism":\n    pass'), code('extra = 1 if BACKEND != "sd-v1-4" else 2'),
                  code("ok = backend.utility is not None"), markdown("## Exercises"),
                  code(long_cell, tags=["solution", "hide-cell"]))
    nbformat.write(nb, tmp_path / "chapter.ipynb")
    problems = cli.check_chapter(tmp_path / "chapter.ipynb")
    assert [p.split(" has ")[0].split(" tests ")[0] for p in problems] == ["code cell 2", "code cell 3", "code cell 4"]
    assert f"{cli.MAX_CELL_LINES + 1} lines" in problems[0] and "backend's name" in problems[1]


# --------------------------------------------------------------------------------------------- execution

def test_run_reports_the_failing_cell_and_keeps_what_ran(tmp_path, capsys):
    ok = notebook(code(PARAMETERS, tags=["parameters"]), code("print('smoke' if SMOKE else 'full', N)"))
    failing = notebook(code(PARAMETERS, tags=["parameters"]), code("y = 2"),
                       code("import os\nprint(os.environ['HF_HUB_OFFLINE'], os.environ['DORI_RESULTS'])"),
                       code("# the broken cell\nraise ValueError('boom')"), code("print('never')"))
    root = make_book(tmp_path / "book", {"00_ok": ok, "01_failing": failing})

    code_ = cli.run_book(root, "smoke", build=False, output_dir=root / "out", progress=False)
    assert code_ == 1
    err = capsys.readouterr().err
    assert "chapters/01_failing.ipynb failed at cell 3" in err  # as written: the injected cell is not counted
    assert "# the broken cell" in err and "ValueError: boom" in err

    executed = nbformat.read(root / "out" / "chapters" / "00_ok.ipynb", as_version=4)
    assert executed.cells[1].metadata["tags"] == ["injected-parameters"]
    assert executed.cells[2].outputs[0]["text"] == "smoke 3\n"
    assert "papermill" not in executed.metadata
    assert all("execution" not in c.metadata and "papermill" not in c.metadata for c in executed.cells)

    partial = nbformat.read(root / "out" / "chapters" / "01_failing.ipynb", as_version=4)
    offline = [c for c in partial.cells if "HF_HUB_OFFLINE" in c.source][0]
    # Kept; the organism runs offline; results of runs into --output-dir stay there.
    assert offline.outputs[0]["text"] == f"1 {root / 'out' / 'results'}\n"

    timings = json.loads((root / "results" / "timings-smoke.json").read_text())
    assert [(c["chapter"], c["status"]) for c in timings["chapters"]] == [
        ("chapters/00_ok.ipynb", "ok"), ("chapters/01_failing.ipynb", "failed")]
    assert timings["machine"]["cpu_count"] >= 1
    # The sources are untouched: output went to --output-dir.
    source = nbformat.read(root / "chapters" / "00_ok.ipynb", as_version=4)
    assert len(source.cells) == 2 and not any(c.outputs for c in source.cells)


def test_gpu_profiles_run_beside_the_committed_outputs(tmp_path):
    nb = notebook(code(PARAMETERS, tags=["parameters"]), code("print(SMOKE)"))
    root = make_book(tmp_path / "book", {"00_ok": nb})
    # the real colab profile also sets chapter 5's sizes, which this one-chapter book does not have
    (root / "profiles" / "colab.yaml").write_text("BACKEND: sd-v1-4\nDEVICE: cuda\n")
    assert cli.run_book(root, "colab", build=False, progress=False) == 0
    executed = nbformat.read(root / "_build" / "colab" / "chapters" / "00_ok.ipynb", as_version=4)
    assert 'DEVICE = "cuda"' in executed.cells[1].source  # the colab profile's parameters were injected there
    source = nbformat.read(root / "chapters" / "00_ok.ipynb", as_version=4)
    assert len(source.cells) == 2 and not any(c.outputs for c in source.cells)


def test_run_in_place_replaces_a_previous_profile(tmp_path):
    nb = notebook(code(PARAMETERS, tags=["parameters"]), code("print(SMOKE)"))
    root = make_book(tmp_path / "book", {"00_ok": nb})
    path = root / "chapters" / "00_ok.ipynb"
    cli.execute_chapter(path, path, {"SMOKE": True}, progress=False)
    assert nbformat.read(path, as_version=4).cells[2].outputs[0]["text"] == "True\n"
    cli.execute_chapter(path, path, {}, progress=False)  # organism: the stale injected cell must go
    again = nbformat.read(path, as_version=4)
    assert len(again.cells) == 2 and again.cells[1].outputs[0]["text"] == "False\n"
    assert again.cells[1].execution_count == 2


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_follows_the_conventions(chapter):
    path = ROOT / "chapters" / f"{chapter}.ipynb"
    if not path.exists():
        pytest.skip(f"{path.name} is not written yet")
    assert cli.check_chapter(path, cli.setup_cell_source(ROOT)) == [], \
        "see the conventions at the top of dori_utils/book/cli.py"


# --------------------------------------------------------------------------------------------- the built book

@pytest.fixture(scope="module")
def built_book(tmp_path_factory):
    """The book built from the committed notebooks, in a copy of the repository (the checkout is left alone)."""
    import shutil

    copy = tmp_path_factory.mktemp("book") / "repo"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "_build", "data", "results", "student",
                                                              "*.egg-info", "__pycache__", ".pytest_cache"))
    assert cli.build_book(copy) == 0, "jupyter-book build failed (warnings are errors): see the log above"
    return copy


def test_built_chapter_pages_hold_figures_and_tables(built_book):
    html = built_book / "_build" / "html"
    for chapter in cli.toc_chapters(built_book):
        page = html / chapter.relative_to(built_book).with_suffix(".html")
        assert page.exists(), f"{page} was not built"
        text = page.read_text()
        assert "<img" in text, f"{page.name} holds no figure"
        assert "<table" in text, f"{page.name} holds no table"
        for src in re.findall(r'<img[^>]+src="([^"]+)"', text):
            if not src.startswith(("http", "data:")):
                assert (page.parent / src).resolve().exists(), f"{page.name}: missing image {src}"


def test_trim_page_cuts_at_the_blank_gap_before_a_pinned_footer(tmp_path):
    from PIL import Image, ImageDraw

    shot = tmp_path / "page.png"
    image = Image.new("RGB", (1280, 6000), "white")
    draw = ImageDraw.Draw(image)
    draw.line([(255, 0), (255, 5999)], fill="gray")  # the sidebar's border: ignored
    draw.rectangle([(400, 100), (900, 2500)], fill="black")  # the page
    draw.rectangle([(400, 5900), (700, 5950)], fill="black")  # the footer at the window's bottom
    image.save(shot)
    cli.trim_page(shot)
    assert Image.open(shot).size == (1280, 2500 + 40)


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_measured_text_shows_numbers_wherever_the_notebook_is_opened(chapter):
    """nbconvert alone (what Jupyter, Colab and GitHub show) and the student copy: numbers, no glue roles."""
    from nbconvert import MarkdownExporter

    executed = nbformat.read(ROOT / "chapters" / f"{chapter}.ipynb", as_version=4)
    for nb in (executed, cli.student_copy(nbformat.from_dict(json.loads(json.dumps(executed))))):
        text, _ = MarkdownExporter().from_notebook_node(nb)
        assert "{glue" not in text
        cells = [c for c in nb.cells if cli.MEASURED_TEXT_TAG in c.metadata.get("tags", [])]
        assert cells, "the chapter has no measured text"
        shown = ["".join(o.get("data", {}).get("text/markdown", "") for o in cell.outputs) for cell in cells]
        assert all(text and "{{" not in text for text in shown), "a measured-text cell has no output or an unfilled name"
        assert not any("not measured in this run" in text for text in shown), "the organism's run missed a number"
        assert re.search(r"\d\.\d\d", "".join(shown)), "no measured number in the chapter's text"


def test_student_copy_numbers_one_answer_cell_per_exercise():
    nb = notebook(
        markdown("### Exercise 1\nFirst."), code("# Solution to exercise 1\nx = 1", tags=["solution", "hide-cell"]),
        markdown("### Exercise 2\nSecond."),
        markdown("```{admonition} Solution to exercise 2\n:class: dropdown\nBecause.\n```", tags=["solution"]),
        markdown("### Exercise 3\nThird."), code("y = 1", tags=["solution", "hide-cell"]),
        code("z = 2", tags=["solution", "hide-cell"]))
    sources = [c.source for c in cli.student_copy(nb).cells]
    assert sources == ["### Exercise 1\nFirst.", "# Exercise 1: your solution here", "### Exercise 2\nSecond.",
                       "*Your answer to exercise 2 here.*", "### Exercise 3\nThird.", "# Exercise 3: your solution here"]


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_every_exercise_has_its_solution_under_it(chapter):
    nb = nbformat.read(ROOT / "chapters" / f"{chapter}.ipynb", as_version=4)
    numbers = [int(m.group(1)) for c in nb.cells if c.cell_type == "markdown"
               for m in [cli.EXERCISE_HEADING.search(c.source)] if m]
    assert numbers == list(range(1, len(numbers) + 1)) and numbers
    for index, cell in enumerate(nb.cells):
        heading = cli.EXERCISE_HEADING.search(cell.source) if cell.cell_type == "markdown" else None
        if heading:
            following = nb.cells[index + 1]
            assert cli.is_solution(following), f"exercise {heading.group(1)} has no solution under it"
            assert f"Solution to exercise {heading.group(1)}" in following.source


def test_set_repository_rewrites_the_config_and_every_setup_cell(tmp_path, capsys):
    root = make_book(tmp_path / "book", {"00_ok": notebook(code(cli.setup_cell_source(ROOT), tags=["hide-input"]),
                                                          code(PARAMETERS, tags=["parameters"]))})
    assert cli.main(["--root", str(root), "set-repository", "https://github.com/someone/dori-fork"]) == 0
    assert cli.repository_url(root) == "https://github.com/someone/dori-fork"
    assert "# The repository URL lives here only" in (root / "_config.yml").read_text()  # comments kept
    setup = nbformat.read(root / "chapters" / "00_ok.ipynb", as_version=4).cells[0].source
    assert setup == cli.setup_cell_source(root) and "someone/dori-fork" in setup
    stale = cli.setup_cell_source(ROOT)
    assert "differs from the one _config.yml" in " ".join(
        cli.check_chapter(root / "chapters" / "00_ok.ipynb", stale))
    assert cli.main(["--root", str(root), "set-repository", "not a url"]) == 1


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_every_figure_has_a_caption_and_alt_text(chapter):
    nb = nbformat.read(ROOT / "chapters" / f"{chapter}.ipynb", as_version=4)
    drawn = [c for c in nb.cells if c.cell_type == "code" and "plots." in c.source and not cli.is_solution(c)]
    assert drawn
    for cell in drawn:
        figure = cell.metadata.get("mystnb", {})
        assert figure.get("figure", {}).get("caption") and figure.get("image", {}).get("alt"), cell.source[:120]


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_every_chapter_opens_with_its_run_time(chapter):
    nb = nbformat.read(ROOT / "chapters" / f"{chapter}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert f'costs.run_time_note("{chapter}")' in code[1].source
    assert cli.MEASURED_TEXT_TAG in code[1].metadata["tags"]


def test_the_repository_url_is_written_by_hand_in_the_config_only():
    """The one setting lives in _config.yml; the only other copies are the setup cells that `dori-book
    set-repository` writes from it (Colab opens a chapter alone, before anything is cloned, so its setup cell
    must name the repository)."""
    url = cli.repository_url(ROOT)
    tracked = subprocess.run(["git", "-C", str(ROOT), "grep", "-l", "-F", url], capture_output=True, text=True).stdout
    if not tracked:
        pytest.skip("not a git checkout")
    assert set(tracked.split()) <= {"_config.yml", *(f"chapters/{chapter}.ipynb" for chapter in CHAPTERS)}
    for chapter in CHAPTERS:
        nb = nbformat.read(ROOT / "chapters" / f"{chapter}.ipynb", as_version=4)
        holding = [c for c in nb.cells if url in c.source]
        assert len(holding) == 1 and holding[0].source == cli.setup_cell_source(ROOT), chapter
