"""`VarlenCall`: one validated packed (varlen) DAR call, as the varlen backends receive it.

Packed tensors follow ``flash_attn_varlen_func``: sequence ``n`` owns the query rows
``[cu_seqlens_q[n], cu_seqlens_q[n + 1])`` of ``q`` and the key rows ``[cu_seqlens_k[n],
cu_seqlens_k[n + 1])`` of ``k`` / ``v``. Each sequence's `TokenLayout` is relative to its own start.

The plan is the batch plan of the N sequences with ``Lq = max_seqlen_q`` and ``Lk = max_seqlen_k``
(`dar.plan.make_plan`): per-sequence sampled query indices, reference ranges and rebalanced query
ranges, all relative to the sequence start, as small int32 tensors. A kernel adds
``cu_seqlens_*[n]`` to reach the packed row. ``queries="all"`` is the range ``(0, max_seqlen_q)``,
which covers every row of every sequence.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..call import _check_tensor, check_heads_and_kinds, resolve_config, resolve_scale
from ..config import DARConfig
from ..layout import TokenLayout, resolve_layouts
from ..plan import DARPlan, make_plan
from ..scalars import as_int


@dataclasses.dataclass(frozen=True)
class VarlenCall:
    """Everything a varlen backend needs. ``v`` is None for `compute_key_weights_varlen`.

    ``lengths``: per sequence ``(Lq_n, Lk_n)`` read from ``cu_seqlens_*`` when they live on the CPU
    (free to read), else None: on a GPU, reading them would synchronise with the device.
    """

    kind: ClassVar[str] = "packed"  # the call kind backends declare capabilities for (dar.backends.base)
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor | None
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    layouts: tuple[TokenLayout, ...]
    cfg: DARConfig
    scale: float
    causal: bool
    plan: DARPlan
    lengths: tuple[tuple[int, int], ...] | None

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens_q.shape[0] - 1

    @property
    def groups_per_kv(self) -> int:
        return self.q.shape[1] // self.k.shape[1]


def _check_cu(name: str, cu, device: torch.device) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 tensor (as flash_attn_varlen_func takes), got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D of length N + 1 >= 2 (N sequences), got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")


def _check_max(name: str, value) -> int:
    value = as_int(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _host_lengths(cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, total_k: int, max_q: int, max_k: int,
                  layouts: tuple[TokenLayout, ...]) -> tuple[tuple[int, int], ...]:
    """Check ``cu_seqlens_*`` values and each layout against its own sequence (CPU tensors only)."""
    lengths = []
    for name, cu, total, mx in (("cu_seqlens_q", cu_q, total_q, max_q), ("cu_seqlens_k", cu_k, total_k, max_k)):
        vals = cu.tolist()
        if vals[0] != 0:
            raise ValueError(f"{name}[0] must be 0, got {vals[0]}")
        lens = [b - a for a, b in zip(vals, vals[1:])]
        if min(lens) < 0:
            raise ValueError(f"{name} must be non-decreasing, got {vals}")
        if vals[-1] != total:
            raise ValueError(f"{name}[-1] = {vals[-1]} must equal the number of packed rows {total}")
        if max(lens) > mx:
            which = "max_seqlen_q" if name.endswith("q") else "max_seqlen_k"
            raise ValueError(f"{which} = {mx} is smaller than the longest sequence in {name} ({max(lens)})")
        lengths.append(lens)
    for i, (lay, lq, lk) in enumerate(zip(layouts, *lengths)):
        lay.check_bounds(lq, lk, where=f"layouts[{i}]")
    return tuple(zip(*lengths))


def make_varlen_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layouts, cfg,
                     softmax_scale, causal) -> VarlenCall:
    """Validate the public arguments (errors name them) and plan the sequences.

    Ranges are checked against ``max_seqlen_*`` always, and against each sequence's own length when
    ``cu_seqlens_*`` are CPU tensors. On a GPU the per-sequence check would read ``cu_seqlens``
    back (a host synchronisation), so there the caller guarantees, as for flash-attn, that
    ``cu_seqlens`` and ``max_seqlen_*`` are consistent and that each layout fits its sequence.
    """
    _check_tensor("q", q, 3, "(total_q, Hq, D) like flash_attn_varlen_func")
    _check_tensor("k", k, 3, "(total_k, Hk, D) like flash_attn_varlen_func")
    if v is not None:
        _check_tensor("v", v, 3, "(total_k, Hk, Dv) like flash_attn_varlen_func")
    cfg = resolve_config(cfg)
    total_q, hq, d = q.shape
    total_k, hk, dk = k.shape
    check_heads_and_kinds(q, k, v, d, dk, hq, hk)
    if d == 0:
        raise ValueError(f"q {tuple(q.shape)} must have a non-zero head dim")
    if v is not None and (v.shape[0] != total_k or v.shape[1] != hk or v.shape[2] == 0):
        raise ValueError(f"v must have shape (total_k, Hk, Dv) = ({total_k}, {hk}, Dv > 0), got {tuple(v.shape)}")
    _check_cu("cu_seqlens_q", cu_seqlens_q, q.device)
    _check_cu("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both have N + 1 entries, got "
                         f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}")
    max_q = _check_max("max_seqlen_q", max_seqlen_q)
    max_k = _check_max("max_seqlen_k", max_seqlen_k)
    scale = resolve_scale("softmax_scale", softmax_scale, d)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    n = cu_seqlens_q.shape[0] - 1
    lays = resolve_layouts(layouts, n, max_q, max_k, "layouts", f"cu_seqlens_q describes N = {n} sequences")
    lengths = None
    if cu_seqlens_q.device.type == "cpu" and not torch.compiler.is_compiling():
        lengths = _host_lengths(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_q, max_k, lays)
    plan = make_plan(lays, max_q, max_k, cfg)
    return VarlenCall(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, lays, cfg, scale,
                      causal, plan, lengths)
