"""Paired A/B comparison: pairing, bootstrap CI, win/tie/loss, guards against unpairable runs."""

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from dar.eval.compare import compare, paired_stats, to_markdown, write_comparison
from dar.eval.runs import RunStore

IDENTITY = {"benchmark": "mico", "model": "m", "judge_model": "j", "formula": "paper", "compat": "strict", "face_matching": "best", "prompts": "default"}


def make_run(path, scores, identity=None, extra_status=()):
    """scores: {task: {case_id: score}}; extra_status: [(task, case_id, status)]."""
    expected = {t: list(cases) for t, cases in scores.items()}
    with RunStore.open(path, identity or IDENTITY, {}, expected) as store:
        for task, cases in scores.items():
            for case_id, score in cases.items():
                store.write_record({"task": task, "case_id": case_id, "status": "ok", "score": score})
        for task, case_id, status in extra_status:
            store.write_record({"task": task, "case_id": case_id, "status": status, "score": None})
    return path


def test_clear_improvement_tie_and_mixed_tasks(tmp_path):
    rng = np.random.default_rng(1)
    base_hoi = {str(i): float(v) for i, v in enumerate(rng.uniform(20, 60, 30))}
    mixed = {str(i): float(v) for i, v in enumerate(rng.uniform(20, 60, 30))}
    a = make_run(tmp_path / "a", {"mico_bench_hoi": base_hoi, "mico_bench_dere": mixed, "mico_bench_object_centric": {"1": 5.0, "2": 6.0}},
                 extra_status=[("mico_bench_hoi", "99", "judge_failure")])
    noise = rng.normal(0, 5, 30)
    b = make_run(tmp_path / "b", {
        "mico_bench_hoi": {k: v + 5.0 for k, v in base_hoi.items()},  # every case +5
        "mico_bench_dere": {k: v + float(n) for (k, v), n in zip(mixed.items(), noise)},  # noise around 0
        "mico_bench_object_centric": {"1": 5.0, "2": 6.0, "3": 9.0},  # identical, plus an unpaired case
    })
    result = compare(a, b, label_a="DAR off", label_b="DAR on", n_resamples=2000)
    hoi = result.tasks["mico_bench_hoi"]
    assert (hoi.n_pairs, hoi.wins, hoi.ties, hoi.losses, hoi.only_a) == (30, 30, 0, 0, 0)
    assert hoi.mean_diff == pytest.approx(5.0) and hoi.ci_low == pytest.approx(5.0) and hoi.ci_high == pytest.approx(5.0)
    assert hoi.verdict == "B better"
    dere = result.tasks["mico_bench_dere"]
    assert dere.mean_diff == pytest.approx(float(noise.mean()))
    assert dere.ci_low < dere.mean_diff < dere.ci_high
    assert dere.ci_low < 0 < dere.ci_high and dere.verdict == "no clear difference"
    assert dere.wins + dere.ties + dere.losses == 30 and dere.wins == int((noise > 0).sum())
    obj = result.tasks["mico_bench_object_centric"]
    assert (obj.n_pairs, obj.ties, obj.only_b, obj.mean_diff) == (2, 2, 1, 0.0)
    overall = result.overall
    assert overall.n_pairs == 62 and overall.mean_diff == pytest.approx((150 + noise.sum()) / 62)
    assert list(result.tasks) == ["mico_bench_object_centric", "mico_bench_hoi", "mico_bench_dere"]  # benchmark order

    md = to_markdown(result)
    assert "DAR on better" in md and "| mico_bench_hoi | 30 |" in md
    paths = write_comparison(result, tmp_path / "cmp")
    data = json.loads(paths["json"].read_text())
    assert data["tasks"]["mico_bench_hoi"]["verdict"] == "B better" and data["overall"]["n_pairs"] == 62
    with Image.open(paths["png"]) as img:
        assert img.format == "PNG"


def test_ci_matches_a_direct_percentile_bootstrap():
    rng = np.random.default_rng(3)
    a = {i: float(v) for i, v in enumerate(rng.uniform(0, 100, 40))}
    b = {i: a[i] + float(d) for i, d in enumerate(rng.normal(2.0, 6.0, 40))}
    stats = paired_stats(a, b, n_resamples=4000, seed=7)
    diffs = np.array([b[i] - a[i] for i in range(40)])
    # an independent, hand-written percentile bootstrap agrees to within resampling noise
    draws = np.random.default_rng(11).integers(0, 40, size=(20000, 40))
    means = diffs[draws].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    assert stats.ci_low == pytest.approx(lo, abs=0.25) and stats.ci_high == pytest.approx(hi, abs=0.25)


def test_tie_tolerance_and_small_samples():
    stats = paired_stats({1: 10.0, 2: 10.0}, {1: 10.004, 2: 9.0}, tie_tolerance=0.01)
    assert (stats.wins, stats.ties, stats.losses) == (0, 1, 1)
    one = paired_stats({1: 1.0}, {1: 2.0})
    assert one.n_pairs == 1 and one.ci_low is None and one.verdict == "too few pairs"
    none = paired_stats({1: 1.0}, {2: 2.0})
    assert none.n_pairs == 0 and none.mean_diff is None and (none.only_a, none.only_b) == (1, 1)


def test_unpairable_runs_are_refused(tmp_path):
    a = make_run(tmp_path / "a", {"g": {"1": 1.0, "2": 2.0}})
    b = make_run(tmp_path / "b", {"g": {"1": 1.0, "2": 2.0}}, identity=dict(IDENTITY, formula="legacy"))
    with pytest.raises(ValueError, match="formula"):
        compare(a, b)
    c = make_run(tmp_path / "c", {"g": {"1": 1.0, "2": 2.0}}, identity=dict(IDENTITY, judge_model="other"))
    with pytest.warns(UserWarning, match="different judges"):
        compare(a, c)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compare(a, make_run(tmp_path / "d", {"g": {"1": 1.0, "2": 2.0}}, identity=dict(IDENTITY, model="other")))
    with pytest.raises(ValueError, match="confidence"):
        compare(a, a, confidence=95)
    with pytest.raises(FileNotFoundError, match="run_dir"):
        compare(a, tmp_path / "nothing")
