"""MICo-Bench: manifests, Weighted-Ref-VIEScore arithmetic, judge prompts and the scoring runner.

The scoring functions (:func:`face_score`, :func:`case_score`, ...) need only numpy
(and scipy for Hungarian matching); the runner needs a judge and, for face sources, a
face embedder from :mod:`dar.eval.judges`.
"""

from .manifest import GROUPS, Case, load_benchmark, load_manifest
from .prompts import MicoPrompts, load_prompt_file
from .runner import COMPAT_MODES, MicoScorer, run_mico
from .scoring import (
    DEPRECATED_FORMULAS,
    FACE_BANDS,
    FORMULA_SCALE,
    FORMULA_UPSTREAM,
    FORMULAS,
    MATCHING_MODES,
    case_score,
    face_score,
    match_faces,
    perceptual_quality,
    resolve_formula,
    semantic_consistency,
    visibility_weight,
)

__all__ = [
    "COMPAT_MODES",
    "DEPRECATED_FORMULAS",
    "FACE_BANDS",
    "FORMULAS",
    "FORMULA_SCALE",
    "FORMULA_UPSTREAM",
    "GROUPS",
    "MATCHING_MODES",
    "Case",
    "MicoPrompts",
    "MicoScorer",
    "case_score",
    "face_score",
    "load_benchmark",
    "load_manifest",
    "load_prompt_file",
    "match_faces",
    "perceptual_quality",
    "resolve_formula",
    "run_mico",
    "semantic_consistency",
    "visibility_weight",
]
