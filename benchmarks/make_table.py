#!/usr/bin/env python
"""Regenerate the Markdown performance table from benchmarks/results/*.json.

    python benchmarks/make_table.py                      # print the table
    python benchmarks/make_table.py --readme README.md   # rewrite the README region between
                                                         # <!-- perf-table:start --> and <!-- perf-table:end -->
    python benchmarks/make_table.py --readme README.md --check   # exit 1 if that region is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dar.bench import table

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--results", type=Path, default=HERE / "results", help="folder of result JSONs")
    p.add_argument("--readme", type=Path, help="rewrite the perf-table region of this file in place")
    p.add_argument("--check", action="store_true", help="with --readme: only check the region is up to date")
    p.add_argument("--all-shapes", action="store_true", help="every sweep shape, not only d128 bf16")
    args = p.parse_args(argv)
    try:
        text = table.build(table.load_results(args.results), all_shapes=args.all_shapes)
        if args.readme is None:
            print(text, end="")
            return 0
        old = args.readme.read_text(encoding="utf-8")
        new = table.replace_region(old, text)
    except (OSError, ValueError) as exc:
        print(f"make_table: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if new != old:
            print(f"make_table: {args.readme} performance table is out of date; run "
                  f"python benchmarks/make_table.py --readme {args.readme}", file=sys.stderr)
            return 1
        return 0
    if new != old:
        args.readme.write_text(new, encoding="utf-8")
        print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
