"""Autotuning tables of the scoring kernels (dar.kernels.scoring), per GPU generation.

Both scoring kernels tile (packed sampled rows) x (keys): BLOCK_M rows of ``Hq/Hk * m`` (typically
64-384), BLOCK_N keys. Every candidate of every table is registered with ``triton.autotune``;
`prune` keeps the ones of the running GPU's table (Hopper sm90, Ampere sm80/86/89, anything else),
head-dim class and dtype, then drops those whose tiles cannot fit its shared memory. The cache key is
the head dim, GQA group, a power-of-two length bucket and (added by Triton) the tensor dtypes.

Under ``TRITON_INTERPRET=1`` there is a single configuration, so the interpreter never benchmarks.
These tables are educated guesses that have not been benchmarked on a GPU yet.
"""

from __future__ import annotations

import functools

import torch
import triton

Tile = tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, num_warps, num_stages); every block dim >= 16 for tl.dot

# Per head-dim class (padded head dim <= 64, <= 128, <= 256), 16-bit inputs. Stage 1 streams keys
# past a resident Q tile; stage 2 keeps a K tile resident and streams Q tiles, so it favours wide N.
ROW_LSE = {
    "sm90": {64: [(64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
             128: [(64, 128, 4, 3), (128, 64, 8, 3), (64, 64, 4, 4), (128, 128, 8, 2)],
             256: [(64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2)]},
    "sm80": {64: [(64, 128, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)],
             128: [(64, 64, 4, 3), (64, 128, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3)],
             256: [(64, 32, 4, 2), (32, 64, 4, 2), (64, 64, 8, 1)]},
    "other": {64: [(64, 64, 4, 2)], 128: [(64, 64, 4, 2), (64, 32, 4, 2)], 256: [(32, 32, 4, 1)]},
}
KEY_MASS = {
    "sm90": {64: [(64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
             128: [(64, 128, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (128, 64, 8, 3)],
             256: [(64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2)]},
    "sm80": {64: [(64, 128, 4, 3), (64, 64, 4, 3), (128, 64, 8, 2)],
             128: [(64, 64, 4, 3), (64, 128, 8, 2), (32, 64, 4, 3)],
             256: [(32, 64, 4, 2), (64, 32, 4, 2), (64, 64, 8, 1)]},
    "other": {64: [(64, 64, 4, 2)], 128: [(64, 64, 4, 2), (32, 64, 4, 2)], 256: [(32, 32, 4, 1)]},
}
# fp32 inputs take exact ("ieee") dots on CUDA cores: register-hungry, so small tiles on every GPU.
FP32: list[Tile] = [(32, 64, 4, 2), (64, 32, 4, 2), (16, 64, 4, 2), (16, 32, 4, 1)]

# 64 packed rows x 16 keys: few Python-level iterations in the interpreter, yet the test sizes
# (Lk and Hq/Hk * m up to 48 and 192) still span several tiles in both directions.
INTERPRETER: Tile = (64, 16, 1, 1)


def _config(tile: Tile) -> triton.Config:
    bm, bn, warps, stages = tile
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def _tile(config: triton.Config) -> Tile:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _capped(tile: Tile, max_stages: int | None) -> Tile:
    return tile if max_stages is None else (*tile[:3], min(tile[3], max_stages))


def configs(table: dict, interpreting: bool, max_stages: int | None = None) -> list[triton.Config]:
    """Every candidate of ``table`` (deduplicated), or the interpreter's single config. ``max_stages``
    caps num_stages (stage 2 on Triton 3.2, whose pipeliner cannot compile its loop with 3)."""
    if interpreting:
        return [_config(INTERPRETER)]
    tiles = {t for per_dim in table.values() for tiles in per_dim.values() for t in tiles} | set(FP32)
    return [_config(t) for t in sorted({_capped(t, max_stages) for t in tiles})]


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return "sm90" if major == 9 else "sm80" if major == 8 else "other"


@functools.lru_cache(maxsize=None)
def _shared_memory(index: int) -> int:
    try:
        return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    except Exception:  # unknown driver: the Ampere figure
        return 163 * 1024


def prune(table: dict, max_stages: int | None = None):
    """An ``early_config_prune`` for ``triton.autotune`` that selects from ``table`` (ROW_LSE or KEY_MASS),
    num_stages capped as in `configs`."""

    def keep(configs, named_args, **kwargs):
        if len(configs) <= 1:
            return configs
        q = named_args["Q"]
        bd = kwargs["BLOCK_D"]
        if q.dtype == torch.float32:
            wanted = set(FP32)
        else:
            wanted = set(table[_arch(q.device)][64 if bd <= 64 else 128 if bd <= 128 else 256])
        wanted = {_capped(t, max_stages) for t in wanted}
        limit = _shared_memory(q.device.index or 0)
        item = q.element_size()
        # One resident tile plus num_stages buffers of the streamed one, all BLOCK_D wide.
        fits = [c for c in configs if _tile(c) in wanted
                and (c.kwargs["BLOCK_M"] + c.num_stages * c.kwargs["BLOCK_N"]) * bd * item <= limit]
        return fits or [_config((16, 32, 4, 1))]

    return keep
