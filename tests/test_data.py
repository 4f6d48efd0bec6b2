"""Prompt tables, the download cache and ground-truth folders, on small fixtures in the upstream schemas."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dori_utils import data

FIXTURES = Path(__file__).parent / "fixtures"
MEMORIZED = FIXTURES / "nemo_memorized_6.csv"
UNMEMORIZED = FIXTURES / "nemo_unmemorized_4.csv"
WEN = FIXTURES / "wen_memorized_4.jsonl"


def test_nemo_memorized_table():
    table = data.load_nemo_memorized(MEMORIZED, expected_rows=6)
    assert list(table.columns) == data.TABLE_COLUMNS + ["mean_sscd", "max_sscd"]
    assert table["kind"].value_counts().to_dict() == {"VM": 3, "TM": 3}
    assert table["id"].iloc[0] == "1030727993"
    # Doubled quotes inside a quoted field, as in the upstream file (Wen's jsonl has the same caption).
    assert table["prompt"].iloc[2] == '"Watch: Passion Pit\'s New Video, ""Lifted Up (1985)"""'
    assert np.isnan(table["max_sscd"].iloc[5])  # upstream has 13 TM rows without SSCD values


def test_nemo_unmemorized_table():
    table = data.load_nemo_unmemorized(UNMEMORIZED, expected_rows=4)
    assert list(table.columns) == data.TABLE_COLUMNS
    assert set(table["kind"]) == {"none"}
    assert "panorama; three images" in table["prompt"].iloc[3]  # a ';' inside a quoted caption


def test_wen_table_matches_nemo():
    wen = data.load_wen_memorized(WEN, expected_rows=4)
    nemo = data.load_nemo_memorized(MEMORIZED, expected_rows=6)
    assert list(wen.columns) == data.TABLE_COLUMNS
    assert wen[["id", "prompt", "url"]].equals(nemo[["id", "prompt", "url"]].head(4))


def test_default_row_count_is_upstream():
    with pytest.raises(ValueError, match="expected 500 rows"):
        data.load_nemo_memorized(MEMORIZED)
    with pytest.raises(ValueError, match="expected 500 rows"):
        data.load_wen_memorized(WEN)


def test_truncated_file_raises():
    with pytest.raises(ValueError, match=r"unparseable rows .*\[5\]"):
        data.load_nemo_memorized(FIXTURES / "nemo_memorized_corrupt.csv", expected_rows=None)


def test_wrong_columns_raise(tmp_path):
    with pytest.raises(ValueError, match="expected columns"):
        data.load_nemo_memorized(UNMEMORIZED, expected_rows=None)
    comma = tmp_path / "comma.csv"
    comma.write_text(",Caption,URL,Index\n0,a cat,http://x,12\n")
    with pytest.raises(ValueError, match="expected columns"):
        data.load_nemo_unmemorized(comma, expected_rows=None)


@pytest.mark.parametrize("row", ["0;a cat;http://x;VM;0.9;0.9;12;extra", "0;a cat;http://x;XM;0.9;0.9;12",
                                 "0;a cat;http://x;VM;high;0.9;12", "0;a cat;http://x;VM;0.9;0.9;twelve"])
def test_bad_rows_raise(tmp_path, row):
    path = tmp_path / "bad.csv"
    path.write_text(";Caption;URL;type;mean_sscd;max_sscd;Index\n" + row + "\n")
    with pytest.raises(ValueError, match=str(path)):
        data.load_nemo_memorized(path, expected_rows=None)


def test_bad_jsonl_line_raises(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(WEN.read_text() + '{"caption": "a cat", "url": "http://x"}\n')
    with pytest.raises(ValueError, match="line 5"):
        data.load_wen_memorized(path, expected_rows=None)


def test_missing_local_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="local copy"):
        data.load_nemo_memorized(tmp_path / "nowhere.csv")


def test_fetch_file_caches_and_records_checksum(tmp_path, monkeypatch):
    url = MEMORIZED.resolve().as_uri()
    cache = tmp_path / "cache"
    path = data.fetch_file(url, cache)
    assert path.read_bytes() == MEMORIZED.read_bytes()
    assert path.with_name(path.name + ".sha256").read_text().strip() == data.file_sha256(MEMORIZED)

    def no_network(url, path):
        raise AssertionError("downloaded twice")

    monkeypatch.setattr(data, "_download", no_network)
    assert data.fetch_file(url, cache) == path
    assert len(data.load_nemo_memorized(url, cache_dir=cache, expected_rows=6)) == 6


def test_fetch_file_detects_corruption(tmp_path):
    url = MEMORIZED.resolve().as_uri()
    path = data.fetch_file(url, tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="Checksum mismatch .*delete it"):
        data.fetch_file(url, tmp_path)


def test_fetch_file_pinned_checksum(tmp_path):
    url = MEMORIZED.resolve().as_uri()
    assert data.fetch_file(url, tmp_path, sha256=data.file_sha256(MEMORIZED)).exists()
    with pytest.raises(ValueError, match="expected sha256 0000"):
        data.fetch_file(url, tmp_path, sha256="0" * 64)
    with pytest.raises(ValueError, match="Checksum mismatch"):
        data.load_nemo_memorized(MEMORIZED, sha256="0" * 64, expected_rows=6)


def test_fetch_file_network_failure(tmp_path):
    url = (tmp_path / "missing.csv").as_uri()
    with pytest.raises(ConnectionError, match="missing.csv.*local path"):
        data.fetch_file(url, tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())  # no partial file left to pass for a cached one


def test_ground_truth_folder(tmp_path):
    (tmp_path / "12").mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "12" / "a.png")
    Image.new("L", (20, 20), 128).save(tmp_path / "12" / "b.jpg")
    images = data.load_ground_truth_folder(tmp_path, [12], size=16)
    assert set(images) == {"12"}
    assert images["12"].shape == (2, 3, 16, 16)
    assert torch.allclose(images["12"][0, :, 8, 8], torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(FileNotFoundError, match=r"1 of 2 ids .*\['13'\]"):
        data.load_ground_truth_folder(tmp_path, ["12", "13"], size=16)


def test_result_log_writes_each_record_and_never_mixes_runs(tmp_path):
    import json

    from dori_utils.book.results import ResultLog, cache_path, cached

    path = tmp_path / "ch.json"
    first = ResultLog(path)
    first.record("a", 1)
    first.record("b", {"mr": 0.5})
    assert json.loads(path.read_text()) == {"a": 1, "b": {"mr": 0.5}}
    second = ResultLog(path)  # a new run
    second.record("a", 2)
    assert json.loads(path.read_text()) == {"a": 2}

    calls = []
    compute = lambda: calls.append(1) or len(calls)
    assert cached(tmp_path, "c", {"k": 1}, compute) == 1
    assert cached(tmp_path, "c", {"k": 1}, compute) == 1 and len(calls) == 1
    assert cached(tmp_path, "c", {"k": 2}, compute) == 2
    assert cached(tmp_path, "c", {"k": 1}, compute) == 1 and len(calls) == 2  # side by side, not evicted
    sidecar = json.loads(cache_path(tmp_path, "c", {"k": 2}).with_suffix(".json").read_text())
    assert sidecar["params"] == {"k": 2} and sidecar["name"] == "c" and sidecar["dori_utils"]
    cache_path(tmp_path, "c", {"k": 2}).write_bytes(b"not a torch file")  # e.g. an interrupted copy
    with pytest.warns(UserWarning, match="could not be read"):
        assert cached(tmp_path, "c", {"k": 2}, compute) == 3
    assert cached(tmp_path, "c", {"k": 2}, compute) == 3  # and the recomputed entry replaced it
    with pytest.raises(ValueError, match="cache name"):
        cached(tmp_path, "a/b", {}, compute)
