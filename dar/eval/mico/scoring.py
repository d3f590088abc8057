"""MICo-Bench Weighted-Ref-VIEScore arithmetic.

Per case: W (visibility of the sources in the output, 0-1), SC = sqrt(PF x SR) and
PQ = sqrt(naturalness x artifacts) (each 0-10), combined by one of two formulas:

- ``paper``:    W x SC x PQ          (0-100; the definition in the MICo-150K paper)
- ``released``: W x sqrt(SC x PQ)    (0-10; what the released eval_score.py computes)
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np

FORMULAS = ("paper", "released")
FORMULA_SCALE = {"paper": "0-100", "released": "0-10"}
MATCHING_MODES = ("best", "hungarian")

# (lower bound of the similarity band, visibility credit), highest band first.
FACE_BANDS = ((0.45, 1.0), (0.30, 0.7), (0.15, 0.5), (0.05, 0.2))
_SIMILARITY_SLACK = 1e-6  # float rounding of normalised dot products


def _real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


def face_score(similarity: float) -> float:
    """Visibility credit of one face source from its ArcFace cosine similarity.

    [0.45, 1] -> 1.0, [0.30, 0.45) -> 0.7, [0.15, 0.30) -> 0.5, [0.05, 0.15) -> 0.2, below -> 0.
    """
    sim = _real(similarity, "similarity")
    if not -1.0 - _SIMILARITY_SLACK <= sim <= 1.0 + _SIMILARITY_SLACK:
        raise ValueError(f"similarity must be a cosine similarity in [-1, 1], got {similarity!r}")
    for lower, credit in FACE_BANDS:
        if sim >= lower:
            return credit
    return 0.0


def match_faces(similarities: np.ndarray, matching: str = "best") -> list[float | None]:
    """For each source face (row), the similarity of the output face (column) it is matched to.

    ``best``: every source takes its most similar output face (several sources may share
    one face; the released behaviour). ``hungarian``: one-to-one assignment maximising the
    total similarity (``scipy.optimize.linear_sum_assignment``); sources left without a
    face get ``None``. With no output faces every source gets ``None``.
    """
    if matching not in MATCHING_MODES:
        raise ValueError(f"matching must be one of {MATCHING_MODES}, got {matching!r}")
    sims = np.asarray(similarities, dtype=np.float64)
    if sims.ndim != 2:
        raise ValueError(f"similarities must be a 2-D (sources x output faces) array, got shape {sims.shape}")
    n_sources, n_faces = sims.shape
    if n_faces == 0:
        return [None] * n_sources
    if matching == "best":
        return [float(v) for v in sims.max(axis=1)]
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(sims, maximize=True)
    matched: list[float | None] = [None] * n_sources
    for r, c in zip(rows, cols):
        matched[int(r)] = float(sims[r, c])
    return matched


def visibility_weight(face_credits: Sequence[float], element_present: Sequence[bool]) -> float:
    """W: mean visibility credit over all sources (faces' band credits and 0/1 for the rest)."""
    credits = [_real(c, "face_credits") for c in face_credits]
    if any(not 0.0 <= c <= 1.0 for c in credits):
        raise ValueError(f"face_credits must lie in [0, 1], got {credits}")
    flags = []
    for flag in element_present:
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"element_present must hold booleans, got {type(flag).__name__}")
        flags.append(1.0 if flag else 0.0)
    n = len(credits) + len(flags)
    if n == 0:
        raise ValueError("a case needs at least one source: face_credits and element_present are both empty")
    return (sum(credits) + sum(flags)) / n


def semantic_consistency(pf: float, sr: float) -> float:
    """SC = sqrt(prompt following x subject resemblance), both 0-10."""
    return math.sqrt(_sub_score(pf, "pf") * _sub_score(sr, "sr"))


def perceptual_quality(naturalness: float, artifacts: float) -> float:
    """PQ = sqrt(naturalness x artifacts), both 0-10."""
    return math.sqrt(_sub_score(naturalness, "naturalness") * _sub_score(artifacts, "artifacts"))


def _sub_score(value: object, name: str) -> float:
    number = _real(value, name)
    if not 0.0 <= number <= 10.0:
        raise ValueError(f"{name} must be within [0, 10], got {value!r}")
    return number


def case_score(w: float, pf: float, sr: float, naturalness: float, artifacts: float, formula: str = "paper") -> float:
    """Weighted-Ref-VIEScore of one case.

    ``formula="paper"``: W x SC x PQ on 0-100; ``formula="released"``: W x sqrt(SC x PQ) on 0-10.
    """
    if formula not in FORMULAS:
        raise ValueError(f"formula must be one of {FORMULAS}, got {formula!r}")
    weight = _real(w, "w")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"w must be within [0, 1], got {w!r}")
    sc = semantic_consistency(pf, sr)
    pq = perceptual_quality(naturalness, artifacts)
    if formula == "paper":
        return weight * sc * pq
    return weight * math.sqrt(sc * pq)
