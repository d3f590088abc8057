"""Case ids and paths too long for the file system are input errors, never a crash (issue 22, item 3)."""

import os

from tests.eval.eval_fakes import ScriptedJudge, make_png, write_jsonl
from tests.eval.test_eval_input_paths import GROUP, good_case, mico_reply

from dar.eval.mico import run_mico
from dar.eval.runs import CASES_DIR, RunStore, _file_name

LONG_ID = "a" * 300  # over NAME_MAX (255 bytes) as a file name
NON_ASCII_ID = "é" * 60  # 120 bytes as UTF-8, a valid image name; quoted it is 360 bytes (+ ".json")


def _run(tmp_path, bench, results):
    return run_mico(bench_dir=bench, results_dir=results, model="m", out_dir=tmp_path / "run",
                    judge=ScriptedJudge(mico_reply), progress=False)


def test_names_too_long_for_the_file_system_are_input_errors_and_reruns_go_on(tmp_path):
    bench, results = tmp_path / "bench", tmp_path / "results"
    long_id = good_case(bench, results, "m", 7)
    long_id["idx"] = LONG_ID
    deep_input = good_case(bench, results, "m", 8)
    deep_input["input"] = [f"{GROUP}/" + "d/" * 2100 + "0.png"]  # over PATH_MAX (4096 bytes)
    non_ascii = good_case(bench, results, "m", 9)
    non_ascii["idx"] = NON_ASCII_ID
    make_png(results / "m" / GROUP / f"{NON_ASCII_ID}.png", (9, 3, 3))
    write_jsonl(bench / f"{GROUP}.jsonl", [good_case(bench, results, "m", 0), long_id, deep_input, non_ascii,
                                           good_case(bench, results, "m", 1)])
    for attempt in range(2):  # the rerun must neither crash nor rescore what is done
        summary = _run(tmp_path, bench, results)
        assert summary.total == 5
        records = {r["case_id"]: r for r in RunStore.load(tmp_path / "run").records()}
        assert {i: records[i]["status"] for i in ("0", "1", NON_ASCII_ID)} == dict.fromkeys(("0", "1", NON_ASCII_ID), "ok")
        for bad in (LONG_ID, "8"):
            assert records[bad]["status"] == "input_error"
            assert "too long" in records[bad]["failures"][0]["error"]
        assert summary.skipped == (3 if attempt else 0)
    names = [p.name for p in (tmp_path / "run" / CASES_DIR).rglob("*.json")]
    assert len(names) == 5 and max(len(n.encode()) for n in names) <= 205


def test_record_names_are_bounded_and_short_names_unchanged():
    # Names as they were before the bound, so resuming an existing run directory finds its records.
    assert _file_name("12") == "12" and _file_name("case_1-b") == "case_1-b"
    assert _file_name("a b/c") == "a%20b%2Fc" and _file_name(".hidden") == "%2Ehidden"
    assert _file_name("x" * 200) == "x" * 200
    long_names = {_file_name(i) for i in ("x" * 201, "x" * 202, LONG_ID, NON_ASCII_ID, "é" * 61)}
    assert len(long_names) == 5  # distinct ids, distinct names
    for name in long_names:
        assert len(name.encode()) <= 200 and name.startswith(("xxxx", "aaaa", "%C3%A9")) and "+" in name
    assert _file_name("x" * 201) != _file_name("x" * 200)
    assert all("+" not in _file_name(i) for i in ("a+b", "+", "x" * 200))  # '+' is quoted: no collisions
    assert os.sep not in "".join(long_names)
