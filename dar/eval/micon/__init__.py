"""MICON-Bench: checkpoint protocol, task cards, judge prompts and the scoring runner.

The scoring functions (:func:`score_checkpoints`, :func:`story_overall`) are pure and
need only the standard library; the runner needs a judge from :mod:`dar.eval.judges`.
"""

from .cases import MiconCase, StoryCandidates, load_candidates, load_cases, resolve_ref
from .prompts import MiconTemplates, build_candidate_prompt, build_judge_prompt, load_templates
from .protocol import DIMENSIONS, HARD_CAP, TASKS, TaskSpec, dimension_scores, score_checkpoints, story_overall, task_spec
from .runner import COMPAT_MODES, MiconScorer, run_micon

__all__ = [
    "COMPAT_MODES",
    "DIMENSIONS",
    "HARD_CAP",
    "TASKS",
    "MiconCase",
    "MiconScorer",
    "MiconTemplates",
    "StoryCandidates",
    "TaskSpec",
    "build_candidate_prompt",
    "build_judge_prompt",
    "dimension_scores",
    "load_candidates",
    "load_cases",
    "load_templates",
    "resolve_ref",
    "run_micon",
    "score_checkpoints",
    "story_overall",
    "task_spec",
]
