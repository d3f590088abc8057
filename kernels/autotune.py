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
# of the sm90 and sm80 tables is checked by compiling it for its architecture with Triton's
# ahead-of-time compiler (`compile_report.table_report`; bf16, key weights + key bias + masked tail,
# causal and not): no register spills and shared memory within the limit (227 KiB sm90, 163 KiB sm80;
# sm86/sm89 have 99 KiB and the autotuner drops entries that do not fit). `python -m
# dar.kernels.compile_report` writes the figures of that check for the installed Triton to
# benchmarks/results/tables-triton-<version>.md (docs/kernels.md). Not yet timed on hardware.
#
# sm90 with TMA descriptors (Triton >= 3.4): 128x128 tiles need 8 warps (with 4 they spill).
_SM90 = {
    64: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)],
    256: [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)],
}
# sm90 on the pointer path: a Triton without host descriptors (3.2, 3.3), or tensors whose strides
# a descriptor cannot take. Pointer loads keep more addresses in registers than TMA, so the tiles
# are the sm80 table's.
_SM90_POINTERS = {
    64: [(128, 32, 8, 2), (64, 32, 4, 2)],
    128: [(128, 32, 8, 3), (128, 32, 8, 2), (64, 32, 4, 2)],
    256: [(64, 32, 8, 2), (64, 16, 8, 2), (32, 16, 4, 2)],
}
# sm8x runs the pointer path (one loop, masked throughout when needed); 128x64 tiles at D=128 and
# 128x32 at D=256 spill there; at D=64, 128x64 spills with Triton 3.4 and 64x64 with 3.2 and 3.4.
_SM80 = {
    64: [(128, 32, 8, 2), (64, 32, 4, 2)],
    128: [(128, 32, 8, 3), (128, 32, 8, 2), (64, 32, 4, 2)],
    256: [(64, 32, 8, 2), (64, 16, 8, 2), (32, 16, 4, 2)],
}
_DEFAULT = {
    64: [(64, 64, 4, 2)],
    128: [(64, 64, 4, 2), (64, 32, 4, 2)],
    256: [(64, 32, 8, 2), (32, 32, 4, 2)],
}
# fp32 operands use exact (non-tf32) dots, which need many more registers: small tiles only.
_FP32 = [(64, 32, 8, 2), (32, 32, 4, 2), (64, 16, 8, 2)]

def set_descriptor_blocks(nargs: dict) -> None:
    """Config pre-hook: give the TMA descriptors (when the call uses them) the tile of the chosen
    config; a descriptor's block is fixed when it is built, before the autotuner has chosen."""
    if nargs.get("DESC_Q") is None:
        return
    rows = {"DESC_Q": nargs["BLOCK_M"], "DESC_K": nargs["BLOCK_N"], "DESC_V": nargs["BLOCK_N"],
            "DESC_KW": nargs["BLOCK_N"], "DESC_VW": nargs["BLOCK_N"]}
    for name, r in rows.items():
        desc = nargs.get(name)
        if desc is None:  # only key_scale calls have K' (DESC_KW), prob_scale V' (DESC_VW)
            continue
        desc.block_shape = [1, 1, r, desc.block_shape[-1]]


def _config(bm, bn, warps, stages) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages,
                         pre_hook=set_descriptor_blocks)


def shape_of(config: triton.Config) -> tuple:
    """A config as its table entry ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``."""
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


INTERPRETER_CONFIG = _config(32, 16, 4, 1)

AUTOTUNE_KEY = ["HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL", "LQ_BUCKET", "LK_BUCKET"]


def head_dim_class(block_d: int) -> int:
    """The table row of a padded head dim: 64 (<= 64), 128 (<= 128) or 256."""
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def seq_bucket(n: int) -> int:
    """Sequence-length bucket for the autotune key: the next power of two, clamped to [64, 32768]."""
    return min(max(triton.next_power_of_2(n), 64), 32768)


def table(capability: tuple[int, int], use_tma: bool) -> dict:
    """The table of a GPU of this compute capability, for the TMA or the pointer path."""
    if capability[0] == 9:
        return _SM90 if use_tma else _SM90_POINTERS
    return _SM80 if capability[0] == 8 else _DEFAULT


@functools.lru_cache(maxsize=None)
def candidate_configs(capability: tuple[int, int] | None) -> list[triton.Config]:
    """Every configuration that may be tried on a GPU of this compute capability (None: interpreter):
    the entries of both its tables (TMA and pointer path; the call's path picks in `prune_for`)."""
    if capability is None:
        return [INTERPRETER_CONFIG]
    shapes = {s for t in (table(capability, True), table(capability, False)) for rows in t.values() for s in rows}
    return [_config(*s) for s in sorted(shapes | set(_FP32), reverse=True)]


def prune_for(capability: tuple[int, int] | None):
    """An ``early_config_prune`` that keeps the table row of the call's path, head dim and dtype."""

    def prune(configs, named_args, **kwargs):
        if capability is None:
            return configs
        args = {**named_args, **kwargs}
        q = args["Q"]
        if q.dtype.itemsize == 4:
            wanted = set(_FP32)
        else:
            rows = table(capability, bool(args["USE_TMA"]))
            wanted = set(rows[head_dim_class(max(args["BLOCK_D"], args["BLOCK_DV"]))])
        lq = args["Lq"]
        kept = [c for c in configs if shape_of(c) in wanted]
        # Short query sequences waste most of a 128-row tile: prefer the 64-row ones when any is left.
        if lq <= 64:
            small = [c for c in kept if c.kwargs["BLOCK_M"] <= 64]
            kept = small or kept
        return kept or configs[-1:]

    return prune
