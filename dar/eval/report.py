"""Per-task and overall summaries of a run: JSON, Markdown and a PNG bar chart.

Only cases with status ``ok`` enter the means. Everything else is counted, by kind, so
a mean is never quietly computed over fewer cases than the benchmark has.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from .atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from .mico.scoring import FORMULA_SCALE, FORMULA_UPSTREAM
from .runs import STATUS_GENERATION_ERROR, STATUS_INPUT_ERROR, STATUS_JUDGE_FAILURE, STATUS_MISSING, STATUS_OK, RunStore

FORMULA_TEXT = {
    "paper": f"W x SC x PQ (paper definition, 0-100; upstream eval_score.py {FORMULA_UPSTREAM['paper']})",
    "legacy": f"W x sqrt(SC x PQ) (legacy, 0-10; upstream eval_score.py {FORMULA_UPSTREAM['legacy']})",
}


def task_order(benchmark: str, tasks: Iterable[str]) -> list[str]:
    if benchmark == "micon":
        from .micon.protocol import TASKS as order
    elif benchmark == "mico":
        from .mico.manifest import GROUPS as order
    else:
        order = ()
    tasks = set(tasks)
    return [t for t in order if t in tasks] + sorted(tasks - set(order))


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def score_scale(identity: Mapping[str, Any]) -> str:
    if identity.get("benchmark") == "mico":
        return FORMULA_SCALE.get(identity.get("formula"), "0-100")
    return "0-100"


def summarize(run: RunStore | str | os.PathLike[str]) -> dict[str, Any]:
    """Summary of a run directory (see module docstring)."""
    store = run if isinstance(run, RunStore) else RunStore.load(run)
    identity = store.identity
    benchmark = identity.get("benchmark", "unknown")
    expected = store.expected()
    records = store.records()
    by_task: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_task.setdefault(record["task"], []).append(record)
    tasks = task_order(benchmark, set(expected) | set(by_task))

    def block(task_records: list[dict[str, Any]], expected_keys: set, pooled: bool) -> dict[str, Any]:
        def key(r: Mapping[str, Any]) -> Any:
            return (r["task"], str(r["case_id"])) if pooled else str(r["case_id"])

        ok = [r for r in task_records if r["status"] == STATUS_OK]
        recorded = {key(r) for r in task_records}
        out: dict[str, Any] = {
            "mean": _mean([float(r["score"]) for r in ok]),
            "count": len(ok),
            "expected": len(expected_keys | recorded),
            "missing_outputs": sum(r["status"] == STATUS_MISSING for r in task_records),
            "judge_failures": sum(r["status"] == STATUS_JUDGE_FAILURE for r in task_records),
            "input_errors": sum(r["status"] == STATUS_INPUT_ERROR for r in task_records),
            "generation_errors": sum(r["status"] == STATUS_GENERATION_ERROR for r in task_records),
            # Scored despite a failed judge call (compat="released" counts those as 0).
            "failures_scored_as_zero": sum(
                r["status"] == STATUS_OK and any("scored_as" in f for f in r.get("failures", [])) for r in task_records
            ),
            # Asked for but without a result yet (e.g. the run was interrupted).
            "pending": len(expected_keys - recorded),
        }
        if benchmark == "micon":
            # Replies that left some checkpoints out (scored as failed, per the protocol) --
            # often a sign of a truncated reply (raise the judge's max tokens).
            out["incomplete_verdicts"] = sum(bool(r.get("missing_checkpoints")) for r in ok)
            dims: dict[str, list[float]] = {}
            for r in ok:
                for dim, value in (r.get("dimension_scores") or {}).items():
                    dims.setdefault(dim, []).append(float(value))
            out["dimensions"] = {dim: _mean(values) for dim, values in sorted(dims.items())}
        return out

    task_blocks = {t: block(by_task.get(t, []), set(expected.get(t, [])), pooled=False) for t in tasks}
    overall = block(records, {(t, i) for t, ids in expected.items() for i in ids}, pooled=True)
    task_means = [b["mean"] for b in task_blocks.values() if b["mean"] is not None]
    # Only defined when every task has a mean; a macro mean over a subset would mislead.
    overall["task_macro_mean"] = _mean(task_means) if task_blocks and len(task_means) == len(task_blocks) else None
    summary: dict[str, Any] = {
        "benchmark": benchmark,
        "run_dir": str(store.run_dir),
        "identity": identity,
        "score_scale": score_scale(identity),
        "tasks": task_blocks,
        "overall": overall,
    }
    if benchmark == "mico":
        summary["formula"] = FORMULA_TEXT.get(identity.get("formula"), identity.get("formula"))
    failed = [f"{r['task']}/{r['case_id']}" for r in records if r["status"] in (STATUS_JUDGE_FAILURE, STATUS_INPUT_ERROR, STATUS_GENERATION_ERROR)]
    summary["failed_cases"] = failed
    return summary


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def to_markdown(summary: Mapping[str, Any]) -> str:
    identity = summary["identity"]
    title = {"micon": "MICON-Bench", "mico": "MICo-Bench"}.get(summary["benchmark"], summary["benchmark"])
    lines = [f"# {title} report: {identity.get('model')}", ""]
    lines.append(f"- Judge: `{identity.get('judge_model')}`")
    if summary["benchmark"] == "mico":
        lines.append(f"- Formula: {summary.get('formula')}")
        lines.append(f"- Face matching: {identity.get('face_matching')}")
    if summary["benchmark"] == "micon":
        lines.append(f"- story_infer scoring: {identity.get('story_scoring')}")
    lines.append(f"- Compatibility mode: {identity.get('compat')}")
    lines.append(f"- Score scale: {summary['score_scale']}")
    lines.append("")
    lines.append("| Task | Mean | Scored | Expected | Missing outputs | Generation errors | Judge failures | Input errors | Pending |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = list(summary["tasks"].items()) + [("**overall (pooled)**", summary["overall"])]
    for task, b in rows:
        lines.append(
            f"| {task} | {_fmt(b['mean'])} | {b['count']} | {b['expected']} | {b['missing_outputs']} | "
            f"{b.get('generation_errors', 0)} | {b['judge_failures']} | {b['input_errors']} | {b['pending']} |"
        )
    lines.append("")
    lines.append(f"Mean of task means: {_fmt(summary['overall'].get('task_macro_mean'))}")
    zeroed = summary["overall"].get("failures_scored_as_zero", 0)
    if zeroed:
        lines.append("")
        lines.append(f"{zeroed} scored case(s) include a failed judge call counted as 0 (compat=released).")
    incomplete = summary["overall"].get("incomplete_verdicts", 0)
    if incomplete:
        lines.append("")
        lines.append(f"{incomplete} scored case(s) had judge replies missing some checkpoints (counted as failed).")
    if summary["benchmark"] == "micon":
        dims = sorted({d for b in summary["tasks"].values() for d in b.get("dimensions", {})})
        if dims:
            lines += ["", "## Dimension scores (0-1)", "", "| Task | " + " | ".join(dims) + " |", "|---|" + "---:|" * len(dims)]
            for task, b in summary["tasks"].items():
                values = [_fmt(b.get("dimensions", {}).get(d)) if d in b.get("dimensions", {}) else "-" for d in dims]
                lines.append(f"| {task} | " + " | ".join(values) + " |")
    if summary.get("failed_cases"):
        shown = summary["failed_cases"][:50]
        lines += ["", f"## Failed cases ({len(summary['failed_cases'])})", ""]
        lines += [f"- {c}" for c in shown]
        if len(summary["failed_cases"]) > len(shown):
            lines.append(f"- ... and {len(summary['failed_cases']) - len(shown)} more (see report.json)")
        lines += ["", "Judge failures are kept on rerun; pass --retry-failed to score them again."]
    return "\n".join(lines) + "\n"


def plot_summary(summary: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Bar chart of per-task means (with scored/expected counts) saved as PNG."""
    import io

    from matplotlib.figure import Figure  # no pyplot: no global backend state, safe in threads

    tasks = list(summary["tasks"])
    means = [summary["tasks"][t]["mean"] for t in tasks]
    fig = Figure(figsize=(max(6.0, 1.3 * len(tasks) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    heights = [m if m is not None else 0.0 for m in means]
    bars = ax.bar(range(len(tasks)), heights, color="#4C72B0")
    for bar, task, mean in zip(bars, tasks, means):
        b = summary["tasks"][task]
        label = f"{mean:.1f}\n{b['count']}/{b['expected']}" if mean is not None else f"n/a\n0/{b['expected']}"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(tasks)), [t.replace("mico_bench_", "").replace("_", "\n") for t in tasks], fontsize=8)
    ax.set_ylabel(f"mean score ({summary['score_scale']})")
    identity = summary["identity"]
    extra = f", {identity.get('formula')} formula" if summary["benchmark"] == "mico" else ""
    ax.set_title(f"{identity.get('model')} on {summary['benchmark']} (judge {identity.get('judge_model')}{extra})", fontsize=9)
    top = max(heights + [0.0])
    ax.set_ylim(0, top * 1.25 if top > 0 else 1)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return atomic_write_bytes(path, buffer.getvalue())


def write_report(run: RunStore | str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``report.png`` (default: into the run directory)."""
    summary = summarize(run)
    target = Path(out_dir) if out_dir is not None else Path(summary["run_dir"])
    return {
        "json": atomic_write_json(target / "report.json", summary),
        "markdown": atomic_write_text(target / "report.md", to_markdown(summary)),
        "png": plot_summary(summary, target / "report.png"),
    }
