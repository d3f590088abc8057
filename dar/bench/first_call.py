"""``dar bench first-call``: what ``import dar`` and a first `dar.dar_attention` call cost a fresh process.

Each run starts a new Python process that imports torch, makes one small CPU call's tensors, times a first
plain ``scaled_dot_product_attention`` call, then times ``import dar`` plus a first ``dar.dar_attention`` call
on the same tensors (backend="auto"). The extra cost is the second time less the first; the report gives the
median over the runs. Also recorded: whether ``torch._dynamo`` (seconds to import) was loaded by then. One
process runs first, uncounted, with bytecode caching on (as a user's Python has it), so that the runs time
imports, not compiling dar's sources.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch
import torch.nn.functional as F
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 8, 640, 64, generator=g) for _ in range(3))
t0 = time.perf_counter()
F.scaled_dot_product_attention(q, k, v)
t1 = time.perf_counter()
import dar
layout = dar.TokenLayout(ref=[(128, 384), (384, 640)], gen=[(0, 128)])
dar.dar_attention(q, k, v, layout, dar.DARConfig())
t2 = time.perf_counter()
print(json.dumps({"sdpa_s": t1 - t0, "dar_s": t2 - t1, "dynamo_loaded": "torch._dynamo" in sys.modules}))
"""


def measure(runs: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    out = []
    for _ in range(runs + 1):
        res = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, env=env)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out[1:]  # the first wrote the bytecode caches


def summarise(samples: list[dict]) -> dict:
    def med(key):
        return statistics.median(s[key] for s in samples)

    return {"runs": len(samples), "sdpa_first_s": med("sdpa_s"), "dar_first_s": med("dar_s"),
            "extra_s": statistics.median(s["dar_s"] - s["sdpa_s"] for s in samples),
            "dynamo_loaded": any(s["dynamo_loaded"] for s in samples)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dar bench first-call", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--runs", type=int, default=7, help="fresh processes (default 7)")
    p.add_argument("--out", type=Path, default=Path("dar-bench-results"), help="output folder")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error(f"--runs must be >= 1, got {args.runs}")
    import torch

    from . import env

    samples = measure(args.runs)
    summary = summarise(samples)
    result = {**env.header(torch.device("cpu"), "first-call", "full"), "summary": summary, "samples": samples}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"first-call-{result['device_slug']}-{(result['git'].get('commit') or 'nocommit')[:7]}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# First call on {result['device']['name']} ({result['device']['cores']} cores, load "
             f"{result['device']['load_avg_start']}), torch {result['versions'].get('torch')}, commit "
             f"{(result['git'].get('commit') or 'none')[:7]}", "",
             f"Median of {summary['runs']} fresh processes:", "",
             "| first call | seconds |", "|---|---|",
             f"| plain SDPA | {summary['sdpa_first_s']:.3f} |",
             f"| `import dar` + `dar.dar_attention` (auto) | {summary['dar_first_s']:.3f} |",
             f"| extra cost of DAR (per process, median) | {summary['extra_s']:.3f} |", "",
             f"torch._dynamo imported: {'yes' if summary['dynamo_loaded'] else 'no'}", ""]
    (args.out / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {args.out / stem}.json / .md")
    return 0
