"""Evaluation toolkit for DAR: MICON-Bench and MICo-Bench scoring, reports, A/B comparison.

Submodules (import them explicitly; this package imports nothing heavy on purpose so
``import dar.eval`` stays cheap and works without torch, openai or matplotlib):

- :mod:`dar.eval.judges`  -- judge clients (OpenAI-compatible HTTP, local transformers) and face embedders
- :mod:`dar.eval.micon`   -- MICON-Bench checkpoint protocol, task cards, runner
- :mod:`dar.eval.mico`    -- MICo-Bench Weighted-Ref-VIEScore, manifests, runner
- :mod:`dar.eval.runs`    -- crash-safe, resumable run directories
- :mod:`dar.eval.runner_base` -- what the two benchmark runners share (case records, judge stages, the run loop)
- :mod:`dar.eval.report`  -- per-task summaries (JSON, Markdown, PNG)
- :mod:`dar.eval.compare` -- paired A/B comparison with bootstrap confidence intervals
- :mod:`dar.eval.jobs`    -- benchmark cases as generation jobs (used by examples/generate_benchmark.py)
"""

__all__ = ["judges", "micon", "mico", "runs", "runner_base", "report", "compare", "jobs", "replies", "atomic", "cli"]
