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

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded-head-dim class; the first entry is the
# preferred one, the others give the autotuner room when registers or shared memory run short.
_SM90 = {
    64: [(128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4)],
    128: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4)],
    256: [(128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)],
}
_SM80 = {
    64: [(128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    128: [(128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
    256: [(64, 64, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
}
_DEFAULT = {
    64: [(64, 64, 4, 2)],
    128: [(64, 64, 4, 2), (64, 32, 4, 2)],
    256: [(64, 32, 4, 1)],
}
# fp32 operands use exact (non-tf32) dots, which need many more registers: smaller tiles only.
_FP32 = [(64, 32, 4, 2), (32, 32, 4, 2)]

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
