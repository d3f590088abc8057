"""MICON-Bench scoring: worked examples for every task's caps, the story hybrid, validation."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dar.eval.micon import TASKS, score_checkpoints, story_overall
from dar.eval.micon.protocol import dimension_scores


def all_pass(task, **overrides):
    verdicts = {cp: 1 for cp in TASKS[task].all_checkpoints}
    verdicts.update(overrides)
    return verdicts


def test_task_tables_match_the_released_protocol():
    expected = {
        "object_composition": ({"A": 3, "B": 3, "C": 3, "D": 4, "G": 2}, {"A_check_1": "A", "B_check_1": "B"}),
        "spatial_geometric_constraints": ({"A": 3, "B": 3, "C": 4, "D": 3, "G": 3}, {"A_check_1": "A", "C_check_1": "C"}),
        "attribute_style_decoupling": (
            {"A": 3, "B": 3, "C": 3, "D": 3, "G": 3},
            {"A_check_1": "A", "B_check_1": "B", "C_check_1": "C", "D_check_1": "D"},
        ),
        "local_element_transfer": ({"A": 3, "B": 3, "C": 3, "D": 3, "G": 3}, {"A_check_1": "A", "B_check_2": "B", "C_check_1": "C"}),
        "foreground_background_composition": ({"A": 3, "B": 3, "C": 3, "D": 3, "G": 3}, {"B_check_1": "B", "D_check_1": "D"}),
        "story_infer": ({"A": 3, "B": 3, "C": 3, "D": 3, "E": 3, "G": 3}, {"A_check_1": "A", "B_check_1": "B", "E_check_1": "E"}),
    }
    assert {name: (dict(s.counts), dict(s.hard)) for name, s in TASKS.items()} == expected


@pytest.mark.parametrize("task", sorted(TASKS))
def test_all_pass_scores_100(task):
    dims, overall = score_checkpoints(task, all_pass(task))
    assert overall == 100.0
    assert set(dims.values()) == {1.0}


# Worked examples, computed by hand: failing a hard checkpoint caps its dimension at 0.4
# even though the other checkpoints of that dimension pass (2/3 or 3/4 > 0.4).
WORKED = [
    # object_composition: A=min(2/3,.4)=.4, B=.4, C=D=G=1 -> 3.8/5 -> 76
    ("object_composition", ["A_check_1", "B_check_1"], {"A": 0.4, "B": 0.4, "C": 1.0, "D": 1.0, "G": 1.0}, 76.0),
    # spatial: C has 4 checks, 3/4 pass but capped -> .4
    ("spatial_geometric_constraints", ["A_check_1", "C_check_1"], {"A": 0.4, "B": 1.0, "C": 0.4, "D": 1.0, "G": 1.0}, 76.0),
    # attribute_style: four hard checkpoints -> 4 x .4 + 1 = 2.6/5 -> 52
    (
        "attribute_style_decoupling",
        ["A_check_1", "B_check_1", "C_check_1", "D_check_1"],
        {"A": 0.4, "B": 0.4, "C": 0.4, "D": 0.4, "G": 1.0},
        52.0,
    ),
    # local_element_transfer: the B hard checkpoint is B_check_2 -> 3 x .4 + 2 = 3.2/5 -> 64
    ("local_element_transfer", ["A_check_1", "B_check_2", "C_check_1"], {"A": 0.4, "B": 0.4, "C": 0.4, "D": 1.0, "G": 1.0}, 64.0),
    # ... and B_check_1 is NOT hard there: B = 2/3, uncapped -> (4 + 2/3)/5 = 93.33
    ("local_element_transfer", ["B_check_1"], {"A": 1.0, "B": 2 / 3, "C": 1.0, "D": 1.0, "G": 1.0}, 93.33),
    # foreground_background: hard are B_check_1 and D_check_1
    ("foreground_background_composition", ["B_check_1", "D_check_1"], {"A": 1.0, "B": 0.4, "C": 1.0, "D": 0.4, "G": 1.0}, 76.0),
    # ... and A_check_1 is not hard there
    ("foreground_background_composition", ["A_check_1"], {"A": 2 / 3, "B": 1.0, "C": 1.0, "D": 1.0, "G": 1.0}, 93.33),
    # story_infer: hard A1, B1, E1 -> 3 x .4 + 3 = 4.2/6 = .7 -> 70
    ("story_infer", ["A_check_1", "B_check_1", "E_check_1"], {"A": 0.4, "B": 0.4, "C": 1.0, "D": 1.0, "E": 0.4, "G": 1.0}, 70.0),
    # a pass rate already below the cap is not raised to it: A = 1/3
    ("object_composition", ["A_check_1", "A_check_2"], {"A": 1 / 3, "B": 1.0, "C": 1.0, "D": 1.0, "G": 1.0}, 86.67),
]


@pytest.mark.parametrize("task, failed, dims, overall", WORKED)
def test_worked_examples(task, failed, dims, overall):
    got_dims, got_overall = score_checkpoints(task, all_pass(task, **{cp: 0 for cp in failed}))
    assert got_dims == pytest.approx(dims)
    assert got_overall == overall


def test_missing_checkpoints_count_as_failures_and_missing_hard_caps():
    verdicts = all_pass("object_composition")
    del verdicts["A_check_1"]  # the hard one: missing == failed == capped
    dims, overall = score_checkpoints("object_composition", verdicts)
    assert dims["A"] == 0.4
    assert overall == 88.0
    dims, overall = score_checkpoints("object_composition", {})
    assert overall == 0.0 and set(dims.values()) == {0.0}


def test_overall_is_rounded_to_two_decimals():
    _, overall = score_checkpoints("object_composition", all_pass("object_composition", B_check_2=0))
    assert overall == 93.33  # (4 + 2/3) / 5 * 100 = 93.333...


def test_accepts_bools_and_numpy_ints():
    import numpy as np

    verdicts = {cp: np.int64(1) for cp in TASKS["story_infer"].all_checkpoints}
    verdicts["A_check_1"] = False
    dims, _ = score_checkpoints("story_infer", verdicts)
    assert dims["A"] == 0.4


def test_story_without_candidate_returns_plain_overall_and_hybrid_formula():
    dims, plain = score_checkpoints("story_infer", all_pass("story_infer", A_check_1=0, B_check_1=0, E_check_1=0))
    assert plain == 70.0
    mean = sum(dims.values()) / len(dims)
    assert story_overall(mean, 8.0) == 76.0  # 40 x .7 + 60 x .8
    assert story_overall(1.0, 10.0) == 100.0
    assert story_overall(0.0, 0.0) == 0.0
    assert story_overall(0.5, 5) == 50.0
    assert story_overall(1 / 3, 7.0) == 55.33  # 13.333 + 42 = 55.333


@pytest.mark.parametrize(
    "args, exc, name",
    [
        ((1.2, 5.0), ValueError, "mean_dimension_score"),
        ((0.5, 11.0), ValueError, "candidate_score"),
        ((0.5, float("nan")), ValueError, "candidate_score"),
        ((True, 5.0), TypeError, "mean_dimension_score"),
        ((0.5, "7"), TypeError, "candidate_score"),
    ],
)
def test_story_overall_rejects_bad_input(args, exc, name):
    with pytest.raises(exc, match=name):
        story_overall(*args)


def test_score_checkpoints_rejects_bad_input():
    with pytest.raises(ValueError, match="task"):
        score_checkpoints("no_such_task", {})
    with pytest.raises(TypeError, match="checkpoints"):
        score_checkpoints("object_composition", [("A_check_1", 1)])
    with pytest.raises(ValueError, match="A_check_1"):
        score_checkpoints("object_composition", {"A_check_1": 2})
    with pytest.raises(ValueError, match="E_check_1"):
        score_checkpoints("object_composition", {"E_check_1": 1})  # object_composition has no E


@st.composite
def task_and_verdicts(draw):
    task = draw(st.sampled_from(sorted(TASKS)))
    ids = TASKS[task].all_checkpoints
    # Some checkpoints are left out: a missing checkpoint must behave as a failed one.
    verdicts = {cp: draw(st.integers(0, 1)) for cp in ids if draw(st.booleans())}
    return task, verdicts


@given(task_and_verdicts(), st.data())
def test_properties_range_caps_and_monotonicity(tv, data):
    task, verdicts = tv
    spec = TASKS[task]
    dims, overall = score_checkpoints(task, verdicts)
    assert 0.0 <= overall <= 100.0
    assert all(0.0 <= v <= 1.0 for v in dims.values())
    for cp, dim in spec.hard.items():
        if verdicts.get(cp, 0) == 0:
            assert dims[dim] <= 0.4
    # Turning one failed checkpoint into a pass never lowers any dimension or the overall.
    failed = [cp for cp in spec.all_checkpoints if verdicts.get(cp, 0) == 0]
    if failed:
        flip = data.draw(st.sampled_from(failed))
        better = dict(verdicts, **{flip: 1})
        dims2 = dimension_scores(task, better)
        assert all(dims2[d] >= dims[d] - 1e-12 for d in dims)
        assert score_checkpoints(task, better)[1] >= overall
