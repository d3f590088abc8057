"""A generated image that is empty or not an image is a generation error: never judged, never scored
(issue 22, item 4)."""

import pytest
from tests.eval.eval_fakes import ScriptedJudge, build_micon, micon_reply
from tests.eval.test_eval_input_paths import GROUP, good_case, mico_reply

from dar.eval.mico import run_mico
from dar.eval.micon import run_micon
from dar.eval.report import summarize
from dar.eval.runs import RunStore

BAD_OUTPUTS = {"empty": b"", "text": b"this is not an image at all", "short": b"\x89PN"}


@pytest.mark.parametrize("content", list(BAD_OUTPUTS))
def test_mico_bad_generated_image_is_a_generation_error(tmp_path, content):
    from tests.eval.eval_fakes import write_jsonl

    bench, results = tmp_path / "bench", tmp_path / "results"
    cases = [good_case(bench, results, "m", i) for i in range(3)]
    (results / "m" / GROUP / "1.png").write_bytes(BAD_OUTPUTS[content])
    write_jsonl(bench / f"{GROUP}.jsonl", cases)
    judge = ScriptedJudge(mico_reply)
    summary = run_mico(bench_dir=bench, results_dir=results, model="m", out_dir=tmp_path / "run", judge=judge,
                       progress=False)
    records = {r["case_id"]: r for r in RunStore.load(tmp_path / "run").records()}
    bad = records["1"]
    assert bad["status"] == "generation_error" and bad["score"] is None
    assert bad["failures"][0]["kind"] == "not_an_image" and "1.png" in bad["failures"][0]["error"]
    assert records["0"]["status"] == records["2"]["status"] == "ok"
    sent = [p.name for _, images, _ in judge.calls for p in images]
    assert "1.png" not in sent and "0.png" in sent
    assert summary.generation_error == 1
    report = summarize(tmp_path / "run")
    assert report["overall"]["generation_errors"] == 1 and f"{GROUP}/1" in report["failed_cases"]


def test_micon_bad_generated_image_is_a_generation_error_and_rechecked_on_rerun(tmp_path):
    paths = build_micon(tmp_path, {"object_composition": 2})
    bad = paths["generations"] / "model_x" / "object_composition" / "case_0001.png"
    good_bytes = bad.read_bytes()
    bad.write_bytes(b"")
    judge = ScriptedJudge(lambda prompt, images: micon_reply(prompt))
    kw = dict(data_dir=paths["data"], templates_dir=paths["templates"], generations_dir=paths["generations"],
              model="model_x", out_dir=tmp_path / "run", judge=judge, progress=False)
    run_micon(**kw)
    records = {r["case_id"]: r for r in RunStore.load(tmp_path / "run").records()}
    assert records["case_0001"]["status"] == "generation_error" and records["case_0000"]["status"] == "ok"
    assert all(bad.name not in [p.name for p in images] for _, images, _ in judge.calls)
    bad.write_bytes(good_bytes)  # regenerated: the rerun scores it
    summary = run_micon(**kw)
    assert summary.skipped == 1 and summary.ok == 1
