"""MICON-Bench end to end: task cards + templates + a judge server -> case records -> report."""

import json

import pytest
import yaml
from tests.eval.eval_fakes import FakeOpenAIServer, Reply, ScriptedJudge, build_micon, make_png, micon_reply
from PIL import Image

from dar.eval.judges import OpenAIJudge
from dar.eval.micon import TASKS, load_cases, load_templates, resolve_ref, run_micon
from dar.eval.report import summarize, to_markdown, write_report
from dar.eval.runs import RunStore

ALL = {task: 2 for task in TASKS}
FAILS = {
    ("object_composition", "case_0000"): {"A_check_1"},  # A capped at .4 -> 88.0
    ("spatial_geometric_constraints", "case_0000"): {"C_check_1", "C_check_2"},  # C = min(2/4, .4) -> 88.0
}
BROKEN = ("local_element_transfer", "case_0001")
JUDGE_STATE = {"broken": BROKEN}  # the judge never answers this case usably (until a test "fixes" it)


def responder(req, index):
    prompt = req.prompt
    task, case = JUDGE_STATE["broken"]
    if f"Task: {task}" in prompt and f"case {case})" in prompt:
        return Reply("I am unable to produce JSON for this image, sorry.")
    return Reply(micon_reply(prompt, FAILS, candidate=8.0))


def run(paths, out, judge, **kwargs):
    return run_micon(
        data_dir=paths["data"], templates_dir=paths["templates"], generations_dir=paths["generations"],
        model="model_x", out_dir=out, judge=judge, progress=False, **kwargs,
    )


def test_end_to_end_over_http_with_resume(tmp_path):
    paths = build_micon(tmp_path, ALL, missing={("object_composition", "case_0001")})
    out = tmp_path / "run"
    with FakeOpenAIServer(responder) as server:
        judge = OpenAIJudge(server.base_url, "judge-vl", timeout=5, max_retries=0, concurrency=3)
        summary = run(paths, out, judge, concurrency=3)
        assert (summary.total, summary.ok, summary.missing_output, summary.judge_failure) == (12, 10, 1, 1)
        first_requests = len(server.requests)
        # 11 cases with outputs get a checkpoint call (the broken one 3 times), story cases one more each
        assert first_requests == 10 + 3 + 2

        checkpoint_requests = [r for r in server.requests if "Answer in this JSON format" in r.prompt]
        assert {r.n_images for r in checkpoint_requests} == {3}  # RA, RB, then the output
        assert all("model_x" not in r.prompt for r in server.requests)  # the A/B folder name never reaches the judge

        store = RunStore.load(out)
        rec = store.load_record("object_composition", "case_0000")
        assert rec["status"] == "ok" and rec["score"] == 88.0 and rec["dimension_scores"]["A"] == 0.4
        assert rec["missing_checkpoints"] == [] and rec["output"] == "model_x/object_composition/case_0000.png"
        story = store.load_record("story_infer", "case_0001")
        assert story["candidate_score"] == 8.0 and story["plain_overall"] == 100.0
        assert story["score"] == 88.0  # 40 x 1.0 + 60 x 0.8
        broken = store.load_record(*BROKEN)
        assert broken["status"] == "judge_failure" and broken["score"] is None
        assert broken["failures"][0]["kind"] == "parse" and broken["failures"][0]["attempts"] == 3
        assert store.load_record("object_composition", "case_0001")["status"] == "missing_output"

        report = summarize(out)
        tasks = report["tasks"]
        assert (tasks["object_composition"]["mean"], tasks["object_composition"]["count"], tasks["object_composition"]["missing_outputs"]) == (88.0, 1, 1)
        assert tasks["spatial_geometric_constraints"]["mean"] == 94.0
        assert (tasks["local_element_transfer"]["count"], tasks["local_element_transfer"]["judge_failures"]) == (1, 1)
        assert tasks["story_infer"]["mean"] == 88.0
        assert tasks["object_composition"]["dimensions"]["A"] == 0.4
        assert report["overall"]["mean"] == pytest.approx(95.2)  # (4 x 88 + 6 x 100) / 10
        assert (report["overall"]["count"], report["overall"]["expected"], report["overall"]["pending"]) == (10, 12, 0)
        assert report["failed_cases"] == ["local_element_transfer/case_0001"]
        assert report["overall"]["incomplete_verdicts"] == 0

        paths_written = write_report(out)
        md = paths_written["markdown"].read_text()
        assert "| object_composition | 88.00 | 1 | 2 | 1 | 0 | 0 | 0 |" in md
        assert json.loads(paths_written["json"].read_text())["overall"]["count"] == 10
        with Image.open(paths_written["png"]) as img:
            assert img.format == "PNG" and img.size[0] > 100

        # Rerun: finished cases and the recorded failure are skipped, the missing output is re-checked.
        summary = run(paths, out, judge)
        assert (summary.skipped, summary.scored, summary.missing_output) == (11, 1, 1)
        assert len(server.requests) == first_requests

        # The output appears: only that case is scored.
        make_png(paths["generations"] / "model_x" / "object_composition" / "case_0001.png")
        summary = run(paths, out, judge)
        assert (summary.skipped, summary.scored, summary.ok) == (11, 1, 1)
        assert len(server.requests) == first_requests + 1

        # The judge is fixed; --retry-failed scores the failure again.
        JUDGE_STATE["broken"] = ("none", "none")
        try:
            summary = run(paths, out, judge, retry_failed=True)
        finally:
            JUDGE_STATE["broken"] = BROKEN
        assert (summary.scored, summary.ok) == (1, 1)
        assert summarize(out)["overall"]["count"] == 12


def scripted(candidate_reply):
    def reply(prompt, images):
        if "acceptable next steps" in prompt:
            return candidate_reply
        return micon_reply(prompt)

    return ScriptedJudge(reply)


def test_candidate_failure_strict_vs_released(tmp_path):
    paths = build_micon(tmp_path, {"story_infer": 1})
    strict = tmp_path / "strict"
    run(paths, strict, scripted("no idea"), compat="strict")
    rec = RunStore.load(strict).load_record("story_infer", "case_0000")
    assert rec["status"] == "judge_failure" and rec["score"] is None and rec["failures"][0]["stage"] == "candidate"

    released = tmp_path / "released"
    run(paths, released, scripted("no idea"), compat="released")
    rec = RunStore.load(released).load_record("story_infer", "case_0000")
    assert rec["status"] == "ok" and rec["candidate_score"] == 0.0 and rec["score"] == 40.0
    assert rec["failures"][0]["scored_as"] == 0.0
    report = summarize(released)
    assert report["overall"]["failures_scored_as_zero"] == 1 and report["overall"]["judge_failures"] == 0

    # A run directory cannot be resumed under other settings.
    with pytest.raises(ValueError, match="compat"):
        run(paths, released, scripted("{}"), compat="strict")


def test_story_without_candidates(tmp_path):
    paths = build_micon(tmp_path, {"story_infer": 1})
    (paths["data"] / "story_infer" / "simple_candidate_template.json").unlink()
    with pytest.raises(FileNotFoundError, match="candidates_file"):
        run(paths, tmp_path / "a", scripted("{}"))
    run(paths, tmp_path / "b", scripted("{}"), story_candidates=False)
    rec = RunStore.load(tmp_path / "b").load_record("story_infer", "case_0000")
    assert rec["story_scoring"] == "plain" and rec["score"] == 100.0 and "candidate_score" not in rec


def test_case_without_candidate_answers_is_an_input_error(tmp_path):
    paths = build_micon(tmp_path, {"story_infer": 2})
    cand = paths["data"] / "story_infer" / "simple_candidate_template.json"
    data = json.loads(cand.read_text())
    data["cases"] = data["cases"][:1]
    cand.write_text(json.dumps(data))
    judge = scripted('{"score": 5}')
    run(paths, tmp_path / "r", judge)
    rec = RunStore.load(tmp_path / "r").load_record("story_infer", "case_0001")
    assert rec["status"] == "input_error" and rec["failures"][0]["kind"] == "missing_candidates"
    assert sum("case_0001" in c[0] for c in judge.calls) == 0  # no judge call was spent on it


def test_unparseable_checkpoint_reply_is_never_scored_even_in_released_mode(tmp_path):
    paths = build_micon(tmp_path, {"object_composition": 1})
    judge = ScriptedJudge(lambda prompt, images: "All good!")
    run(paths, tmp_path / "r", judge, compat="released", parse_retries=1)
    rec = RunStore.load(tmp_path / "r").load_record("object_composition", "case_0000")
    assert rec["status"] == "judge_failure" and rec["score"] is None
    assert [c[2] for c in judge.calls] == [False, True]  # the retry bypasses caches
    assert summarize(tmp_path / "r")["overall"]["mean"] is None


def test_partial_reply_counts_missing_checkpoints_as_failed(tmp_path):
    paths = build_micon(tmp_path, {"object_composition": 1})
    judge = ScriptedJudge(lambda p, i: '{"checkpoint_results": {"A_check_1": 1, "A_check_2": 1, "A_check_3": 1, "Z": 1, "F_check_1": 1}}')
    run(paths, tmp_path / "r", judge)
    rec = RunStore.load(tmp_path / "r").load_record("object_composition", "case_0000")
    assert rec["dimension_scores"] == {"A": 1.0, "B": 0.0, "C": 0.0, "D": 0.0, "G": 0.0} and rec["score"] == 20.0
    assert "B_check_1" in rec["missing_checkpoints"] and rec["unexpected_checkpoints"] == ["F_check_1"]
    report = summarize(tmp_path / "r")
    assert report["overall"]["incomplete_verdicts"] == 1
    assert "1 scored case(s) had judge replies missing some checkpoints" in to_markdown(report)


def test_templates_and_cards_are_validated(tmp_path):
    paths = build_micon(tmp_path, {"object_composition": 1})
    qa = paths["templates"] / "Q&A" / "object_composition.qa.txt"
    qa.write_text(qa.read_text().replace("D_check_4", "D_check_9"))
    with pytest.raises(ValueError, match="D_check_9"):
        load_templates(paths["templates"], ["object_composition"])
    (paths["templates"] / "judge_prompt.template.txt").write_text("no placeholders here")
    with pytest.raises(ValueError, match="TASK_QA_BLOCK"):
        load_templates(paths["templates"], ["object_composition"])
    with pytest.raises(FileNotFoundError, match="templates_dir"):
        load_templates(tmp_path / "nope")

    card_path = paths["data"] / "object_composition" / "cases" / "case_0000.yaml"
    card = yaml.safe_load(card_path.read_text())
    cases = load_cases(paths["data"])
    assert cases[0].refs["RA"] == paths["data"] / "object_composition" / "refs" / "case_0000_RA.png"
    del card["generation_prompt"]
    card_path.write_text(yaml.safe_dump(card))
    with pytest.raises(ValueError, match="generation_prompt"):
        load_cases(paths["data"])
    with pytest.raises(ValueError, match="task"):
        load_cases(paths["data"], ["bogus_task"])


def test_resolve_ref_follows_the_released_rule(tmp_path):
    data = tmp_path / "data"
    assert resolve_ref("data/story_infer/refs/a.png", data) == data / "story_infer/refs/a.png"
    assert resolve_ref("story_infer/refs/a.png", data) == data / "story_infer/refs/a.png"
    assert resolve_ref(str(tmp_path / "abs.png"), data) == tmp_path / "abs.png"


def test_one_writer_per_run_directory(tmp_path):
    store = RunStore.open(tmp_path / "r", {"benchmark": "micon"}, {}, {"t": ["1"]})
    try:
        with pytest.raises(RuntimeError, match="another process"):
            RunStore.open(tmp_path / "r", {"benchmark": "micon"}, {}, {})
    finally:
        store.close()
    RunStore.open(tmp_path / "r", {"benchmark": "micon"}, {}, {"t": ["2"]}).close()
    assert RunStore.load(tmp_path / "r").expected() == {"t": ["1", "2"]}
