"""MICo-Bench Weighted-Ref-VIEScore: face bands, matching, W, both formulas, manifests."""

import json
import math

import numpy as np
import pytest

from dar.eval.mico import case_score, face_score, load_benchmark, load_manifest, match_faces, visibility_weight
from dar.eval.mico.scoring import perceptual_quality, semantic_consistency


@pytest.mark.parametrize(
    "similarity, credit",
    [(1.0, 1.0), (0.45, 1.0), (0.4499, 0.7), (0.30, 0.7), (0.2999, 0.5), (0.15, 0.5), (0.1499, 0.2),
     (0.05, 0.2), (0.0499, 0.0), (0.0, 0.0), (-0.7, 0.0), (np.float32(0.5), 1.0), (1.0000001, 1.0)],
)
def test_face_score_bands(similarity, credit):
    assert face_score(similarity) == credit


def test_face_score_rejects_bad_input():
    with pytest.raises(ValueError, match="similarity"):
        face_score(float("nan"))
    with pytest.raises(ValueError, match="similarity"):
        face_score(1.5)
    with pytest.raises(TypeError, match="similarity"):
        face_score("0.5")


def test_case_score_worked_example():
    # The MICo-Bench README example: W=0.75, PF=9, SR=6, naturalness=8, artifacts=7.
    # SC = sqrt(54) = 7.3485, PQ = sqrt(56) = 7.4833, SC x PQ = sqrt(3024) = 54.9909.
    assert semantic_consistency(9, 6) == pytest.approx(7.348469, abs=1e-6)
    assert perceptual_quality(8, 7) == pytest.approx(7.483315, abs=1e-6)
    assert case_score(0.75, 9, 6, 8, 7, formula="paper") == pytest.approx(41.243, abs=1e-3)
    # legacy: 0.75 x 3024 ** 0.25 = 0.75 x 7.41558 = 5.5617 (upstream's README showed 5.56 before f58070c)
    assert case_score(0.75, 9, 6, 8, 7, formula="legacy") == pytest.approx(5.56168, abs=1e-5)
    assert case_score(1.0, 10, 10, 10, 10) == 100.0
    assert case_score(1.0, 10, 10, 10, 10, formula="legacy") == 10.0
    assert case_score(0.0, 10, 10, 10, 10) == 0.0
    assert case_score(1.0, 0, 10, 10, 10) == 0.0


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(formula="geometric"), ValueError, "formula"),
        (dict(w=1.5), ValueError, "w must"),
        (dict(w=float("nan")), ValueError, "w must"),
        (dict(pf=10.5), ValueError, "pf"),
        (dict(artifacts=-1), ValueError, "artifacts"),
        (dict(sr=None), TypeError, "sr"),
    ],
)
def test_case_score_validation(kwargs, exc, name):
    args = dict(w=0.5, pf=5, sr=5, naturalness=5, artifacts=5)
    args.update(kwargs)
    with pytest.raises(exc, match=name):
        case_score(**args)


def test_matching_best_vs_hungarian():
    sims = np.array([[0.9, 0.5], [0.8, 0.1]])
    # best: both sources may take output face 0
    assert match_faces(sims, "best") == [0.9, 0.8]
    # hungarian: one face each; 0.5 + 0.8 = 1.3 beats 0.9 + 0.1 = 1.0
    assert match_faces(sims, "hungarian") == [0.5, 0.8]
    # more sources than output faces: the unassigned source gets None
    assert match_faces(np.array([[0.9], [0.8]]), "hungarian") == [0.9, None]
    assert match_faces(np.array([[0.9], [0.8]]), "best") == [0.9, 0.8]
    assert match_faces(np.zeros((2, 0)), "best") == [None, None]
    with pytest.raises(ValueError, match="matching"):
        match_faces(sims, "greedy")
    with pytest.raises(ValueError, match="2-D"):
        match_faces(np.zeros(3), "best")


def test_visibility_weight():
    # README example: 1 face preserved + 2 of 3 objects found -> 3/4
    assert visibility_weight([1.0], [True, True, False]) == 0.75
    assert visibility_weight([0.7, 0.2], []) == pytest.approx(0.45)
    assert visibility_weight([], [False]) == 0.0
    with pytest.raises(ValueError, match="at least one source"):
        visibility_weight([], [])
    with pytest.raises(ValueError, match="face_credits"):
        visibility_weight([1.2], [])
    with pytest.raises(TypeError, match="element_present"):
        visibility_weight([], [1])


def _write(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    return path


def test_load_manifest_released_formats(tmp_path):
    hoi = _write(tmp_path / "mico_bench_hoi.jsonl", [
        {"idx": 0, "input": ["mico_bench_hoi/0/0.jpg", "mico_bench_hoi/0/1.png"], "reference": "mico_bench_hoi/0/reference.jpg",
         "Task": "HOI", "editing_type": "1 Human + 1 Object", "prompt": "A gentleman sits.", "human_indices": [0]},
    ])
    dere = _write(tmp_path / "mico_bench_dere.jsonl", [
        {"ed_idx": 12, "input": ["a.png", "b.png", "c.png"], "reference": "r.png", "Task": "De&Re", "editing_type": "x",
         "prompt": "old", "refined_prompt": "Refined text.", "human_indices": [2, 0]},
        {"ed_idx": "13", "input": ["a.png"], "reference": "r.png", "prompt": "only prompt"},
    ])
    (case,) = load_manifest(hoi)
    assert (case.case_id, case.inputs, case.reference, case.prompt, case.human_indices, case.task, case.editing_type) == (
        "0", ("mico_bench_hoi/0/0.jpg", "mico_bench_hoi/0/1.png"), "mico_bench_hoi/0/reference.jpg", "A gentleman sits.", (0,),
        "HOI", "1 Human + 1 Object")
    assert case.group == "mico_bench_hoi"
    first, second = load_manifest(dere)
    assert first.case_id == "12" and first.prompt == "Refined text." and first.original_prompt == "old"
    assert first.human_indices == (0, 2)
    assert second.case_id == "13" and second.prompt == "only prompt" and second.human_indices == ()
    both = load_benchmark(tmp_path)
    assert [c.group for c in both] == ["mico_bench_hoi", "mico_bench_dere", "mico_bench_dere"]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"input": ["a.png"], "reference": "r.png", "prompt": "p"}, "neither 'idx' nor 'ed_idx'"),
        ({"idx": 1, "input": [], "reference": "r.png", "prompt": "p"}, "'input'"),
        ({"idx": 1, "input": ["a.png"], "prompt": "p"}, "'reference'"),
        ({"idx": 1, "input": ["a.png"], "reference": "r.png"}, "no 'prompt'"),
        ({"idx": 1, "input": ["a.png"], "reference": "r.png", "prompt": "p", "human_indices": [1]}, "out of range"),
        ({"idx": 1, "ed_idx": 2, "input": ["a.png"], "reference": "r.png", "prompt": "p"}, "differ"),
        ({"idx": True, "input": ["a.png"], "reference": "r.png", "prompt": "p"}, "case id"),
    ],
)
def test_load_manifest_rejects_bad_records(tmp_path, record, message):
    path = _write(tmp_path / "g.jsonl", [record])
    with pytest.raises(ValueError, match=message):
        load_manifest(path)


def test_load_manifest_reports_line_of_bad_json_and_duplicates(tmp_path):
    path = tmp_path / "g.jsonl"
    good = json.dumps({"idx": 1, "input": ["a.png"], "reference": "r.png", "prompt": "p"})
    path.write_text(good + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match="g.jsonl:2"):
        load_manifest(path)
    path.write_text(good + "\n" + good + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="duplicate case id '1'"):
        load_manifest(path)
    with pytest.raises(ValueError, match="path"):
        load_manifest(tmp_path / "g.json")


def test_formulas_order_the_same_cases_the_same_way():
    # Both formulas are increasing in every sub-score, so they rank cases identically.
    rng = np.random.default_rng(0)
    rows = rng.uniform(0, 10, size=(50, 4))
    weights = rng.uniform(0, 1, size=50)
    paper = [case_score(w, *r, formula="paper") for w, r in zip(weights, rows)]
    legacy = [case_score(w, *r, formula="legacy") for w, r in zip(weights, rows)]
    for p, r, w in zip(paper, legacy, weights):
        # legacy = W x sqrt(SC x PQ) and paper = W x SC x PQ, so legacy^2 = W x paper
        assert r * r == pytest.approx(w * p)
    assert all(math.isfinite(p) for p in paper)
