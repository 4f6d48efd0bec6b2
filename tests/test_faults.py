"""Faults and bad inputs, as a hostile but fair user meets them: each test reproduces one probe of issue 33 and
asserts that nothing committed changes and that the error says what to do."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import torch
from test_book import PARAMETERS, code, make_book, notebook

from dori_utils import attack, finetune, nemo, wanda
from dori_utils.book import chapter5, cli, results
from dori_utils.backends import load_backend
from dori_utils.metrics import memorization_rate
from dori_utils.sampling import generate

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------- not finite

def test_nan_scores_are_not_counted_as_not_replicated():
    with pytest.raises(ValueError, match="NaN or infinite"):
        memorization_rate(torch.tensor([[float("nan"), float("nan")], [0.9, 0.9]]), 0.7)


def test_weights_file_with_a_valid_header_and_random_bytes_is_refused(tiny_organism_dir, tmp_path):
    copy = shutil.copytree(tiny_organism_dir, tmp_path / "organism")
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    raw = weights.read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    noise = torch.randint(0, 256, (len(raw) - header,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    weights.write_bytes(raw[:header] + bytes(noise.tolist()))
    with pytest.raises(Exception, match="NaN or infinite.*damaged"):
        load_backend("organism", device="cpu", path=copy)


def test_nemo_refuses_a_nan_embedding(tiny_backend):
    embedding = torch.full((1, *tiny_backend.embedding_shape), float("nan"))
    with pytest.raises(ValueError, match="NaN or infinite"):
        nemo.detect(tiny_backend, embedding, threshold=0.5, seeds=[0, 1])


def test_sampling_stops_when_the_model_turns_nan(tiny_backend):
    weight = tiny_backend.unet.conv_in.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight[0, 0, 0, 0] = float("nan")
        with pytest.raises(FloatingPointError, match="NaN or infinite"):
            generate(tiny_backend, tiny_backend.encode_prompts(["a red cube"]), [0])
    finally:
        with torch.no_grad():
            weight.copy_(saved)


# --------------------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("sparsity", [0, 0.0, -0.1, 1, 1.5, True])
def test_wanda_sparsity_must_be_a_share(sparsity, generator):
    weight = torch.randn(4, 8, generator=generator)
    norms = torch.rand(2, 8, generator=generator)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        wanda.select_weights(weight, norms, norms * 0.5, sparsity)


def test_encode_prompts_refuses_a_bare_string(tiny_backend):
    with pytest.raises(TypeError, match="pass \\[prompt\\]"):
        tiny_backend.encode_prompts("a photo of a cat")


def test_attack_refuses_uint8_targets_and_an_empty_batch(tiny_backend):
    item = tiny_backend.memorized[0]
    start = tiny_backend.encode_prompts([item.prompt])
    uint8 = (item.references[:1] * 255).to(torch.uint8)
    with pytest.raises(ValueError, match="divide uint8 images by 255"):
        attack.dori_attack(tiny_backend, uint8, start, steps=1)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        attack.dori_attack(tiny_backend, item.references[:1], start, steps=1, batch_size=0)


@pytest.mark.parametrize("options, message", [
    ({"max_items": -1}, "max_items must be at least 1"),
    ({"max_items": "abc"}, "max_items must be at least 1.*'abc' \\(str\\)"),
    ({"num_inference_steps": 0}, "num_inference_steps must be at least 1"),
])
def test_backend_counts_are_checked(tiny_organism_dir, options, message):
    with pytest.raises(ValueError, match=message):
        load_backend("organism", device="cpu", path=tiny_organism_dir, **options)


def test_generate_refuses_zero_steps_to_stop_after(tiny_backend):
    with pytest.raises(ValueError, match="stop_after must be at least 1"):
        generate(tiny_backend, tiny_backend.encode_prompts(["a red cube"]), [0], stop_after=0)


# --------------------------------------------------------------------------------------------- the cache

def _fill_entry(folder: str, outcomes) -> None:
    def compute():
        time.sleep(0.5)  # both writers compute at once
        return torch.arange(3)

    save = torch.save

    def slow_save(*args, **kwargs):  # both have written their file before either renames it
        save(*args, **kwargs)
        time.sleep(0.5)

    torch.save = slow_save  # in this forked writer only
    try:
        outcomes.put(results.cached(folder, "entry", {"a": 1}, compute).tolist())
    except Exception as error:  # what the test looks for: no writer may fail
        outcomes.put(repr(error))


def test_two_processes_filling_one_cache_entry_both_succeed(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    outcomes = context.Queue()
    writers = [context.Process(target=_fill_entry, args=(str(tmp_path), outcomes)) for _ in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=60)
    assert [outcomes.get(timeout=5) for _ in writers] == [[0, 1, 2], [0, 1, 2]]
    assert results.cached(tmp_path, "entry", {"a": 1}, lambda: pytest.fail("recomputed")).tolist() == [0, 1, 2]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_an_unwritable_cache_fails_before_computing_and_names_the_folder(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # a file where the folder should be: unwritable even for root
    with pytest.raises(PermissionError, match=f"Cannot write results to {blocker / 'cache'}"):
        results.cached(blocker / "cache", "statistics", {}, lambda: pytest.fail("computed before the check"))


def test_a_kill_between_weights_and_key_never_pairs_key_a_with_weights_b(tiny_backend, tmp_path, monkeypatch):
    out = tmp_path / "finetuned"
    original = tiny_backend.unet.conv_in.weight.detach().clone()
    finetune.finetune_cached(tiny_backend, out, {"run": "A"}, lambda: tiny_backend)
    changed = tiny_backend.with_unet(__import__("copy").deepcopy(tiny_backend.unet), "changed")
    with torch.no_grad():
        changed.unet.conv_in.weight.add_(1.0)
    real_save = type(tiny_backend).save_pretrained

    def killed_after_the_weights(self, *args, **kwargs):
        real_save(self, *args, **kwargs)  # unet/ written, finetune.json (the key) not yet
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tiny_backend), "save_pretrained", killed_after_the_weights)
    with pytest.raises(KeyboardInterrupt):
        finetune.finetune_cached(tiny_backend, out, {"run": "B"}, lambda: changed)
    monkeypatch.undo()
    again = finetune.finetune_cached(tiny_backend, out, {"run": "A"}, lambda: pytest.fail("entry A was lost"))
    assert torch.equal(again.backend.unet.conv_in.weight, original)


# --------------------------------------------------------------------------------------------- results' provenance

def test_smoke_runs_write_beside_the_full_results(tmp_path, monkeypatch):
    monkeypatch.setenv("DORI_RESULTS", str(tmp_path))
    assert results.chapter_log("ch3_activation_divergence", "organism", smoke=True).path == \
        tmp_path / "organism-smoke" / "ch3_activation_divergence.json"
    assert results.chapter_log("ch3_activation_divergence", "organism", smoke=False).path == \
        tmp_path / "organism" / "ch3_activation_divergence.json"


@pytest.mark.parametrize("chapter", sorted((ROOT / "chapters").glob("0*.ipynb")), ids=lambda p: p.stem)
def test_every_chapter_logs_its_results_by_run(chapter):
    """So that a papermill or Jupyter run with SMOKE = True never writes over the committed results."""
    sources = [c.source for c in nbformat.read(chapter, as_version=4).cells if c.cell_type == "code"]
    assert any("results.chapter_log(" in s and "SMOKE)" in s for s in sources)
    assert not any("results.ResultLog(" in s for s in sources)


def test_chapter_5_stops_on_chapter_1_results_from_another_run(tmp_path, monkeypatch):
    monkeypatch.setenv("DORI_RESULTS", str(tmp_path))
    partial = results.chapter_log("ch1_pruning", "organism", smoke=False)
    partial.record("NeMo + Dori", {"mr": 1.0})  # the run stopped before Wanda
    with pytest.raises(results.ResultsMissing, match="lacks"):
        chapter5.pruning_results("organism", smoke=False)


# --------------------------------------------------------------------------------------------- dori-book's inputs

def test_a_profile_with_an_unknown_key_stops_and_lists_the_parameters(tmp_path):
    root = make_book(tmp_path / "book", {"00_ok": notebook(code(PARAMETERS, tags=["parameters"]))})
    (root / "profiles" / "typo.yaml").write_text("MAX_ITEM: 1\n")
    with pytest.raises(cli.BookError, match=r"sets \['MAX_ITEM'\].*BACKEND, BACKEND_OPTIONS, DEVICE, N, SMOKE"):
        cli.run_book(root, "typo", build=False, progress=False)


def test_a_profile_value_of_the_wrong_kind_stops(tmp_path):
    root = make_book(tmp_path / "book", {"00_ok": notebook(code(PARAMETERS, tags=["parameters"]))})
    (root / "profiles" / "bad.yaml").write_text("N: abc\n")
    with pytest.raises(cli.BookError, match="sets N to 'abc' \\(str\\), but 00_ok.ipynb expects a int"):
        cli.run_book(root, "bad", build=False, progress=False)


def test_a_profile_that_is_not_yaml_names_its_file(tmp_path):
    root = make_book(tmp_path / "book", {"00_ok": notebook(code(PARAMETERS, tags=["parameters"]))})
    (root / "profiles" / "broken.yaml").write_text("N: [1, 2\n")
    with pytest.raises(cli.BookError, match="broken.yaml is not valid YAML"):
        cli.load_profile("broken", root)


def test_the_shipped_profiles_fit_the_chapters():
    chapters = cli.toc_chapters(ROOT)
    for profile in (ROOT / "profiles").glob("*.yaml"):
        cli.check_profile(cli.load_profile(profile.stem, ROOT), chapters, profile.name)


def test_run_outside_a_book_stops_instead_of_running_the_repositorys_chapters(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cli.BookError, match="No _toc.yml"):
        cli.find_root()
    assert cli.main(["check"]) == 1 and "No _toc.yml" in capsys.readouterr().err


@pytest.mark.parametrize("folder", ["student", "missing", "empty"])
def test_root_must_be_a_book(tmp_path, folder, capsys):
    root = make_book(tmp_path / "book", {"00_ok": notebook(code(PARAMETERS, tags=["parameters"]))})
    (root / "student").mkdir()
    (tmp_path / "empty").mkdir()
    target = {"student": root / "student", "missing": tmp_path / "missing", "empty": tmp_path / "empty"}[folder]
    assert cli.main(["--root", str(target), "run", "--no-build"]) == 1
    assert ("no such folder" if folder == "missing" else "is not a book") in capsys.readouterr().err
    assert not nbformat.read(root / "chapters" / "00_ok.ipynb", as_version=4).cells[0].outputs


def test_student_copies_never_go_over_the_chapters(tmp_path, capsys):
    root = make_book(tmp_path / "book", {"00_ok": notebook(code(PARAMETERS, tags=["parameters"]))})
    assert cli.main(["--root", str(root), "student", "--out", "chapters"]) == 1
    assert "would replace them" in capsys.readouterr().err


def test_an_unreadable_notebook_is_named(tmp_path, capsys):
    root = make_book(tmp_path / "book", {"00_ok": notebook(code(PARAMETERS, tags=["parameters"]))})
    broken = root / "chapters" / "00_ok.ipynb"
    broken.write_text(broken.read_text()[:50])  # what a kill during the write used to leave
    for command in (["check"], ["student"], ["run", "--no-build"]):
        assert cli.main(["--root", str(root), *command]) == 1
        captured = capsys.readouterr()
        assert f"{broken} is not a readable notebook" in captured.out + captured.err
    with pytest.raises(cli.BookError, match=f"{broken} is not a readable notebook.*git checkout"):
        cli.run_book(root, "organism", build=False, progress=False)


# --------------------------------------------------------------------------------------------- interrupted runs

SLOW_CHAPTER = [
    code(PARAMETERS, tags=["parameters"]),
    code('from dori_utils.book import results\nlog = results.chapter_log("ch0_slow", BACKEND, SMOKE)\n'
         'log.record("started", True)'),
    code('import os, pathlib, time\npathlib.Path(os.environ["DORI_TEST_MARKER"]).write_text("running")\n'
         'time.sleep(float(os.environ["DORI_TEST_SLEEP"]))'),
    code('log.record("finished", True)\nprint("x" * 100000)'),
]


def committed_book(tmp_path: Path) -> Path:
    """A one-chapter book in its own git repository, run once so that its chapter and results are committed."""
    root = make_book(tmp_path / "book", {"00_slow": notebook(*SLOW_CHAPTER)})
    (root / ".gitignore").write_text("_build/\nresults/**/*.tmp\n")
    environment = {**os.environ, "DORI_TEST_MARKER": str(tmp_path / "marker"), "DORI_TEST_SLEEP": "0"}
    environment.pop("DORI_RESULTS", None)
    subprocess.run([sys.executable, "-m", "dori_utils.book", "--root", str(root), "run", "--no-build", "--no-progress"],
                   env=environment, check=True, capture_output=True)
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "committed book"], check=True)
    assert (root / "results" / "organism" / "ch0_slow.json").exists()
    return root


def git_status(root: Path) -> str:
    return subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True,
                          check=True).stdout


def start_run(root: Path, tmp_path: Path, sleep: float) -> subprocess.Popen:
    marker = tmp_path / "marker"
    marker.unlink(missing_ok=True)
    environment = {**os.environ, "DORI_TEST_MARKER": str(marker), "DORI_TEST_SLEEP": str(sleep),
                   # results in place, as `dori-book run` on the organism does
                   "DORI_RESULTS": str(root / "results")}
    process = subprocess.Popen(
        [sys.executable, "-m", "dori_utils.book", "--root", str(root), "run", "--no-build", "--no-progress"],
        env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "the chapter never started"
        time.sleep(0.1)
    return process


@pytest.mark.parametrize("signal_", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_an_interrupted_run_changes_no_committed_file(tmp_path, signal_):
    root = committed_book(tmp_path)
    process = start_run(root, tmp_path, sleep=30)
    os.killpg(process.pid, signal_)
    _, err = process.communicate(timeout=60)
    assert git_status(root) == "", err
    if signal_ == signal.SIGINT:
        assert process.returncode == 130
        assert "INTERRUPTED" in err and "00_slow.ipynb is unchanged" in err and "Finished and kept: none" in err
    # the next run starts over from the scratch folder it left, and finishes
    finished = start_run(root, tmp_path, sleep=0)
    assert finished.wait(timeout=120) == 0
    assert json.loads((root / "results" / "organism" / "ch0_slow.json").read_text())["finished"] is True


def test_a_kill_while_the_notebook_is_written_leaves_the_committed_one(tmp_path, monkeypatch):
    root = committed_book(tmp_path)
    monkeypatch.setenv("DORI_TEST_MARKER", str(tmp_path / "marker"))
    monkeypatch.setenv("DORI_TEST_SLEEP", "0")
    monkeypatch.setenv("DORI_RESULTS", str(root / "results"))

    def killed_mid_write(path):
        path.write_text(path.read_text()[:1000])  # what SIGKILL during papermill's write used to leave
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "strip_file", killed_mid_write)
    assert cli.run_book(root, "organism", build=False, progress=False) == 130
    assert git_status(root) == ""
    nbformat.read(root / "chapters" / "00_slow.ipynb", as_version=4)  # still whole


def test_an_interrupt_that_reaches_the_kernel_first_is_still_an_interrupt(tmp_path, capsys):
    """Ctrl-C signals the whole process group: when the kernel gets it first, papermill reports a cell error,
    which must not count as a failed chapter (its timing would overwrite the committed one's)."""
    chapter = notebook(code(PARAMETERS, tags=["parameters"]), code("raise KeyboardInterrupt"))
    root = make_book(tmp_path / "book", {"00_ctrl_c": chapter})
    before = (root / "chapters" / "00_ctrl_c.ipynb").read_text()
    assert cli.run_book(root, "organism", build=False, progress=False) == 130
    assert "INTERRUPTED" in capsys.readouterr().err
    assert (root / "chapters" / "00_ctrl_c.ipynb").read_text() == before
    assert not (root / "results" / "timings-organism.json").exists()
