"""Paired A/B comparison of two runs on the same benchmark (e.g. DAR off vs DAR on).

Cases are paired by (task, case id); only cases scored in both runs enter the
comparison, and the unpaired ones are counted. For each task and overall the report
gives the mean difference B - A with a paired bootstrap confidence interval (resampling
cases, ``scipy.stats.bootstrap``) and win/tie/loss counts.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from .report import task_order, score_scale
from .runs import STATUS_OK, RunStore

logger = logging.getLogger(__name__)

# Settings that change what a score means; runs differing in them cannot be paired.
_MUST_MATCH = ("benchmark", "formula", "compat", "story_scoring", "face_matching", "prompts", "candidate_prompt", "guidelines")


@dataclass
class PairedStats:
    n_pairs: int
    mean_a: float | None
    mean_b: float | None
    mean_diff: float | None  # B - A
    ci_low: float | None
    ci_high: float | None
    wins: int  # B better than A
    ties: int
    losses: int  # B worse than A
    only_a: int  # scored in A only
    only_b: int

    @property
    def verdict(self) -> str:
        if self.ci_low is None or self.ci_high is None:
            return "too few pairs"
        if self.ci_low > 0:
            return "B better"
        if self.ci_high < 0:
            return "A better"
        return "no clear difference"


@dataclass
class Comparison:
    benchmark: str
    run_a: str
    run_b: str
    label_a: str
    label_b: str
    confidence: float
    n_resamples: int
    tie_tolerance: float
    score_scale: str
    identity_a: dict[str, Any]
    identity_b: dict[str, Any]
    tasks: dict[str, PairedStats] = field(default_factory=dict)
    overall: PairedStats | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tasks"] = {t: dict(asdict(s), verdict=s.verdict) for t, s in self.tasks.items()}
        out["overall"] = dict(asdict(self.overall), verdict=self.overall.verdict) if self.overall else None
        return out


def _scores(store: RunStore) -> dict[tuple[str, str], float]:
    return {(r["task"], str(r["case_id"])): float(r["score"]) for r in store.records() if r["status"] == STATUS_OK}


def paired_stats(
    a: Mapping[Any, float],
    b: Mapping[Any, float],
    *,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    tie_tolerance: float = 0.0,
    seed: int = 0,
) -> PairedStats:
    """Paired statistics of B - A over the keys present in both mappings."""
    keys = sorted(set(a) & set(b))
    diffs = np.array([b[k] - a[k] for k in keys], dtype=np.float64)
    n = len(keys)
    stats = PairedStats(
        n_pairs=n,
        mean_a=math.fsum(a[k] for k in keys) / n if n else None,
        mean_b=math.fsum(b[k] for k in keys) / n if n else None,
        mean_diff=float(diffs.mean()) if n else None,
        ci_low=None,
        ci_high=None,
        wins=int(np.sum(diffs > tie_tolerance)),
        ties=int(np.sum(np.abs(diffs) <= tie_tolerance)),
        losses=int(np.sum(diffs < -tie_tolerance)),
        only_a=len(set(a) - set(b)),
        only_b=len(set(b) - set(a)),
    )
    if n >= 2:
        if np.ptp(diffs) == 0:
            # Every resample has the same mean; the interval is that point (scipy would warn).
            stats.ci_low = stats.ci_high = float(diffs[0])
        else:
            from scipy.stats import bootstrap

            # Percentile interval: BCa is undefined for the near-degenerate samples that
            # small per-task pairs often produce (scipy returns NaN there).
            result = bootstrap(
                (diffs,),
                np.mean,
                confidence_level=confidence,
                n_resamples=n_resamples,
                method="percentile",
                vectorized=True,
                random_state=np.random.default_rng(seed),
            )
            stats.ci_low = float(result.confidence_interval.low)
            stats.ci_high = float(result.confidence_interval.high)
    return stats


def compare(
    run_a: RunStore | str | os.PathLike[str],
    run_b: RunStore | str | os.PathLike[str],
    *,
    label_a: str = "A",
    label_b: str = "B",
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    tie_tolerance: float = 0.0,
    seed: int = 0,
) -> Comparison:
    """Compare run B against run A (differences are B - A; "wins" are cases where B scored higher)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 100:
        raise ValueError(f"n_resamples must be an integer >= 100, got {n_resamples!r}")
    if not math.isfinite(tie_tolerance) or tie_tolerance < 0:
        raise ValueError(f"tie_tolerance must be >= 0, got {tie_tolerance!r}")
    store_a = run_a if isinstance(run_a, RunStore) else RunStore.load(run_a)
    store_b = run_b if isinstance(run_b, RunStore) else RunStore.load(run_b)
    id_a, id_b = store_a.identity, store_b.identity
    mismatched = {k: (id_a.get(k), id_b.get(k)) for k in _MUST_MATCH if id_a.get(k) != id_b.get(k)}
    if mismatched:
        detail = ", ".join(f"{k}: {x!r} vs {y!r}" for k, (x, y) in mismatched.items())
        raise ValueError(f"run_b: cannot pair runs scored under different settings ({detail})")
    if id_a.get("judge_model") != id_b.get("judge_model"):
        warnings.warn(
            f"runs were scored by different judges ({id_a.get('judge_model')!r} vs {id_b.get('judge_model')!r}); "
            "differences mix model and judge effects",
            stacklevel=2,
        )
    scores_a, scores_b = _scores(store_a), _scores(store_b)
    tasks = task_order(id_a.get("benchmark", ""), {t for t, _ in scores_a} | {t for t, _ in scores_b})
    result = Comparison(
        benchmark=id_a.get("benchmark", "unknown"),
        run_a=str(store_a.run_dir),
        run_b=str(store_b.run_dir),
        label_a=label_a,
        label_b=label_b,
        confidence=confidence,
        n_resamples=n_resamples,
        tie_tolerance=tie_tolerance,
        score_scale=score_scale(id_a),
        identity_a=id_a,
        identity_b=id_b,
    )
    kwargs = dict(confidence=confidence, n_resamples=n_resamples, tie_tolerance=tie_tolerance, seed=seed)
    for task in tasks:
        sub_a = {k: v for k, v in scores_a.items() if k[0] == task}
        sub_b = {k: v for k, v in scores_b.items() if k[0] == task}
        result.tasks[task] = paired_stats(sub_a, sub_b, **kwargs)
    result.overall = paired_stats(scores_a, scores_b, **kwargs)
    return result


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _verdict_text(stats: PairedStats, label_a: str, label_b: str) -> str:
    return {"B better": f"{label_b} better", "A better": f"{label_a} better"}.get(stats.verdict, stats.verdict)


def to_markdown(cmp: Comparison) -> str:
    pct = f"{cmp.confidence * 100:g}%"
    lines = [
        f"# A/B comparison on {cmp.benchmark}: {cmp.label_b} vs {cmp.label_a}",
        "",
        f"- A ({cmp.label_a}): `{cmp.run_a}` -- model `{cmp.identity_a.get('model')}`, judge `{cmp.identity_a.get('judge_model')}`",
        f"- B ({cmp.label_b}): `{cmp.run_b}` -- model `{cmp.identity_b.get('model')}`, judge `{cmp.identity_b.get('judge_model')}`",
        f"- Score scale: {cmp.score_scale}" + (f", formula {cmp.identity_a.get('formula')}" if cmp.benchmark == "mico" else ""),
        f"- Difference = B - A; {pct} paired bootstrap CI ({cmp.n_resamples} resamples, percentile); "
        f"tie when |B - A| <= {cmp.tie_tolerance:g}",
        "",
        f"| Task | Pairs | Mean A | Mean B | B - A | {pct} CI | Wins (B>A) | Ties | Losses | Unpaired A/B | Verdict |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---|---|",
    ]
    rows = list(cmp.tasks.items()) + ([("**overall**", cmp.overall)] if cmp.overall else [])
    for task, s in rows:
        ci = f"[{_fmt(s.ci_low, True)}, {_fmt(s.ci_high, True)}]" if s.ci_low is not None else "n/a"
        lines.append(
            f"| {task} | {s.n_pairs} | {_fmt(s.mean_a)} | {_fmt(s.mean_b)} | {_fmt(s.mean_diff, True)} | {ci} | "
            f"{s.wins} | {s.ties} | {s.losses} | {s.only_a}/{s.only_b} | {_verdict_text(s, cmp.label_a, cmp.label_b)} |"
        )
    return "\n".join(lines) + "\n"


def plot_comparison(cmp: Comparison, path: str | os.PathLike[str]) -> Path:
    """Per-task mean difference (B - A) with its confidence interval, as a PNG."""
    import io

    from matplotlib.figure import Figure

    rows = [(t, s) for t, s in cmp.tasks.items() if s.mean_diff is not None]
    if cmp.overall is not None and cmp.overall.mean_diff is not None:
        rows.append(("overall", cmp.overall))
    fig = Figure(figsize=(7.0, 0.5 * len(rows) + 1.8), layout="constrained")
    ax = fig.add_subplot()
    for i, (task, s) in enumerate(rows):
        color = {"B better": "#2a9d4b", "A better": "#c0392b"}.get(s.verdict, "#555555")
        if s.ci_low is not None:
            ax.plot([s.ci_low, s.ci_high], [i, i], color=color, linewidth=2)
        ax.plot([s.mean_diff], [i], "o", color=color)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [t.replace("mico_bench_", "") for t, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{cmp.label_b} - {cmp.label_a} (mean difference, {cmp.confidence * 100:g}% CI; scale {cmp.score_scale})")
    ax.set_title(f"{cmp.benchmark}: {cmp.label_b} vs {cmp.label_a}", fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return atomic_write_bytes(path, buffer.getvalue())


def write_comparison(cmp: Comparison, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``comparison.json``, ``comparison.md`` and ``comparison.png`` into ``out_dir``."""
    target = Path(out_dir)
    return {
        "json": atomic_write_json(target / "comparison.json", cmp.to_dict()),
        "markdown": atomic_write_text(target / "comparison.md", to_markdown(cmp)),
        "png": plot_comparison(cmp, target / "comparison.png"),
    }
