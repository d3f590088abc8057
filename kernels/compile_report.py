"""Compile the attention kernel's autotuning entries ahead of time and report their resources.

How the tables of `dar.kernels.autotune` are checked without a GPU: each entry is compiled for its
architecture with Triton's ahead-of-time compiler (`aot`) and read back (registers, spills, shared
memory). Tooling, not part of the kernels' import graph: it imports `attention` and `autotune`,
neither of which imports it. Needs ``TRITON_INTERPRET`` unset when the kernels are imported (the
interpreter replaces the kernel with a Python function).

    python -m dar.kernels.compile_report [--out DIR]    # every table entry -> tables-triton-<version>.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

from . import aot, attention, autotune, features


def compile_report(capability: tuple[int, int], dtype: str, head_dim: int, config: tuple,
                   *, causal: bool = False, weights: bool = True, prob_scale: bool = False,
                   key_bias: bool = True, use_tma: bool = True) -> dict:
    """Compile the attention kernel for a GPU that need not be present and report
    ``{"registers", "spill_bytes", "shared_bytes"}`` of the cubin Triton builds (with the ptxas
    Triton itself picks for the architecture; see `aot`).

    ``dtype`` is "fp16", "bf16" or "fp32"; ``config`` is a table entry ``(BLOCK_M, BLOCK_N, num_warps,
    num_stages)``. The call is a contiguous ``(2, 4, 1000, head_dim)`` one (Lk = 1000 is no multiple of
    BLOCK_N, so the masked tail is compiled in; on sm90+ it loads through TMA descriptors, as the op
    would, unless ``use_tma`` is False or the installed Triton has no host descriptors).
    """
    if features.INTERPRETED:
        raise RuntimeError("compile_report needs TRITON_INTERPRET unset")
    bm, bn, warps, stages = config
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    q = torch.empty(2, 4, 1000, head_dim, dtype=dt, device="meta")
    w = torch.empty(2, 1000, device="meta") if weights else None
    gen = torch.empty(2, 1, 2, dtype=torch.int32, device="meta") if weights else None
    bias = torch.empty(2, 1000, device="meta") if key_bias else None
    args, const = attention.kernel_arguments(q, q, q, w, gen, bias, causal, 0.1,
                                             "prob_scale" if prob_scale else "key_scale", torch.empty_like(q),
                                             capability=capability if use_tma else (8, 0))
    const.update(BLOCK_M=bm, BLOCK_N=bn)
    const["MASK_KEYS"] = attention.mask_keys({**args, **const})
    autotune.set_descriptor_blocks({**args, **const})
    fn = attention._rebalanced_attention_fwd
    sig, const, attrs = aot.specialise(fn, args, const)
    report = aot.analyse(aot.compile_for(fn, capability[0] * 10 + capability[1], const, sig, attrs,
                                         num_warps=warps, num_stages=stages))
    return {"registers": report["registers"], "spill_bytes": report["local_bytes"] + report["stack_bytes"],
            "shared_bytes": report["shared_bytes"], "use_tma": bool(const["USE_TMA"])}


# (name, capability, TMA path, table) of the tables checked; the pointer-path sm90 table only matters
# where descriptors are missing, and is checked on every Triton anyway.
TABLES = (("sm90", (9, 0), True, autotune._SM90), ("sm90-pointers", (9, 0), False, autotune._SM90_POINTERS),
          ("sm80", (8, 0), False, autotune._SM80))
SHARED_LIMIT = {9: 227 * 1024, 8: 163 * 1024}


def table_report(tables=TABLES, head_dims=(64, 128, 256)) -> list[dict]:
    """Every entry of ``tables`` at its head-dim class, compiled causal with key weights, prob_scale and
    a key bias (the most registers), bf16. One row per entry."""
    rows = []
    for name, cap, tma, table in tables:
        if tma and features.TensorDescriptor is None:
            continue
        for d in head_dims:
            for entry in table[d]:
                r = compile_report(cap, "bf16", d, entry, causal=True, prob_scale=True, use_tma=tma)
                ok = r["spill_bytes"] == 0 and r["shared_bytes"] <= SHARED_LIMIT[cap[0]]
                rows.append(dict(table=name, head_dim=d, entry=list(entry), ok=ok, **r))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    rows = table_report()
    lines = [f"# Attention autotuning tables compiled with Triton {triton.__version__}", "",
             "Each entry compiled ahead of time (bf16, causal, prob_scale weights, key bias, Lk 1000 so the masked",
             "tail is in), by `python -m dar.kernels.compile_report`. `ok`: no spills, shared memory within the",
             "limit (227 KiB sm90, 163 KiB sm80).", "",
             "| table | D | entry (BM, BN, warps, stages) | TMA | registers | spill B | shared B | ok |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['table']} | {r['head_dim']} | {tuple(r['entry'])} | {r['use_tma']} | {r['registers']} "
                     f"| {r['spill_bytes']} | {r['shared_bytes']} | {'yes' if r['ok'] else 'NO'} |")
    path = Path(args.out) / f"tables-triton-{triton.__version__}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
