"""The MICON-Bench scoring protocol: dimensions, per-task checkpoints, hard caps, formulas.

These tables are the facts of the released protocol (task -> checkpoints per dimension,
hard checkpoints -> the dimension they cap, cap 0.4, story_infer 40/60 hybrid).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

DIMENSIONS: Mapping[str, str] = MappingProxyType(
    {
        "A": "Instruction Following",
        "B": "Identity/Fidelity",
        "C": "Structure/Geometry",
        "D": "Cross-Ref Consistency",
        "E": "Causality/Temporal",
        "F": "Text Grounding",
        "G": "Overall Usability",
    }
)

HARD_CAP = 0.4
STORY_TASK = "story_infer"
STORY_DIMENSION_WEIGHT = 40.0
STORY_CANDIDATE_WEIGHT = 60.0


@dataclass(frozen=True)
class TaskSpec:
    name: str
    counts: Mapping[str, int]  # dimension -> number of checkpoints
    hard: Mapping[str, str]  # hard checkpoint id -> dimension it caps

    @property
    def dimensions(self) -> tuple[str, ...]:
        return tuple(self.counts)

    def checkpoints(self, dimension: str) -> tuple[str, ...]:
        return tuple(f"{dimension}_check_{i}" for i in range(1, self.counts[dimension] + 1))

    @property
    def all_checkpoints(self) -> tuple[str, ...]:
        return tuple(cp for dim in self.counts for cp in self.checkpoints(dim))


def _spec(name: str, counts: dict[str, int], hard: dict[str, str]) -> TaskSpec:
    return TaskSpec(name, MappingProxyType(counts), MappingProxyType(hard))


TASKS: Mapping[str, TaskSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            _spec("object_composition", {"A": 3, "B": 3, "C": 3, "D": 4, "G": 2}, {"A_check_1": "A", "B_check_1": "B"}),
            _spec(
                "spatial_geometric_constraints",
                {"A": 3, "B": 3, "C": 4, "D": 3, "G": 3},
                {"A_check_1": "A", "C_check_1": "C"},
            ),
            _spec(
                "attribute_style_decoupling",
                {"A": 3, "B": 3, "C": 3, "D": 3, "G": 3},
                {"A_check_1": "A", "B_check_1": "B", "C_check_1": "C", "D_check_1": "D"},
            ),
            _spec(
                "local_element_transfer",
                {"A": 3, "B": 3, "C": 3, "D": 3, "G": 3},
                {"A_check_1": "A", "B_check_2": "B", "C_check_1": "C"},
            ),
            _spec(
                "foreground_background_composition",
                {"A": 3, "B": 3, "C": 3, "D": 3, "G": 3},
                {"B_check_1": "B", "D_check_1": "D"},
            ),
            _spec(
                STORY_TASK,
                {"A": 3, "B": 3, "C": 3, "D": 3, "E": 3, "G": 3},
                {"A_check_1": "A", "B_check_1": "B", "E_check_1": "E"},
            ),
        )
    }
)


def task_spec(task: str) -> TaskSpec:
    if not isinstance(task, str):
        raise TypeError(f"task must be a str, got {type(task).__name__}")
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"task: unknown MICON-Bench task {task!r}; expected one of {sorted(TASKS)}") from None


def _verdict(checkpoint: str, value: object) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and value in (0, 1):
        return int(value)
    raise ValueError(f"checkpoints[{checkpoint!r}] must be 0 or 1, got {value!r}")


def dimension_scores(task: str, checkpoints: Mapping[str, int]) -> dict[str, float]:
    """Per-dimension pass rates in [0, 1], capped at 0.4 where a hard checkpoint failed.

    A checkpoint absent from ``checkpoints`` counts as failed (as in the released
    aggregation). Checkpoint ids the task does not define raise ``ValueError``: they
    mean the verdicts belong to another task.
    """
    spec = task_spec(task)
    if not isinstance(checkpoints, Mapping):
        raise TypeError(f"checkpoints must be a mapping of checkpoint id to 0/1, got {type(checkpoints).__name__}")
    known = set(spec.all_checkpoints)
    unknown = sorted(set(checkpoints) - known)
    if unknown:
        raise ValueError(f"checkpoints: {unknown} are not checkpoints of task {task!r}")
    verdicts = {cp: _verdict(cp, checkpoints[cp]) for cp in checkpoints}
    capped = {dim for cp, dim in spec.hard.items() if verdicts.get(cp, 0) == 0}
    scores: dict[str, float] = {}
    for dim in spec.dimensions:
        ids = spec.checkpoints(dim)
        rate = sum(verdicts.get(cp, 0) for cp in ids) / len(ids)
        scores[dim] = min(rate, HARD_CAP) if dim in capped else rate
    return scores


def score_checkpoints(task: str, checkpoints: Mapping[str, int]) -> tuple[dict[str, float], float]:
    """Dimension scores and the case overall (0-100, 2 decimals) for one MICON-Bench case.

    ``overall`` is the mean of the task's dimension scores x 100. For ``story_infer``
    this is the plain (checkpoint-only) overall; combine it with the candidate-answer
    score through :func:`story_overall`.
    """
    scores = dimension_scores(task, checkpoints)
    overall = round(sum(scores.values()) / len(scores) * 100.0, 2)
    return scores, overall


def story_overall(mean_dimension_score: float, candidate_score: float) -> float:
    """story_infer overall: 40 x mean dimension score (0-1) + 60 x candidate score (0-10) / 10."""
    mean = _number_in(mean_dimension_score, "mean_dimension_score", 0.0, 1.0)
    candidate = _number_in(candidate_score, "candidate_score", 0.0, 10.0)
    return round(STORY_DIMENSION_WEIGHT * mean + STORY_CANDIDATE_WEIGHT * candidate / 10.0, 2)


def _number_in(value: object, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{name} must be within [{low:g}, {high:g}], got {value!r}")
    return float(value)
