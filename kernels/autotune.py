"""Autotuning tables for the rebalanced attention kernel.

Candidates depend on the GPU generation (Hopper sm90, Ampere sm80/sm86/sm89, anything else) and
on the padded head dim; the autotuner then keys its cache on head dim, value head dim, causality,
the query / key sequence-length buckets and (added by Triton itself) the dtypes of the tensor
arguments. Under ``TRITON_INTERPRET=1`` there is exactly one small configuration, so the CPU
interpreter never benchmarks.

Every block dim is >= 16, the smallest ``tl.dot`` operand Triton accepts.
"""

from __future__ import annotations

import functools

import triton

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded-head-dim class, preferred first. Every entry
# was compiled for its architecture with Triton's ahead-of-time compiler and checked with
# `ptxas -v` (`compile_report` below; bf16, key weights + key bias + key masking, non-causal): no
# register spills and shared memory within the limit (227 KiB sm90, 163 KiB sm80; sm86/sm89 have
# 99 KiB and the autotuner drops entries that do not fit). Causal masking adds registers: sm90
# (128, 128, 8, 2) at D=128 spills 252 B causal, so it is not the preferred entry; the preferred
# D=128 entries are checked causal by tests/test_triton_attention.py. Not yet timed on hardware.
_SM90 = {
    64: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3)],
    256: [(128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
}
_SM80 = {
    64: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 2)],
    128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
    256: [(128, 32, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2)],
}
_DEFAULT = {
    64: [(64, 64, 4, 2)],
    128: [(64, 64, 4, 2), (64, 32, 4, 2)],
    256: [(64, 32, 8, 2), (32, 32, 4, 2)],
}
# fp32 operands use exact (non-tf32) dots, which need many more registers: small tiles only.
_FP32 = [(64, 32, 8, 2), (32, 32, 4, 2), (64, 16, 8, 2)]

INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)

AUTOTUNE_KEY = ["HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL", "LQ_BUCKET", "LK_BUCKET"]


def head_dim_class(block_d: int) -> int:
    """The table row of a padded head dim: 64 (<= 64), 128 (<= 128) or 256."""
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def seq_bucket(n: int) -> int:
    """Sequence-length bucket for the autotune key: the next power of two, clamped to [64, 32768]."""
    return min(max(triton.next_power_of_2(n), 64), 32768)


def _config(bm, bn, warps, stages) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


@functools.lru_cache(maxsize=None)
def candidate_configs(capability: tuple[int, int] | None) -> list[triton.Config]:
    """Every configuration that may be tried on a GPU of this compute capability (None: interpreter)."""
    if capability is None:
        return [INTERPRETER_CONFIG]
    table = _SM90 if capability[0] == 9 else _SM80 if capability[0] == 8 else _DEFAULT
    shapes = {s for rows in table.values() for s in rows} | set(_FP32)
    return [_config(*s) for s in sorted(shapes, reverse=True)]


def prune_for(capability: tuple[int, int] | None):
    """An ``early_config_prune`` that keeps the table row of the call's head dim and dtype."""
    table = _SM90 if capability and capability[0] == 9 else _SM80 if capability and capability[0] == 8 else _DEFAULT

    def prune(configs, named_args, **kwargs):
        if capability is None:
            return configs
        args = {**named_args, **kwargs}
        q = args["Q"]
        if q.dtype.itemsize == 4:
            wanted = set(_FP32)
        else:
            wanted = set(table[head_dim_class(max(args["BLOCK_D"], args["BLOCK_DV"]))])
        lq = args["Lq"]
        kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]
        # Short query sequences waste most of a 128-row tile: prefer the 64-row ones when any is left.
        if lq <= 64:
            small = [c for c in kept if c.kwargs["BLOCK_M"] <= 64]
            kept = small or kept
        return kept or configs[-1:]

    return prune


def compile_report(capability: tuple[int, int], dtype: str, head_dim: int, config: tuple[int, int, int, int],
                   *, causal: bool = False, weights: bool = True, prob_scale: bool = False,
                   key_bias: bool = True) -> dict:
    """Compile the attention kernel ahead of time for a GPU that need not be present and report
    ``{"registers", "spill_bytes", "shared_bytes"}`` from ``ptxas -v``.

    This is how the tables above were checked. ``dtype`` is "fp16", "bf16" or "fp32";
    ``config`` is ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``. Strides get the specialisations
    the launcher gives contiguous inputs (unit head-dim stride, 16-divisible others). Needs
    ``TRITON_INTERPRET`` unset (the interpreter replaces the kernel with a Python function).
    """
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import attention

    if attention.INTERPRETED:
        raise RuntimeError("compile_report needs TRITON_INTERPRET unset")
    fn = attention._rebalanced_attention_fwd
    bm, bn, warps, stages = config
    block_d = max(16, triton.next_power_of_2(head_dim))
    const = dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim, BLOCK_D=block_d, BLOCK_DV=block_d, IS_CAUSAL=causal,
                 HAS_W=weights, PROB_SCALE=prob_scale, HAS_BIAS=key_bias, DOT_F32=False,
                 DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", BLOCK_M=bm, BLOCK_N=bn, MASK_KEYS=True,
                 stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1, stride_biasn=1)
    pointer = {"Q": dtype, "K": dtype, "V": dtype, "Out": dtype, "W": "fp32", "GEN": "i32", "BIAS": "fp32"}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name in pointer:
            sig[name] = "*" + pointer[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "qk_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", capability[0] * 10 + capability[1], 32),
                            options=dict(num_warps=warps, num_stages=stages))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    arch = f"sm_{capability[0]}{capability[1]}" + ("a" if capability[0] == 9 else "")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(kernel.asm["ptx"])
        log = subprocess.run([ptxas, "-v", f"-arch={arch}", src, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    return {"registers": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spill_bytes": int(re.search(r"(\d+) bytes spill stores", log).group(1)),
            "shared_bytes": int(kernel.metadata.shared)}
