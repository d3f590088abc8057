#!/usr/bin/env python
"""Score generated images on MICON-Bench, report per task, and compare two runs (e.g. DAR off/on).

    # score (resumable: rerun the same command after a crash)
    python examples/micon_bench_eval.py score \
        --data MICON-Bench/Evaluation/data --templates MICON-Bench/Evaluation/templates \
        --generations outputs/generations --model flux_dar_on --out runs/micon_dar_on \
        --judge-model Qwen/Qwen3-VL-32B-Instruct --judge-base-url http://127.0.0.1:8000/v1

    # A/B
    python examples/micon_bench_eval.py compare --run-a runs/micon_dar_off --run-b runs/micon_dar_on --out runs/micon_ab

Generated images are read from <generations>/<model>/<task>/<case_id>.(png|jpg|jpeg).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dar.eval import cli
from dar.eval.micon import TASKS, run_micon


def add_score_arguments(score: argparse.ArgumentParser) -> None:
    score.add_argument("--data", type=Path, required=True, help="MICON-Bench data directory (<task>/cases/*.yaml)")
    score.add_argument("--templates", type=Path, required=True, help="MICON-Bench templates directory (judge prompt + Q&A)")
    score.add_argument("--generations", type=Path, required=True, help="root of <model>/<task>/<case_id>.png")
    score.add_argument("--model", required=True, help="model folder name under --generations")
    score.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=None, help="default: every task in --data")
    score.add_argument("--candidates", type=Path, default=None,
                       help="story_infer candidate answers (default: <data>/story_infer/simple_candidate_template.json)")
    score.add_argument("--no-story-candidates", action="store_true",
                       help="score story_infer on checkpoints only (not the published 40/60 hybrid)")
    score.add_argument("--guidelines", type=Path, default=None, help="YAML task -> extra guideline text for the judge prompt")
    score.add_argument("--candidate-prompt", type=Path, default=None, help="replacement story_infer candidate prompt")


def handle_score(args: argparse.Namespace) -> int:
    return cli.score_and_report(
        args, run_micon, data_dir=args.data, templates_dir=args.templates, generations_dir=args.generations,
        model=args.model, tasks=args.tasks, story_candidates=not args.no_story_candidates, candidates_file=args.candidates,
        guidelines_file=args.guidelines, candidate_prompt_file=args.candidate_prompt,
    )


def main(argv: list[str] | None = None) -> int:
    return cli.dispatch(cli.benchmark_parser(__doc__, add_score_arguments, handle_score), argv)


if __name__ == "__main__":
    sys.exit(main())
