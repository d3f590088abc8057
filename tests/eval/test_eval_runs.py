"""Run directories and atomic writes."""

import json

import pytest

from dar.eval.atomic import atomic_write_json
from dar.eval.runs import RunStore, find_output, is_finished


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"x": 1})
    with pytest.raises(ValueError):
        atomic_write_json(target, {"x": float("nan")})  # NaN is not JSON: refused, old file intact
    assert json.loads(target.read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_open_removes_only_its_own_stale_temp_files(tmp_path):
    run = tmp_path / "run"
    (run / "cases" / "t").mkdir(parents=True)
    (run / "judge_cache" / "ab").mkdir(parents=True)
    stale_case = run / "cases" / "t" / ".1.json.tmp-abc123"
    stale_top = run / ".run.json.tmp-xyz"
    cache_tmp = run / "judge_cache" / "ab" / ".k.json.tmp-q"  # may belong to another process sharing the cache
    for path in (stale_case, stale_top, cache_tmp):
        path.write_text("partial")
    RunStore.open(run, {"benchmark": "micon"}, {}, {}).close()
    assert not stale_case.exists() and not stale_top.exists() and cache_tmp.exists()


def test_records_are_validated_and_case_ids_are_safe_file_names(tmp_path):
    with RunStore.open(tmp_path / "r", {"benchmark": "mico"}, {}, {}) as store:
        with pytest.raises(ValueError, match="status"):
            store.write_record({"task": "g", "case_id": "1", "status": "great"})
        with pytest.raises(ValueError, match="case_id"):
            store.write_record({"task": "g", "status": "ok"})
        path = store.write_record({"task": "g", "case_id": "../../evil/.x", "status": "ok", "score": 1.0})
        assert (tmp_path / "r" / "cases") in path.parents
        store.write_record({"task": "g", "case_id": "10", "status": "ok", "score": 2.0})
        store.write_record({"task": "g", "case_id": "9", "status": "ok", "score": 3.0})
        assert [r["case_id"] for r in store.records()] == ["9", "10", "../../evil/.x"]  # natural order
        assert store.load_record("g", "../../evil/.x")["score"] == 1.0


def test_finished_rules():
    assert is_finished({"status": "ok"}, retry_failed=True)
    assert is_finished({"status": "judge_failure"}, retry_failed=False)
    assert not is_finished({"status": "judge_failure"}, retry_failed=True)
    assert not is_finished({"status": "missing_output"}, retry_failed=False)
    assert not is_finished({"status": "input_error"}, retry_failed=False)
    assert not is_finished(None, retry_failed=False)


def test_find_output_prefers_extensions_in_order(tmp_path, caplog):
    folder = tmp_path / "m" / "t"
    folder.mkdir(parents=True)
    (folder / "1.jpg").write_bytes(b"j")
    assert find_output(tmp_path, "m", "t", "1", (".png", ".jpg")) == folder / "1.jpg"
    (folder / "1.png").write_bytes(b"p")
    assert find_output(tmp_path, "m", "t", "1", (".png", ".jpg")) == folder / "1.png"
    assert "several outputs" in caplog.text
    assert find_output(tmp_path, "m", "t", "2", (".png",)) is None
