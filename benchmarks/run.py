#!/usr/bin/env python
"""Run the benchmark suite and store the results with the repository.

    python benchmarks/run.py                 # kernels, every preset, on the GPU
    python benchmarks/run.py e2e             # one denoising step of the real-size models
    python benchmarks/run.py --quick         # CPU smoke run on tiny shapes
    python benchmarks/run.py --help          # all options (same as `dar bench --help`)

Same options as `dar bench`, but results go to benchmarks/results/ unless --out says otherwise.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str]) -> int:
    if "--quick" in argv and "cuda" not in argv:
        # Triton reads TRITON_INTERPRET when dar defines its kernels, so it must be set before the import.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from dar.bench import main as bench_main

    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv = [*argv, "--out", str(RESULTS)]
    return bench_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
