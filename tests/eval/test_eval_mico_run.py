"""MICo-Bench end to end with a scripted judge and a fake face embedder: W, SC, PQ, formulas, compat."""

import math

import pytest
from tests.eval.eval_fakes import FakeEmbedder, ScriptedJudge, build_mico, tail, unit

from dar.eval.mico import run_mico
from dar.eval.report import summarize, to_markdown
from dar.eval.runs import RunStore

SC_PQ = math.sqrt(9 * 6) * math.sqrt(8 * 7)  # 54.9909...

# Visibility answers keyed by the non-face source image.
VISIBLE = {"0/1.png": "Yes", "1/1.png": "No.", "7/2.png": "yes"}


def judge_reply(prompt, images):
    if "Answer with exactly one word" in prompt:
        return VISIBLE[tail(images[0])]
    if "Prompt following" in prompt:
        return '{"score": [9, 6], "reasoning": "close"}'
    if "Naturalness" in prompt:
        return "Scores: naturalness 8, artifacts 7, so score = [8, 7]"
    raise AssertionError(f"unexpected prompt: {prompt[:80]}")


def embedder():
    return FakeEmbedder(
        {
            # hoi/0: the source face and the output face are 60 degrees apart: cos = 0.5 -> credit 1.0
            "0/0.png": [unit(0)],
            "mico_bench_hoi/0.png": [unit(60)],
            # hoi/1: 80 degrees: cos = 0.174 -> credit 0.5
            "1/0.png": [unit(0)],
            "mico_bench_hoi/1.png": [unit(80)],
            # dere/7: two source faces, one face in the output (20 degrees from the first source)
            "7/0.png": [unit(0), unit(170)],  # largest face first: unit(0) is the identity
            "7/1.png": [unit(90)],
            "mico_bench_dere/7.png": [unit(20)],
        }
    )


def run(fx, out, judge=None, emb=None, **kwargs):
    judge = judge or ScriptedJudge(judge_reply)
    run_mico(bench_dir=fx.bench, results_dir=fx.results, model=fx.model, out_dir=out, judge=judge,
             embedder=emb or embedder(), progress=False, **kwargs)
    return RunStore.load(out), judge


def test_weighted_ref_viescore_paper_formula(tmp_path):
    fx = build_mico(tmp_path)
    store, judge = run(fx, tmp_path / "paper")
    hoi0 = store.load_record("mico_bench_hoi", "0")
    assert hoi0["face_similarities"] == [pytest.approx(0.5)] and hoi0["face_credits"] == [1.0]
    assert hoi0["element_present"] == {"1": True} and hoi0["w"] == 1.0
    assert (hoi0["pf"], hoi0["sr"], hoi0["naturalness"], hoi0["artifacts"]) == (9, 6, 8, 7)
    assert hoi0["score"] == pytest.approx(SC_PQ) and hoi0["formula"] == "paper"
    hoi1 = store.load_record("mico_bench_hoi", "1")
    assert hoi1["face_credits"] == [0.5] and hoi1["element_present"] == {"1": False}
    assert hoi1["w"] == 0.25 and hoi1["score"] == pytest.approx(0.25 * SC_PQ)
    # best matching: source 0 -> cos 20 = .94 (1.0), source 1 -> cos 70 = .342 (0.7); object yes -> W = 2.7/3
    dere = store.load_record("mico_bench_dere", "7")
    assert dere["face_credits"] == [1.0, 0.7] and dere["w"] == pytest.approx(0.9)
    assert dere["score"] == pytest.approx(0.9 * SC_PQ)

    # the De&Re refined prompt (not the plain one) is what the SC judge saw
    sc_prompts = [p for p, imgs, _ in judge.calls if "Prompt following" in p]
    assert any("Two friends at a cafe with a red umbrella." in p for p in sc_prompts)
    assert not any("old prompt" in p for p in sc_prompts)
    # SC sees (reference, output); PQ sees only the output
    for prompt, imgs, _ in judge.calls:
        if "Prompt following" in prompt:
            assert len(imgs) == 2 and imgs[0].name == "reference.png" and fx.results in imgs[1].parents
        if "Naturalness" in prompt:
            assert len(imgs) == 1 and fx.results in imgs[0].parents

    report = summarize(store)
    assert report["formula"].startswith("W x SC x PQ") and report["score_scale"] == "0-100"
    assert report["tasks"]["mico_bench_hoi"]["mean"] == pytest.approx((1 + 0.25) / 2 * SC_PQ)
    assert report["overall"]["mean"] == pytest.approx((1 + 0.25 + 0.9) / 3 * SC_PQ)
    assert "Formula: W x SC x PQ (paper definition, 0-100; upstream eval_score.py f58070c" in to_markdown(report)


def test_legacy_formula_and_hungarian_matching(tmp_path):
    fx = build_mico(tmp_path)
    store, _ = run(fx, tmp_path / "legacy", formula="legacy", face_matching="hungarian")
    dere = store.load_record("mico_bench_dere", "7")
    # one output face: hungarian gives it to source 0; source 1 is unmatched -> 0; W = (1 + 0 + 1)/3
    assert dere["face_similarities"][1] is None and dere["face_credits"] == [1.0, 0.0]
    assert dere["w"] == pytest.approx(2 / 3)
    assert dere["score"] == pytest.approx(2 / 3 * math.sqrt(SC_PQ))
    report = summarize(store)
    assert report["score_scale"] == "0-10" and "legacy" in report["formula"] and "f58070c" in report["formula"]


def test_unclear_visibility_answer_strict_vs_released(tmp_path):
    fx = build_mico(tmp_path)
    VISIBLE["1/1.png"] = "Hard to say."
    try:
        strict, _ = run(fx, tmp_path / "strict", parse_retries=0)
        released, _ = run(fx, tmp_path / "released", compat="released", parse_retries=0)
    finally:
        VISIBLE["1/1.png"] = "No."
    rec = strict.load_record("mico_bench_hoi", "1")
    assert rec["status"] == "judge_failure" and rec["failures"][0]["stage"] == "visibility_1" and rec["score"] is None
    rec = released.load_record("mico_bench_hoi", "1")
    assert rec["status"] == "ok" and rec["element_present"] == {"1": False} and rec["failures"][0]["scored_as"] == 0.0
    assert rec["w"] == 0.25


def test_source_without_a_face_strict_vs_released(tmp_path):
    fx = build_mico(tmp_path)
    table = embedder()
    table.table["7/1.png"] = []  # no face found in the second portrait of dere/7
    strict, _ = run(fx, tmp_path / "strict", emb=table)
    rec = strict.load_record("mico_bench_dere", "7")
    assert rec["sources_without_face"] == [1] and rec["face_credits"] == [1.0, 0.0]
    assert rec["w"] == pytest.approx(2 / 3)
    released, _ = run(fx, tmp_path / "released", emb=table, compat="released")
    rec = released.load_record("mico_bench_dere", "7")
    assert rec["face_credits"] == [0.0, 0.0] and rec["w"] == pytest.approx(1 / 3)


def test_sc_or_pq_failure_is_a_judge_failure(tmp_path):
    fx = build_mico(tmp_path)

    def bad_pq(prompt, images):
        return "It looks nice." if "Naturalness" in prompt else judge_reply(prompt, images)

    store, _ = run(fx, tmp_path / "r", judge=ScriptedJudge(bad_pq), compat="released")
    rec = store.load_record("mico_bench_hoi", "0")
    assert rec["status"] == "judge_failure" and rec["failures"][-1]["stage"] == "pq" and rec["score"] is None
    assert summarize(store)["overall"]["judge_failures"] == 3


def test_missing_inputs_and_outputs(tmp_path):
    fx = build_mico(tmp_path)
    (fx.results / fx.model / "mico_bench_hoi" / "1.png").unlink()
    (fx.bench / "mico_bench_dere" / "7" / "reference.png").unlink()
    store, judge = run(fx, tmp_path / "r")
    assert store.load_record("mico_bench_hoi", "1")["status"] == "missing_output"
    rec = store.load_record("mico_bench_dere", "7")
    assert rec["status"] == "input_error" and "reference.png" in rec["failures"][0]["error"]
    report = summarize(store)["overall"]
    assert (report["count"], report["missing_outputs"], report["input_errors"], report["expected"]) == (1, 1, 1, 3)


def test_face_sources_need_an_embedder(tmp_path):
    fx = build_mico(tmp_path)
    with pytest.raises(ValueError, match="embedder"):
        run_mico(bench_dir=fx.bench, results_dir=fx.results, model=fx.model, out_dir=tmp_path / "r",
                 judge=ScriptedJudge(judge_reply), progress=False)
    with pytest.raises(ValueError, match="formula"):
        run(fx, tmp_path / "r2", formula="product")
    with pytest.raises(ValueError, match="model"):
        run_mico(bench_dir=fx.bench, results_dir=fx.results, model="../x", out_dir=tmp_path / "r3",
                 judge=ScriptedJudge(judge_reply), embedder=embedder(), progress=False)
