#!/usr/bin/env python
"""Static report: what the compiled kernels do, read from their SASS, with no GPU.

    python benchmarks/static_report.py                  # every variant, sm_90a and newer targets
    python benchmarks/static_report.py --arch 90        # one target
    python benchmarks/static_report.py --variant 'attn-*' --print
    dar bench static [same options]                     # the same, from a repository checkout

Every variant is compiled with Triton's ahead-of-time compiler for each target the installed
Triton supports (``kernels/aot.py``), then its cubin is read with the ``cuobjdump`` / ``nvdisasm``
of Triton's wheel. For each variant it reports the innermost loop holding tensor-core
instructions (the main loop): SASS instructions per thread per 64 keys, HGMMA, TMA loads
(UTMALDG) against ``cp.async`` (LDGSTS) and plain loads, FSEL, MUFU; and for the whole kernel the
registers, spills (local memory, STL) and shared memory. Results go to
``benchmarks/results/static-triton-<version>.json`` and ``.md`` (``--out`` to change the folder).

Adding a variant: append a `Variant` to ``VARIANTS`` (or call `register`) with a ``build(arch)``
that returns ``(jit_fn, args, constexprs)``: example runtime arguments (``meta`` tensors will do)
and the constexprs of one launch. `aot.specialise` then derives the signature as Triton's launcher
would. ``loop`` picks which of the kernel's MMA loops is the variant's main loop when there are
several (a function of the list of `aot.Loop`, default: the one with the most instructions).
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# Targets tried, oldest first; the report covers sm_90a and every newer one the installed Triton compiles.
ARCHS = (90, 100, 103, 110, 120, 121)
SCHEMA = "dar-static/1"


@dataclass
class Variant:
    name: str
    description: str
    build: Callable[[int], tuple[Any, dict, dict]]  # arch -> (jit fn, runtime args, constexprs)
    num_warps: int
    num_stages: int
    keys_per_iteration: int  # BLOCK_N of the main loop, to normalise to 64 keys
    baseline: str | None = None  # variant the loop ratio is taken against
    loop: Callable[[list], Any] | None = None
    options: dict = field(default_factory=dict)


VARIANTS: list[Variant] = []


def register(variant: Variant) -> Variant:
    VARIANTS.append(variant)
    return variant


# ------------------------------------------------------------------------------------------------
# Attention variants: the Qwen-Image-Edit shape family (bf16, D 128, B 2, Hq 24), 128x64 tiles,
# 8 warps, 3 stages, inputs in diffusers' (B, L, H, D) layout transposed to (B, H, L, D).
# ------------------------------------------------------------------------------------------------

ATTN_CONFIG = (128, 64, 8, 3)  # BLOCK_M, BLOCK_N, num_warps, num_stages
L_PLAIN = 16384  # a multiple of every BLOCK_N: no masked key tile
L_QWEN3 = 16584  # Qwen-Image-Edit with 3 references at 1024^2: the last key tile is partial


def attention_call(*, lq=L_PLAIN, lk=None, hq=24, hk=24, d=128, dv=None, batch=2, weights=False,
                   mode="key_scale", causal=False, key_bias=False, dtype="bfloat16", varlen=False):
    """Meta tensors for one ``rebalanced_attention`` call, as diffusers lays them out, or (varlen)
    for one ``rebalanced_attention_varlen`` call with ``batch`` packed sequences, viewed as the op
    passes them to `kernel_arguments`."""
    import torch

    dt = getattr(torch, dtype)
    lk = lq if lk is None else lk
    dv = d if dv is None else dv
    meta = dict(device="meta")
    if varlen:
        as4 = lambda t: t.unsqueeze(0).transpose(1, 2)  # noqa: E731  (what the varlen op does)
        cu = torch.empty(batch + 1, dtype=torch.int32, **meta)
        w = torch.empty(1, batch * lk, dtype=torch.float32, **meta) if weights else None
        gen = torch.empty(batch, 1, 2, dtype=torch.int32, **meta) if weights else None
        q = as4(torch.empty(batch * lq, hq, d, dtype=dt, **meta))
        return dict(q=q, k=as4(torch.empty(batch * lk, hk, d, dtype=dt, **meta)),
                    v=as4(torch.empty(batch * lk, hk, dv, dtype=dt, **meta)), w=w, gen_ranges=gen, key_bias=None,
                    is_causal=causal, scale=1 / math.sqrt(d), mode=mode, out=as4(torch.empty(batch * lq, hq, dv,
                                                                                            dtype=dt, **meta)),
                    varlen=(cu, cu, lq, lk))
    q = torch.empty(batch, lq, hq, d, dtype=dt, **meta).transpose(1, 2)
    k = torch.empty(batch, lk, hk, d, dtype=dt, **meta).transpose(1, 2)
    v = torch.empty(batch, lk, hk, dv, dtype=dt, **meta).transpose(1, 2)
    w = torch.empty(batch, lk, dtype=torch.float32, **meta) if weights else None
    gen = torch.empty(batch, 1, 2, dtype=torch.int32, **meta) if weights else None
    bias = torch.empty(batch, lk, dtype=torch.float32, **meta) if key_bias else None
    return dict(q=q, k=k, v=v, w=w, gen_ranges=gen, key_bias=bias, is_causal=causal, scale=1 / math.sqrt(d),
                mode=mode)


# The attention kernel's loops in SASS order, which is program order (they run one after the
# other): with key weights the plain, weighted and per-row main loops, then (when key tiles need
# masking) the same three kinds over the masked tail; without, the main loop and the tail.
# `attention_loops` checks each against its signature, so a reordering by the compiler fails
# loudly instead of mislabelling.
LOOP_ORDER = {True: ("plain", "weighted", "per_row", "tail", "weighted_tail", "per_row_tail"),
              False: ("plain", "tail")}
_MAIN_LOOPS = {True: 3, False: 1}


def attention_loops(loops, weights: bool, folded: bool = False) -> dict:
    """Name the attention kernel's MMA loops (see LOOP_ORDER) and check their signatures.
    ``folded``: key_scale, whose all-rebalanced programs run the plain loop over K' = w * K, so its
    "weighted" loop loads no weights."""
    names = LOOP_ORDER[weights][:len(loops)]
    named = dict(zip(names, loops))
    if len(loops) not in (_MAIN_LOOPS[weights], len(LOOP_ORDER[weights])):
        raise RuntimeError(f"expected {LOOP_ORDER[weights]} loops, found {len(loops)}")
    w_loads = lambda lp: lp.count("LDGSTS") + lp.count("LDG.")  # noqa: E731  (K/V come by TMA on sm90+)
    for names in (("plain", "weighted", "per_row"), ("tail", "weighted_tail", "per_row_tail")) if weights else ():
        plain, weighted, per_row = (named.get(n) for n in names)
        if weighted is None:
            continue
        # folded: the weighted loop is the plain loop on K' (with a key bias both load the bias);
        # prob_scale's loads w for its row sum. The per-row loop selects per score.
        ok = ((w_loads(weighted) == w_loads(plain) if folded else w_loads(weighted) > 0)
              and per_row.count("FSEL") > weighted.count("FSEL") and w_loads(per_row) > 0)
        if not ok:
            raise RuntimeError("the weighted / per-row loops do not look like themselves: loop order changed?")
    return named


def attention_variant(name, description, *, config=ATTN_CONFIG, baseline="attn-plain", loop="plain", **call):
    """Register a variant of ``_rebalanced_attention_fwd``: ``call`` as for `attention_call`,
    ``config`` (BLOCK_M, BLOCK_N, num_warps, num_stages) as in kernels/autotune.py,
    ``loop`` which of the kernel's loops is the variant's main loop (LOOP_ORDER). The arguments come
    from the op's own `kernel_arguments`, so the report compiles what it launches."""
    bm, bn, warps, stages = config
    weights = bool(call.get("weights"))

    def build(arch):
        from dar.kernels import attention, autotune

        c = attention_call(**call)
        if "out" not in c:
            c["out"] = attention.empty_output(c["q"], c["v"].shape[3])
        args, const = attention.kernel_arguments(**c, capability=divmod(arch, 10))
        const.update(BLOCK_M=bm, BLOCK_N=bn)
        const["MASK_KEYS"] = attention.mask_keys({**args, **const})
        autotune.set_descriptor_blocks({**args, **const})
        return attention._rebalanced_attention_fwd, args, const

    folded = weights and call.get("mode", "key_scale") == "key_scale"
    pick = lambda loops: attention_loops(loops, weights, folded).get(loop)  # noqa: E731
    return register(Variant(name, description, build, warps, stages, bn, baseline, pick))


attention_variant("attn-plain", "DAR off (w = None), L 16384", baseline="yardstick")
attention_variant("attn-key_scale", "key_scale, every row of the program rebalanced, L 16384", weights=True,
                  loop="weighted")
attention_variant("attn-key_scale-plain_rows", "key_scale call, a program with no rebalanced row", weights=True)
attention_variant("attn-key_scale-per_row", "key_scale, a program straddling a range edge", weights=True,
                  loop="per_row")
attention_variant("attn-prob_scale", "prob_scale, every row rebalanced, L 16384", weights=True, mode="prob_scale",
                  loop="weighted")
attention_variant("attn-prob_scale-per_row", "prob_scale, a program straddling a range edge", weights=True,
                  mode="prob_scale", loop="per_row")
attention_variant("attn-plain-tail", "DAR off, Qwen 3 refs L 16584 (partial last key tile)", lq=L_QWEN3,
                  baseline="attn-plain")
attention_variant("attn-plain-tail-masked", "DAR off, L 16584: the peeled masked tail loop", lq=L_QWEN3,
                  baseline="attn-plain", loop="tail")
attention_variant("attn-key_scale-tail", "key_scale, Qwen 3 refs L 16584", lq=L_QWEN3, weights=True,
                  baseline="attn-plain-tail", loop="weighted")
attention_variant("attn-prob_scale-tail", "prob_scale, Qwen 3 refs L 16584", lq=L_QWEN3, weights=True,
                  mode="prob_scale", baseline="attn-plain-tail", loop="weighted")
attention_variant("attn-key_scale-tail-masked", "key_scale, L 16584: the peeled masked tail, every row rebalanced",
                  lq=L_QWEN3, weights=True, baseline="attn-plain-tail-masked", loop="weighted_tail")
attention_variant("attn-key_scale-tail-masked-plain_rows", "key_scale, L 16584: the masked tail, no row rebalanced",
                  lq=L_QWEN3, weights=True, baseline="attn-plain-tail-masked", loop="tail")
attention_variant("attn-key_scale-tail-masked-per_row", "key_scale, L 16584: the masked tail, a range edge",
                  lq=L_QWEN3, weights=True, baseline="attn-plain-tail-masked", loop="per_row_tail")
attention_variant("attn-key_scale-bias", "key_scale with a key-padding bias, L 16384", weights=True, key_bias=True,
                  loop="weighted")
attention_variant("attn-causal", "DAR off, causal, L 16384", causal=True)
attention_variant("attn-key_scale-causal", "key_scale, causal, L 16384", weights=True, causal=True,
                  baseline="attn-causal", loop="weighted")
attention_variant("attn-key_scale-gqa", "key_scale, GQA 24/8 heads, L 16384", weights=True, hk=8, loop="weighted")
attention_variant("attn-key_scale-varlen", "key_scale, packed sequences (varlen), L 16384", weights=True,
                  varlen=True, loop="weighted")
attention_variant("attn-plain-128x128", "DAR off, 128x128 tiles, 8 warps, 2 stages", config=(128, 128, 8, 2),
                  baseline=None)
attention_variant("attn-key_scale-128x128", "key_scale, 128x128 tiles, 8 warps, 2 stages", weights=True,
                  config=(128, 128, 8, 2), baseline="attn-plain-128x128", loop="weighted")
attention_variant("attn-key_scale-d64", "key_scale, D 64, L 16384", weights=True, d=64, config=(128, 128, 8, 3),
                  baseline=None, loop="weighted")
attention_variant("attn-key_scale-d256", "key_scale, D 256, L 16384", weights=True, d=256, config=(128, 64, 8, 2),
                  baseline=None, loop="weighted")


# ------------------------------------------------------------------------------------------------
# Scoring variants (kernels/scoring.py): the same Qwen-Image-Edit shape (bf16, D 128, B 2, 24 heads,
# 3 references, L 16584), 64 sampled queries, the sm_90 autotune tables' first tiles.
# ------------------------------------------------------------------------------------------------

SCORING_STAGE1 = (64, 128, 4, 3)  # BLOCK_M, BLOCK_N, num_warps, num_stages (ROW_LSE["sm90"][128][0])
SCORING_STAGE2 = (64, 128, 8, 3)  # KEY_MASS["sm90"][128][0]


def scoring_arguments(*, hq=24, hk=24, d=128, batch=2, lk=L_QWEN3, samples=64, refs=3, splits=2,
                      thresholds="minmax", dtype="bfloat16"):
    """Meta tensors for one dense ``key_weights`` call, through `scoring.kernel_arguments`."""
    import torch

    from dar.kernels import scoring

    dt, meta = getattr(torch, dtype), dict(device="meta")
    q = torch.empty(batch, lk, hq, d, dtype=dt, **meta).transpose(1, 2)
    k = torch.empty(batch, lk, hk, d, dtype=dt, **meta).transpose(1, 2)
    i32, f32 = dict(dtype=torch.int32, **meta), dict(dtype=torch.float32, **meta)
    smp, rr, rg = torch.empty(batch, samples, **i32), torch.empty(batch, refs, 2, **i32), torch.empty(batch, refs, **i32)
    buffers = dict(lse_part=torch.empty(batch, hq, samples, splits, **f32), mass=torch.empty(batch * lk, **f32),
                   key_group=torch.empty(1, **i32), stats=torch.empty(batch, 1, 2, **f32),
                   t_hi=torch.empty(batch, **f32), t_lo=torch.empty(batch, **f32), w=torch.empty(batch * lk, **f32))
    return scoring.kernel_arguments(q, k, None, None, lk, lk, q.stride(), k.stride(), smp, rr, rg, 1, None, False,
                                    1 / math.sqrt(d), False, splits, buffers, (0.15, 0.7, 0.3, thresholds))


def scoring_variant(name, description, stage, *, config=None, **call):
    bm, bn, warps, stages = config or (SCORING_STAGE1 if stage == 1 else SCORING_STAGE2 if stage == 2
                                       else (0, 0, 4, 1))

    def build(arch):
        from dar.kernels import scoring

        args, const = scoring_arguments(**call)[stage - 1]
        fn = (scoring._row_lse_kernel, scoring._key_mass_kernel, scoring._weights_kernel)[stage - 1]
        fn = fn.fn if hasattr(fn, "configs") else fn  # the autotuned stages: their JIT function
        if stage < 3:
            const = dict(const, BLOCK_M=bm, BLOCK_N=bn)
        return fn, args, const

    keys = bn if stage < 3 else scoring_keys_per_program()
    return register(Variant(name, description, build, warps, stages, keys, None))


def scoring_keys_per_program() -> int:
    from dar.kernels import scoring

    return scoring.WEIGHTS_BLOCK


scoring_variant("score-1-row_lse", "scoring stage 1 (row log-sum-exp, one key split), 64 samples x 24 heads", 1)
scoring_variant("score-2-key_mass", "scoring stage 2 (key mass over 24 KV heads, lse combine, group span)", 2)
scoring_variant("score-2-key_mass-gqa", "scoring stage 2, GQA 24/8 heads (3 x 64 packed rows per KV head)", 2,
                hk=8)
scoring_variant("score-3-weights", "scoring stage 3 (normalise + thresholds, 1024 keys per program; no MMA)", 3)


def _yardstick_build(arch):
    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor

    sys.path.insert(0, str(HERE))
    import flash_yardstick

    bm, bn, _, _ = ATTN_CONFIG
    rows = 2 * 24 * L_PLAIN
    t = torch.empty(rows, 128, dtype=torch.bfloat16, device="meta")
    desc = lambda block: TensorDescriptor(t, [rows, 128], [128, 1], [block, 128])  # noqa: E731
    args = dict(desc_q=desc(bm), desc_k=desc(bn), desc_v=desc(bn), desc_o=desc(bm), qk_scale=0.1, seq_len=L_PLAIN)
    return flash_yardstick.flash_forward, args, dict(HEAD_DIM=128, BLOCK_M=bm, BLOCK_N=bn)


register(Variant("yardstick", "standard TMA flash-attention forward (benchmarks/flash_yardstick.py), L 16384",
                 _yardstick_build, ATTN_CONFIG[2], ATTN_CONFIG[3], ATTN_CONFIG[1]))


# ------------------------------------------------------------------------------------------------
# Compiling and reporting
# ------------------------------------------------------------------------------------------------


def compile_variant(v: Variant, arch: int) -> dict:
    from dar.kernels import aot

    fn, args, const = v.build(arch)
    sig, const, attrs = aot.specialise(fn, args, const)
    kernel = aot.compile_for(fn, arch, const, sig, attrs, num_warps=v.num_warps, num_stages=v.num_stages, **v.options)
    a = aot.analyse(kernel)
    loops = a.pop("loops")
    a.pop("sass")
    main = (v.loop or (lambda ls: max(ls, key=lambda lp: lp.instructions) if ls else None))(loops)
    scale = 64 / v.keys_per_iteration
    row = {"variant": v.name, "description": v.description, "arch": aot.arch_name(arch),
           "num_warps": v.num_warps, "num_stages": v.num_stages, "keys_per_iteration": v.keys_per_iteration,
           **{k: a[k] for k in ("registers", "spill_stores", "spill_loads", "local_bytes", "stack_bytes",
                                "shared_bytes", "total_instructions", "wgmma_serialized", "ptxas_notes")},
           "mma_loops": [lp.instructions for lp in loops], "loop": None}
    if main is not None:
        s = main.summary()
        row["loop"] = {**s, "per_64_keys": round(s["instructions"] * scale, 1)}
    return row


def sass_of(v: Variant, arch: int) -> str:
    """The variant's full SASS text (for reading by hand: ``--sass DIR``)."""
    from dar.kernels import aot

    fn, args, const = v.build(arch)
    sig, const, attrs = aot.specialise(fn, args, const)
    return aot.analyse(aot.compile_for(fn, arch, const, sig, attrs, num_warps=v.num_warps,
                                       num_stages=v.num_stages, **v.options))["sass"]


def supported_archs(candidates=ARCHS) -> tuple[list[int], dict[int, str]]:
    """Targets for which the installed Triton compiles a trivial kernel and its nvdisasm reads the
    result, and why the others fail."""
    from dar.kernels import aot

    probe = aot.arch_probe

    ok, bad = [], {}
    for arch in candidates:
        try:
            sig, const, attrs = aot.specialise(probe, {"x": _meta_f32()}, {"BLOCK": 32})
            aot.analyse(aot.compile_for(probe, arch, const, sig, attrs, num_warps=1, num_stages=1))
            ok.append(arch)
        except Exception as exc:  # noqa: BLE001 - any failure means "not supported here"
            bad[arch] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ''}"
    return ok, bad


def _meta_f32():
    import torch

    return torch.empty(32, dtype=torch.float32, device="meta")


def run(variants: list[Variant], archs: list[int]) -> dict:
    import torch
    import triton

    rows, errors = [], []
    for arch in archs:
        for v in variants:
            try:
                rows.append(compile_variant(v, arch))
            except Exception as exc:  # noqa: BLE001 - recorded, and the run goes on
                errors.append({"variant": v.name, "arch": arch, "error": f"{type(exc).__name__}: {exc}"[:2000]})
    by = {(r["arch"], r["variant"]): r for r in rows}
    for r in rows:
        base = next((v.baseline for v in variants if v.name == r["variant"]), None)
        b = by.get((r["arch"], base))
        if b and b["loop"] and r["loop"]:
            r["loop_vs_baseline"] = {"baseline": base, "ratio": round(r["loop"]["instructions"] /
                                                                     b["loop"]["instructions"] *
                                                                     b["keys_per_iteration"] /
                                                                     r["keys_per_iteration"], 3)}
    from dar.kernels import aot

    return {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": _commit(), "triton": triton.__version__, "torch": torch.__version__,
            "ptxas": {aot.arch_name(a): _version(aot.ptxas_path(a)) for a in archs},
            "results": rows, "errors": errors}


def _version(tool: str) -> str:
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, check=True).stdout
        return out.strip().splitlines()[-1]
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "benchmarks/flash_yardstick.py"],
                               cwd=HERE.parent, capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(report: dict) -> str:
    lines = [f"# Static report: compiled kernels, no GPU (Triton {report['triton']}, torch {report['torch']}, "
             f"commit {report['commit']})", "",
             "Read from the cubin Triton builds for each target (`benchmarks/static_report.py`). *loop*: SASS "
             "instructions per thread per 64 keys in the main loop (the innermost loop holding tensor-core "
             "instructions); *MMA*: its tensor-core instructions (HGMMA on sm_90a, UTC*MMA on sm_100+, HMMA "
             "on sm_120); *x base*: that against the variant's baseline at the same tile; the instruction "
             "columns count the main loop per iteration; registers, spills (STL) and shared memory are the "
             "kernel's; *wgmma serialised*: ptxas's C7515 note (every wgmma waited on at once). Not a timing.", ""]
    for arch in dict.fromkeys(r["arch"] for r in report["results"]):
        lines += [f"## {arch} (ptxas: {report['ptxas'].get(arch, '?')})", "",
                  "| variant | config | loop / 64 keys | x base | MMA | UTMALDG | LDGSTS | LDG | FSEL | MUFU | "
                  "MMA loops | registers | spills | shared KiB | wgmma serialised |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in report["results"] if r["arch"] == arch):
            lp = r["loop"] or {}
            ratio = r.get("loop_vs_baseline", {}).get("ratio")
            cfg = f"{r['keys_per_iteration']} keys/iter, {r['num_warps']}w/{r['num_stages']}s"
            lines.append(
                f"| {r['variant']} ({r['description']}) | {cfg} | {lp.get('per_64_keys', '-')} | "
                f"{'-' if ratio is None else f'{ratio:.2f}x'} | {lp.get('mma', '-')} | {lp.get('utmaldg', '-')} | "
                f"{lp.get('ldgsts', '-')} | {lp.get('ldg', '-')} | {lp.get('fsel', '-')} | {lp.get('mufu', '-')} | "
                f"{len(r['mma_loops'])} | {r['registers']} | {r['spill_stores']} | {r['shared_bytes'] / 1024:.1f} | "
                f"{ {True: 'YES', False: 'no'}.get(r.get('wgmma_serialized'), '-') } |")
        lines.append("")
    if report["errors"]:
        lines += ["## Variants that did not compile", ""]
        lines += [f"- {e['variant']} on sm_{e['arch']}: {e['error'].splitlines()[0][:300]}" for e in report["errors"]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="static_report", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--arch", type=int, action="append", help="compute capability x10 (repeatable; default: "
                   "90 and every newer one the installed Triton compiles)")
    p.add_argument("--variant", action="append", help="variant name or shell pattern (repeatable; default all)")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder (default benchmarks/results)")
    p.add_argument("--print", action="store_true", help="print the Markdown instead of writing files")
    p.add_argument("--sass", type=Path, help="also write each variant's SASS into this folder")
    p.add_argument("--list", action="store_true", help="list the variants")
    args = p.parse_args(argv)
    if args.list:
        for v in VARIANTS:
            print(f"{v.name:<26} {v.description}")
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("static_report: unset TRITON_INTERPRET (the interpreter replaces the compiled kernels)", file=sys.stderr)
        return 2
    from dar.kernels import aot

    missing = aot.tools_available()
    if missing:
        print(f"static_report: {missing}", file=sys.stderr)
        return 2
    chosen = [v for v in VARIANTS if not args.variant or any(fnmatch.fnmatch(v.name, pat) for pat in args.variant)]
    if not chosen:
        print(f"static_report: no variant matches {args.variant}", file=sys.stderr)
        return 2
    archs, unsupported = supported_archs(args.arch or ARCHS)
    for arch, why in unsupported.items():
        print(f"static_report: sm_{arch} skipped, this Triton does not compile for it ({why})", file=sys.stderr)
    report = run(chosen, archs)
    report["unsupported_targets"] = {f"sm_{a}": why for a, why in unsupported.items()}
    text = markdown(report)
    if args.sass:
        args.sass.mkdir(parents=True, exist_ok=True)
        for arch in archs:
            for v in chosen:
                (args.sass / f"{v.name}-sm{arch}.sass").write_text(sass_of(v, arch))
    if args.print:
        print(text)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"static-triton-{report['triton']}"
        Path(f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
        Path(f"{stem}.md").write_text(text + "\n")
        print(f"wrote {stem}.json and {stem}.md")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
