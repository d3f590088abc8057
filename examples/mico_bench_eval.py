#!/usr/bin/env python
"""Score generated images on MICo-Bench (Weighted-Ref-VIEScore), report per group, compare two runs.

    # score (resumable: rerun the same command after a crash)
    python examples/mico_bench_eval.py score \
        --bench MICo-150K/MICo-Bench --results results --model flux_dar_on --out runs/mico_dar_on \
        --arcface-root ~/.insightface --judge-model Qwen/Qwen3-VL-32B-Instruct \
        --judge-base-url http://127.0.0.1:8000/v1 --formula paper

    # A/B
    python examples/mico_bench_eval.py compare --run-a runs/mico_dar_off --run-b runs/mico_dar_on --out runs/mico_ab

Generated images are read from <results>/<model>/<group>/<case_id>.(png|jpg|jpeg|webp).
Formulas: paper = W x SC x PQ (0-100, default; upstream eval_score.py since commit f58070c);
legacy = W x sqrt(SC x PQ) (0-10; upstream before f58070c); released = deprecated name of legacy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dar.eval import cli
from dar.eval.mico import DEPRECATED_FORMULAS, FORMULAS, GROUPS, MATCHING_MODES, run_mico


def add_score_arguments(score: argparse.ArgumentParser) -> None:
    score.add_argument("--bench", type=Path, required=True, help="MICo-Bench folder holding the JSONL manifests and images")
    score.add_argument("--results", type=Path, required=True, help="root of <model>/<group>/<case_id>.png")
    score.add_argument("--model", required=True, help="model folder name under --results")
    score.add_argument("--groups", nargs="+", default=None, help=f"default: every group present ({', '.join(GROUPS)})")
    score.add_argument("--formula", choices=FORMULAS + tuple(DEPRECATED_FORMULAS), default="paper",
                       help="paper: W x SC x PQ (0-100, default; upstream since f58070c); "
                            "legacy: W x sqrt(SC x PQ) (0-10; upstream before f58070c); released: deprecated name of legacy")
    score.add_argument("--face-matching", choices=MATCHING_MODES, default="best",
                       help="best: each source face takes its best output face (released); hungarian: one-to-one")
    score.add_argument("--prompt-file", type=Path, default=None, help="YAML with replacement prompts (keys sc, pq, visibility)")
    score.add_argument("--arcface-root", type=Path, default=None,
                       help="insightface root with models/<name>/ (needed when cases have face sources)")
    score.add_argument("--arcface-name", default="buffalo_l")
    score.add_argument("--arcface-ctx", type=int, default=-1, help="-1 for CPU, else GPU index")


def handle_score(args: argparse.Namespace) -> int:
    embedder = None
    if args.arcface_root is not None:
        from dar.eval.judges import ArcFaceEmbedder

        embedder = ArcFaceEmbedder(args.arcface_root, name=args.arcface_name, ctx_id=args.arcface_ctx)
    return cli.score_and_report(
        args, run_mico, bench_dir=args.bench, results_dir=args.results, model=args.model, embedder=embedder,
        groups=args.groups, formula=args.formula, face_matching=args.face_matching, prompt_file=args.prompt_file,
    )


def main(argv: list[str] | None = None) -> int:
    return cli.dispatch(cli.benchmark_parser(__doc__, add_score_arguments, handle_score), argv)


if __name__ == "__main__":
    sys.exit(main())
