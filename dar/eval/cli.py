"""Command-line plumbing shared by ``examples/micon_bench_eval.py`` and ``examples/mico_bench_eval.py``.

The example scripts define only their benchmark-specific ``score`` options and how those
reach the runner; :func:`benchmark_parser`, :func:`dispatch` and :func:`score_and_report`
supply the rest (judge and run options, logging, the ``report`` / ``compare``
subcommands), so both scripts behave the same way.

Every parser has ``allow_abbrev=False``: with prefix matching, ``--judge-api-key sk-...``
was taken as ``--judge-api-key-env`` and the key ended up echoed in an error. For the
same reason, unknown arguments are reported by option name only, never by value.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Any, Callable

from .judges.base import Judge

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


def add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("judge")
    group.add_argument("--judge-backend", choices=("openai", "transformers"), default="openai",
                       help="openai: any OpenAI-compatible server (vLLM, hosted APIs); transformers: a local model")
    group.add_argument("--judge-model", required=True, help="model name on the server, or a local model directory")
    group.add_argument("--judge-base-url", default=DEFAULT_BASE_URL, help=f"server URL including /v1 (default {DEFAULT_BASE_URL})")
    group.add_argument("--judge-api-key-env", default=None, metavar="VAR",
                       help="name of the environment variable holding the API key (the key itself is never written anywhere)")
    group.add_argument("--judge-timeout", type=float, default=120.0, help="seconds per request (default 120)")
    group.add_argument("--judge-retries", type=int, default=4, help="transport retries on timeouts, 429 and 5xx (default 4)")
    group.add_argument("--judge-concurrency", type=int, default=4, help="requests in flight at most (default 4)")
    group.add_argument("--judge-max-tokens", type=int, default=1024, help="reply length cap (default 1024)")
    group.add_argument("--judge-cache", type=Path, default=None, help="reply cache directory (default: <out>/judge_cache)")
    group.add_argument("--no-judge-cache", action="store_true", help="do not cache judge replies")
    group.add_argument("--judge-device", default=None, help="transformers backend: device, e.g. cuda or cpu")
    group.add_argument("--judge-dtype", default="auto", help="transformers backend: weight dtype (default auto)")
    group.add_argument("--parse-retries", type=int, default=2, help="extra asks when a reply cannot be parsed (default 2)")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="run directory (created, or resumed if it exists)")
    parser.add_argument("--compat", choices=("strict", "released"), default="strict",
                        help="strict (default): failed judge replies are reported, never scored; "
                             "released: reproduce the released scripts' handling, for comparison with published numbers")
    parser.add_argument("--retry-failed", action="store_true", help="score cases recorded as judge failures again")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_judge(args: argparse.Namespace) -> Judge:
    cache = None if args.no_judge_cache else (args.judge_cache or Path(args.out) / "judge_cache")
    if args.judge_backend == "transformers":
        from .judges.local import TransformersJudge

        return TransformersJudge(args.judge_model, device=args.judge_device, dtype=args.judge_dtype,
                                 max_new_tokens=args.judge_max_tokens, cache_dir=cache)
    from .judges.openai_compat import OpenAIJudge

    return OpenAIJudge(args.judge_base_url, args.judge_model, api_key_env=args.judge_api_key_env, timeout=args.judge_timeout,
                       max_retries=args.judge_retries, concurrency=args.judge_concurrency, cache_dir=cache,
                       max_tokens=args.judge_max_tokens)


def judge_concurrency(args: argparse.Namespace) -> int:
    # A local model answers one request at a time; more worker threads would only queue.
    return 1 if args.judge_backend == "transformers" else args.judge_concurrency


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # The HTTP stack logs every request at INFO; keep the console for our own messages.
    for noisy in ("httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def benchmark_parser(
    description: str | None,
    add_score_arguments: Callable[[argparse.ArgumentParser], None],
    handle_score: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    """``score`` (benchmark options, then run and judge options), ``report`` and ``compare`` subcommands."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    score = sub.add_parser("score", help="score a model's generated images", allow_abbrev=False)
    add_score_arguments(score)
    add_run_arguments(score)
    add_judge_arguments(score)
    score.set_defaults(handler=handle_score)

    add_report_and_compare(sub)
    return parser


_OPTION_NAME = re.compile(r"--?[A-Za-z][A-Za-z0-9-]*")


def unrecognized_message(extra: list[str]) -> str:
    """argparse's "unrecognized arguments" error, naming options but never repeating a value."""
    names: list[str] = []
    values = 0
    for token in extra:
        name, has_value, _ = token.partition("=")
        if _OPTION_NAME.fullmatch(name):
            names.append(name)
            values += bool(has_value)
        else:
            values += 1
    message = "unrecognized arguments: " + (" ".join(names) if names else "(none named)")
    if values:
        message += f" and {values} value(s), not repeated here (they may be secrets)"
    if any(name.startswith("--judge-api-key") or name.startswith("--api-key") for name in names):
        message += ("; the judge's key is never taken on the command line: export it in an environment variable "
                    "and pass that variable's name with --judge-api-key-env")
    return message


def dispatch(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv``, set up logging and run the chosen subcommand; returns its exit code."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(unrecognized_message(extra))
    configure_logging(args.verbose)
    return args.handler(args)


def score_and_report(args: argparse.Namespace, run: Callable[..., Any], **benchmark_args: Any) -> int:
    """Call a benchmark runner (``run_micon``, ``run_mico``) with the shared run and judge options, then report."""
    summary = run(
        **benchmark_args,
        out_dir=args.out,
        judge=build_judge(args),
        compat=args.compat,
        concurrency=judge_concurrency(args),
        retry_failed=args.retry_failed,
        parse_retries=args.parse_retries,
        progress=not args.no_progress,
    )
    return finish_score(args.out, summary)


def add_report_and_compare(subparsers: Any) -> None:
    report = subparsers.add_parser("report", help="(re)write report.json/.md/.png for a run directory", allow_abbrev=False)
    report.add_argument("--run", type=Path, required=True, help="run directory")
    report.add_argument("--out", type=Path, default=None, help="where to write the report (default: the run directory)")
    report.set_defaults(handler=handle_report)

    cmp = subparsers.add_parser("compare", help="paired A/B comparison of two run directories (B - A)", allow_abbrev=False)
    cmp.add_argument("--run-a", type=Path, required=True, help="baseline run, e.g. DAR off")
    cmp.add_argument("--run-b", type=Path, required=True, help="treatment run, e.g. DAR on")
    cmp.add_argument("--label-a", default="DAR off")
    cmp.add_argument("--label-b", default="DAR on")
    cmp.add_argument("--out", type=Path, required=True, help="directory for comparison.json/.md/.png")
    cmp.add_argument("--confidence", type=float, default=0.95)
    cmp.add_argument("--resamples", type=int, default=10_000)
    cmp.add_argument("--tie-tolerance", type=float, default=0.0, help="|B - A| at or below this counts as a tie")
    cmp.add_argument("--seed", type=int, default=0)
    cmp.set_defaults(handler=handle_compare)


def handle_report(args: argparse.Namespace) -> int:
    from .report import summarize, to_markdown, write_report

    paths = write_report(args.run, args.out)
    print(to_markdown(summarize(args.run)))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def handle_compare(args: argparse.Namespace) -> int:
    from .compare import compare, to_markdown, write_comparison

    result = compare(args.run_a, args.run_b, label_a=args.label_a, label_b=args.label_b, confidence=args.confidence,
                     n_resamples=args.resamples, tie_tolerance=args.tie_tolerance, seed=args.seed)
    paths = write_comparison(result, args.out)
    print(to_markdown(result))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def finish_score(out: Path, summary: Any) -> int:
    """Write the report after a scoring run and print it."""
    from .report import summarize, to_markdown, write_report

    paths = write_report(out)
    print(to_markdown(summarize(out)))
    print(f"scored {summary.scored} case(s) this run, skipped {summary.skipped} already finished; "
          f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
