"""MICo-Bench Weighted-Ref-VIEScore arithmetic.

Per case: W (visibility of the sources in the output, 0-1), SC = sqrt(PF x SR) and
PQ = sqrt(naturalness x artifacts) (each 0-10), combined by one of two formulas:

- ``paper``:  W x SC x PQ          (0-100; the MICo-150K paper's definition, and what
  upstream ``MICo-Bench/eval_score.py`` computes since commit f58070c of 2026-04-17,
  the formula of the leaderboard)
- ``legacy``: W x sqrt(SC x PQ)    (0-10; upstream ``eval_score.py`` as first released,
  commit 1e0ab5d, until f58070c removed the extra square root)

``released`` is a deprecated name of ``legacy`` (it was "released" until upstream changed).

A face source's credit follows upstream's graded ArcFace rule (commit 7529a82 of
2026-04-19, implemented in ``compute_weights.py`` since da992f5): the cosine similarity
of its best-matching output face, banded by :data:`FACE_BANDS`.
"""

from __future__ import annotations

import math
import numbers
import threading
import warnings
from typing import Sequence

import numpy as np

FORMULAS = ("paper", "legacy")
DEPRECATED_FORMULAS = {"released": "legacy"}  # old name -> current name
FORMULA_SCALE = {"paper": "0-100", "legacy": "0-10"}
# The upstream (github.com/A113N-W3I/MICo-150K) commits whose eval_score.py each formula matches.
FORMULA_UPSTREAM = {"paper": "f58070c (2026-04-17) and later", "legacy": "1e0ab5d (2026-04-15), before f58070c"}
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


_warned_aliases: set[str] = set()
_warn_lock = threading.Lock()


def resolve_formula(formula: object) -> str:
    """The current name of ``formula``; a deprecated name warns (``FutureWarning``) once per process."""
    if formula in FORMULAS:
        return formula  # type: ignore[return-value]
    if isinstance(formula, str) and formula in DEPRECATED_FORMULAS:
        current = DEPRECATED_FORMULAS[formula]
        with _warn_lock:
            first = formula not in _warned_aliases
            _warned_aliases.add(formula)
        if first:
            warnings.warn(
                f"formula {formula!r} is deprecated; it is now called {current!r} (W x sqrt(SC x PQ), 0-10, upstream "
                f"eval_score.py before commit f58070c). Upstream and the leaderboard now use 'paper' (W x SC x PQ, 0-100)",
                FutureWarning,
                stacklevel=3,
            )
        return current
    allowed = FORMULAS + tuple(f"{old} (deprecated)" for old in DEPRECATED_FORMULAS)
    raise ValueError(f"formula must be one of {allowed}, got {formula!r}")


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

    ``formula="paper"`` (default): W x SC x PQ on 0-100, upstream since f58070c;
    ``formula="legacy"``: W x sqrt(SC x PQ) on 0-10, upstream before it (``"released"``: deprecated alias).
    """
    formula = resolve_formula(formula)
    weight = _real(w, "w")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"w must be within [0, 1], got {w!r}")
    sc = semantic_consistency(pf, sr)
    pq = perceptual_quality(naturalness, artifacts)
    if formula == "paper":
        return weight * sc * pq
    return weight * math.sqrt(sc * pq)
