"""MICo-Bench formulas against upstream (issue 15, item 17).

Upstream (github.com/A113N-W3I/MICo-150K, MICo-Bench/eval_score.py) computed
W x sqrt(SC x PQ) on 0-10 when first released (1e0ab5d); commit f58070c (2026-04-17)
removed the extra square root: W x SC x PQ on 0-100, the leaderboard's formula. Commit
7529a82 (2026-04-19) made a face source's credit graded by ArcFace similarity.
"""

import json
import warnings

import pytest
from tests.eval.eval_fakes import ScriptedJudge, build_mico

from dar.eval.mico import FORMULA_SCALE, FORMULAS, case_score, face_score, run_mico, scoring, visibility_weight
from dar.eval.report import summarize
from dar.eval.runs import RunStore

# Upstream README's per-case example: W=0.75, PF=9, SR=6, naturalness=8, artifacts=7.
EXAMPLE = dict(w=0.75, pf=9, sr=6, naturalness=8, artifacts=7)


@pytest.fixture
def fresh_warning_state(monkeypatch):
    monkeypatch.setattr(scoring, "_warned_aliases", set())


def test_current_upstream_formula_is_the_default_and_legacy_keeps_the_square_root():
    assert FORMULAS == ("paper", "legacy") and FORMULA_SCALE == {"paper": "0-100", "legacy": "0-10"}
    # upstream README after f58070c: "final": 41.23; before it: 5.56
    assert case_score(**EXAMPLE) == pytest.approx(41.2432, abs=1e-4)
    assert case_score(**EXAMPLE, formula="paper") == case_score(**EXAMPLE)
    assert case_score(**EXAMPLE, formula="legacy") == pytest.approx(5.5617, abs=1e-4)


def test_released_is_a_deprecated_alias_of_legacy_that_warns_once(fresh_warning_state):
    with pytest.warns(FutureWarning, match="'released' is deprecated.*'legacy'"):
        first = case_score(**EXAMPLE, formula="released")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = case_score(**EXAMPLE, formula="released")
    assert first == second == case_score(**EXAMPLE, formula="legacy")
    with pytest.raises(ValueError, match="formula must be one of.*legacy"):
        case_score(**EXAMPLE, formula="sqrt")


def test_face_weight_follows_the_graded_upstream_rule():
    # upstream's bands: [0.45, 1] -> 1.0, [0.30, 0.45) -> 0.7, [0.15, 0.30) -> 0.5, [0.05, 0.15) -> 0.2, else 0
    assert [face_score(s) for s in (0.45, 0.3, 0.15, 0.05, 0.0499)] == [1.0, 0.7, 0.5, 0.2, 0.0]
    # upstream's worked example: 1 face at similarity 0.35, 3 elements found, 1 not: W = 3.7 / 5
    assert visibility_weight([face_score(0.35)], [True, True, True, False]) == pytest.approx(0.74)


def judge_reply(prompt, images):
    if "Answer with exactly one word" in prompt:
        return "yes"
    return "[9, 6]" if "Prompt following" in prompt else "[8, 7]"


def test_a_run_records_the_current_name_and_old_released_runs_resume_as_legacy(tmp_path, fresh_warning_state):
    groups = {"mico_bench_object_centric": [
        {"idx": i, "input": [f"mico_bench_object_centric/{i}/0.png"], "reference": f"mico_bench_object_centric/{i}/reference.png",
         "prompt": "An object.", "human_indices": []} for i in range(2)]}
    fx = build_mico(tmp_path, groups=groups)
    out = tmp_path / "run"
    kwargs = dict(bench_dir=fx.bench, results_dir=fx.results, model=fx.model, out_dir=out, progress=False)
    with pytest.warns(FutureWarning, match="released"):
        run_mico(judge=ScriptedJudge(judge_reply), formula="released", groups=["mico_bench_object_centric"], **kwargs)
    store = RunStore.load(out)
    assert store.identity["formula"] == "legacy" and store.meta["details"]["score_scale"] == "0-10"
    assert store.load_record("mico_bench_object_centric", "0")["score"] == pytest.approx(1.0 * 54.9909 ** 0.5, abs=1e-4)

    # a run directory written before the rename says "released": it resumes, reports and compares as legacy
    meta = json.loads((out / "run.json").read_text())
    meta["identity"]["formula"] = "released"
    (out / "run.json").write_text(json.dumps(meta))
    (out / "cases" / "mico_bench_object_centric" / "1.json").unlink()
    judge = ScriptedJudge(judge_reply)
    run_mico(judge=judge, formula="legacy", **kwargs)
    assert len(judge.calls) == 3  # only the removed case was scored again
    report = summarize(out)
    assert report["score_scale"] == "0-10" and report["formula"].startswith("W x sqrt(SC x PQ) (legacy")
    assert report["overall"]["count"] == 2
