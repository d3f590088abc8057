"""Unreadable case records and judge-cache entries never stop a run (issue 15, item 2)."""

import json
import warnings

import pytest
from tests.eval.eval_fakes import ScriptedJudge, build_mico, make_png

from dar.eval.compare import compare
from dar.eval.judges import ResponseCache, TransformersJudge
from dar.eval.mico import run_mico
from dar.eval.report import summarize
from dar.eval.runs import RunStore

GROUP = "mico_bench_object_centric"
# What a killed disk, a stray editor or another tool can leave in a case file.
BAD_RECORDS = {
    "empty": b"",
    "truncated": b'{"benchmark": "mico", "task": "mico_bench_object_centric", "case_id": "1", "sta',
    "garbage": b"\xff\xfe\x00garbage\x9c",
    "list": b'[{"task": "mico_bench_object_centric", "case_id": "1", "status": "ok", "score": 1.0}]',
    "no status": b'{"task": "mico_bench_object_centric", "case_id": "1"}',
    "score is text": b'{"task": "mico_bench_object_centric", "case_id": "1", "status": "ok", "score": "high"}',
    "other case": b'{"task": "mico_bench_object_centric", "case_id": "2", "status": "ok", "score": 5.0}',
}


def reply(prompt, images):
    if "Answer with exactly one word" in prompt:
        return "yes"
    return "[8, 8]"


def scored_run(tmp_path):
    groups = {GROUP: [
        {"idx": i, "input": [f"{GROUP}/{i}/0.png"], "reference": f"{GROUP}/{i}/reference.png", "prompt": f"Object {i}.",
         "human_indices": []} for i in range(3)]}
    fx = build_mico(tmp_path, groups=groups)
    out = tmp_path / "run"

    def score():
        judge = ScriptedJudge(reply)
        run_mico(bench_dir=fx.bench, results_dir=fx.results, model=fx.model, out_dir=out, judge=judge, progress=False)
        return judge

    assert len(score().calls) == 3 * 3
    return out, score


@pytest.mark.parametrize("content", list(BAD_RECORDS.values()), ids=list(BAD_RECORDS))
def test_an_unreadable_record_is_kept_aside_named_in_a_warning_and_scored_again(tmp_path, content):
    out, score = scored_run(tmp_path)
    case_dir = out / "cases" / GROUP
    good = (case_dir / "1.json").read_bytes()
    (case_dir / "1.json").write_bytes(content)

    # reports and comparisons read around it: the case counts as not scored, nothing is moved
    with pytest.warns(RuntimeWarning, match=r"1\.json"):
        summary = summarize(out)
    assert summary["overall"]["count"] == 2 and summary["overall"]["pending"] == 1
    with pytest.warns(RuntimeWarning, match=r"1\.json"):
        assert compare(out, out, n_resamples=100).overall.n_pairs == 2
    assert (case_dir / "1.json").read_bytes() == content

    # a scoring run keeps the bad file aside and scores that case (only that one) again
    with pytest.warns(RuntimeWarning, match=r"1\.json.*kept as 1\.json\.corrupt"):
        judge = score()
    assert len(judge.calls) == 3 and all("Object 1." in p for p, _, _ in judge.calls if "Prompt following" in p)
    assert (case_dir / "1.json.corrupt").read_bytes() == content
    assert json.loads((case_dir / "1.json").read_bytes()) == json.loads(good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert summarize(out)["overall"]["count"] == 3

    # a second bad copy does not overwrite the first one kept aside
    (case_dir / "1.json").write_bytes(content)
    with pytest.warns(RuntimeWarning, match=r"kept as 1\.json\.corrupt-1"):
        score()
    assert (case_dir / "1.json.corrupt-1").read_bytes() == content


def test_an_unreadable_case_list_is_rebuilt_and_run_settings_are_named_when_unreadable(tmp_path):
    out, score = scored_run(tmp_path)
    (out / "expected.json").write_bytes(b'{"mico_bench_object_ce')
    with pytest.warns(RuntimeWarning, match="expected.json"):
        assert summarize(out)["overall"]["expected"] == 3  # counted from the records
    with pytest.warns(RuntimeWarning, match=r"expected\.json.*kept as expected\.json\.corrupt"):
        assert len(score().calls) == 0
    assert json.loads((out / "expected.json").read_text()) == {GROUP: ["0", "1", "2"]}
    (out / "run.json").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match=r"run\.json is unreadable"):
        score()
    with pytest.raises(ValueError, match=r"run\.json is unreadable"):
        RunStore.load(out).identity


BAD_ENTRIES = {
    "empty": b"",
    "truncated": b'{"model": "m", "reply": "{\\"checkpoint',
    "garbage": b"\x89\x00\xff",
    "list": b'["a reply"]',
    "no reply": b'{"model": "m"}',
    "reply not text": b'{"model": "m", "reply": 7}',
}


class Pipeline:
    def __init__(self):
        self.calls = 0

    def __call__(self, **kwargs):
        self.calls += 1
        return [{"generated_text": f"fresh reply {self.calls}"}]


@pytest.mark.parametrize("content", list(BAD_ENTRIES.values()), ids=list(BAD_ENTRIES))
def test_an_unreadable_judge_cache_entry_is_a_miss(tmp_path, content, caplog):
    image = make_png(tmp_path / "x.png")
    pipe = Pipeline()
    judge = TransformersJudge("local-judge", pipeline=pipe, cache_dir=tmp_path / "cache")
    assert judge.complete("q", [image]) == "fresh reply 1"
    (entry,) = (tmp_path / "cache").rglob("*.json")
    entry.write_bytes(content)
    assert judge.complete("q", [image]) == "fresh reply 2"  # asked again instead of failing
    assert pipe.calls == 2 and entry.name in caplog.text
    assert json.loads(entry.read_text())["reply"] == "fresh reply 2"  # and the entry is whole again
    assert judge.complete("q", [image]) == "fresh reply 2" and pipe.calls == 2
    assert ResponseCache(tmp_path / "cache").get(entry.stem) == "fresh reply 2"
