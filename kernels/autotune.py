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
# was compiled for its architecture with Triton's ahead-of-time compiler (`compile_report` below;
# bf16, key weights + key bias + masked tail, causal and not): no register spills and shared memory
# within the limit (227 KiB sm90, 163 KiB sm80; sm86/sm89 have 99 KiB and the autotuner drops
# entries that do not fit). sm90, Triton 3.8.0: 128x128 tiles need 8 warps (with 4 they spill, 56-1032
# B); (128, 128, 8, 3) at D=128 uses exactly the 227 KiB. Warp-specialised loops
# (`tl.range(warp_specialize=True)`, 4 warps) do not compile with the kernel's rank-4 TMA
# descriptors in Triton 3.8.0 (its NVGPUWarpSpecialization pass fails: "descriptor block and tensor
# must have the same number of elements"), so the table has none; a config may set
# WARP_SPECIALIZE (a fifth entry, True) once Triton accepts it. Not yet timed on hardware.
_SM90 = {
    64: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)],
    256: [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)],
}
# sm8x runs the pointer path (one loop, masked throughout when needed), checked causal + prob_scale +
# key bias with Triton 3.8.0: 128x64 tiles at D=128 and 128x32 at D=256 spill there (16-112 B).
_SM80 = {
    64: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 2)],
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
            "DESC_KW": nargs["BLOCK_N"]}
    for name, r in rows.items():
        desc = nargs.get(name)
        if desc is None:  # DESC_KW: only key_scale calls have K'
            continue
        desc.block_shape = [1, 1, r, desc.block_shape[-1]]


def _config(bm, bn, warps, stages, ws=False) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "WARP_SPECIALIZE": ws}, num_warps=warps, num_stages=stages,
                         pre_hook=set_descriptor_blocks)


def shape_of(config: triton.Config) -> tuple:
    """A config as its table entry ``(BLOCK_M, BLOCK_N, num_warps, num_stages[, True])``."""
    s = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)
    return s + (True,) if config.kwargs.get("WARP_SPECIALIZE") else s


INTERPRETER_CONFIG = _config(32, 16, 4, 1)

AUTOTUNE_KEY = ["HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL", "LQ_BUCKET", "LK_BUCKET"]


def head_dim_class(block_d: int) -> int:
    """The table row of a padded head dim: 64 (<= 64), 128 (<= 128) or 256."""
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def seq_bucket(n: int) -> int:
    """Sequence-length bucket for the autotune key: the next power of two, clamped to [64, 32768]."""
    return min(max(triton.next_power_of_2(n), 64), 32768)


@functools.lru_cache(maxsize=None)
def candidate_configs(capability: tuple[int, int] | None) -> list[triton.Config]:
    """Every configuration that may be tried on a GPU of this compute capability (None: interpreter)."""
    if capability is None:
        return [INTERPRETER_CONFIG]
    table = _SM90 if capability[0] == 9 else _SM80 if capability[0] == 8 else _DEFAULT
    shapes = {s for rows in table.values() for s in rows} | set(_FP32)
    return [_config(*s) for s in sorted(shapes, key=lambda s: (*s[:4], len(s)), reverse=True)]


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
        kept = [c for c in configs if shape_of(c) in wanted]
        # Short query sequences waste most of a 128-row tile: prefer the 64-row ones when any is left.
        if lq <= 64:
            small = [c for c in kept if c.kwargs["BLOCK_M"] <= 64]
            kept = small or kept
        return kept or configs[-1:]

    return prune


def compile_report(capability: tuple[int, int], dtype: str, head_dim: int, config: tuple,
                   *, causal: bool = False, weights: bool = True, prob_scale: bool = False,
                   key_bias: bool = True) -> dict:
    """Compile the attention kernel ahead of time for a GPU that need not be present and report
    ``{"registers", "spill_bytes", "shared_bytes"}`` of the cubin Triton builds (with the ptxas
    Triton itself picks for the architecture; see `aot`).

    This is how the tables above were checked. ``dtype`` is "fp16", "bf16" or "fp32";
    ``config`` is a table entry ``(BLOCK_M, BLOCK_N, num_warps, num_stages[, warp_specialize])``.
    The call is a contiguous ``(2, 4, 1000, head_dim)`` one (Lk = 1000 is no multiple of BLOCK_N,
    so the masked tail is compiled in; on sm90+ it loads through TMA descriptors, as the op would).
    Needs ``TRITON_INTERPRET`` unset (the interpreter replaces the kernel with a Python function).
    """
    import torch

    from . import aot, attention

    if attention.INTERPRETED:
        raise RuntimeError("compile_report needs TRITON_INTERPRET unset")
    bm, bn, warps, stages, *ws = config
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    q = torch.empty(2, 4, 1000, head_dim, dtype=dt, device="meta")
    w = torch.empty(2, 1000, device="meta") if weights else None
    gen = torch.empty(2, 1, 2, dtype=torch.int32, device="meta") if weights else None
    bias = torch.empty(2, 1000, device="meta") if key_bias else None
    args, const = attention.kernel_arguments(q, q, q, w, gen, bias, causal, 0.1,
                                             "prob_scale" if prob_scale else "key_scale", torch.empty_like(q),
                                             capability=capability)
    const.update(BLOCK_M=bm, BLOCK_N=bn, WARP_SPECIALIZE=bool(ws and ws[0]))
    const["MASK_KEYS"] = attention.mask_keys({**args, **const})
    set_descriptor_blocks({**args, **const})
    fn = attention._rebalanced_attention_fwd
    sig, const, attrs = aot.specialise(fn, args, const)
    report = aot.analyse(aot.compile_for(fn, capability[0] * 10 + capability[1], const, sig, attrs,
                                         num_warps=warps, num_stages=stages))
    return {"registers": report["registers"], "spill_bytes": report["local_bytes"] + report["stack_bytes"],
            "shared_bytes": report["shared_bytes"]}
