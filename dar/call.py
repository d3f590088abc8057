"""`DARCall`: one validated DAR call, dense or packed, as backends receive it; built and validated here.

A dense call (`dar_attention`, `compute_key_weights`) holds SDPA's ``(B, H, L, D)`` tensors. A packed
call (`dar_attention_varlen`, `compute_key_weights_varlen`) holds flash-attn's ``(total, H, D)``
tensors and its `Packing`: sequence ``n`` owns the query rows ``[cu_seqlens_q[n], cu_seqlens_q[n + 1])``
of ``q`` and the key rows ``[cu_seqlens_k[n], cu_seqlens_k[n + 1])`` of ``k`` / ``v``, each
`TokenLayout` relative to its own sequence's start. The plan of a packed call is the batch plan of
its N sequences with ``Lq = max_seqlen_q`` and ``Lk = max_seqlen_k`` (`dar.plan.make_plan`):
per-sequence sampled query indices, reference ranges and rebalanced query ranges relative to the
sequence start; a kernel adds ``cu_seqlens_*[n]`` to reach the packed row. ``queries="all"`` is the
range ``(0, max_seqlen_q)``, which covers every row of every sequence.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .config import DARConfig
from .layout import TokenLayout, resolve_layouts
from .masks import MaskSpec, make_mask_spec
from .plan import DARPlan, make_plan
from .scalars import as_int, as_real

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True)
class Packing:
    """How a packed call's rows split into sequences (``flash_attn_varlen_func``'s conventions).

    ``lengths``: per sequence ``(Lq_n, Lk_n)`` read from ``cu_seqlens_*`` when they live on the CPU
    (free to read), else None: on a GPU, reading them would synchronise with the device.
    """

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    lengths: tuple[tuple[int, int], ...] | None

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens_q.shape[0] - 1


@dataclasses.dataclass(frozen=True)
class DARCall:
    """Everything a backend needs. ``v`` is None for a weights-only call.

    ``packing`` is None for a dense call. For a packed one it says where the sequences lie; its
    ``mask`` has no tensor, and ``mask.is_causal`` is flash-attn's bottom-right rule per sequence
    (query ``i`` attends key ``j`` iff ``j <= i + Lk_n - Lq_n``), over ``batch = N`` sequences of at
    most ``max_seqlen_q`` x ``max_seqlen_k`` tokens.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor | None
    layouts: tuple[TokenLayout, ...]
    cfg: DARConfig
    mask: MaskSpec
    scale: float
    plan: DARPlan
    packing: Packing | None = None

    @property
    def kind(self) -> str:
        """The call kind backends declare capabilities for (`dar.backends.base.CALL_KINDS`)."""
        return "dense" if self.packing is None else "packed"

    @property
    def groups_per_kv(self) -> int:
        return self.q.shape[1] // self.k.shape[1]


DENSE_FORMS = ("(B, H, L, D) like SDPA",) * 3
PACKED_FORMS = tuple(f"{form} like flash_attn_varlen_func"
                     for form in ("(total_q, Hq, D)", "(total_k, Hk, D)", "(total_k, Hk, Dv)"))


def _check_tensor(name: str, t, dims: int = 4, form: str = DENSE_FORMS[0]) -> None:
    """``t`` is a float tensor of ``dims`` dims (4 for a dense call, 3 for a packed one)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D {form}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_tensors(q, k, v, packed: bool) -> None:
    """q, k and v (None for a weights-only call) are float tensors of the call's form (`DENSE_FORMS` or
    `PACKED_FORMS`) whose head dims and counts (GQA) agree, k and v sharing q's dtype and device."""
    dims, forms = (3, PACKED_FORMS) if packed else (4, DENSE_FORMS)
    for name, t, form in zip("qkv", (q, k, v), forms):
        if t is not None:
            _check_tensor(name, t, dims, form)
    (hq, d), (hk, dk) = (q.shape[1], q.shape[-1]), (k.shape[1], k.shape[-1])  # heads: dim 1 of both forms
    if dk != d:
        raise ValueError(f"q and k head dims differ: {d} vs {dk}")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"the number of query heads Hq={hq} must be a multiple of the number of key heads Hk={hk}")
    for name, t in (("k", k), ("v", v)):
        if t is None:
            continue
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; they must match")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


def resolve_scale(name: str, scale, d: int) -> float:
    """The softmax scale argument ``name``: None means ``1 / sqrt(d)``; else a finite non-zero real."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    scale = as_real(name, scale)  # numpy / 0-d tensor scalars too; never a bool
    if scale == 0:
        raise ValueError(f"{name} must be finite and non-zero, got {scale!r}")
    return scale


def planned_call(q, k, v, cfg: DARConfig, scale: float, plan: DARPlan, mask=None, is_causal: bool = False,
                 layouts=()) -> DARCall:
    """A call on tensors derived from a validated call (the packed API's padded frame, a rank's gathered
    keys, a binding's shard), with the plan already mapped to their coordinates: no re-validation.
    The one place, besides `make_call`, where a `DARCall` is built."""
    spec = MaskSpec(mask, is_causal, q.shape[0], q.shape[2], k.shape[2])
    return DARCall(q, k, v, tuple(layouts), cfg, spec, float(scale), plan)


def resolve_config(cfg, name: str = "cfg") -> DARConfig:
    """The config argument ``name``: None means ``DARConfig()``; else it must be a `DARConfig`."""
    if cfg is None:
        return DARConfig()
    if not isinstance(cfg, DARConfig):
        raise TypeError(f"{name} must be a dar.DARConfig or None, got {type(cfg).__name__}")
    return cfg


def unit_weights(*shape: int, device) -> torch.Tensor:
    """All-ones float32 key weights: what an inactive plan (nothing to rebalance) returns."""
    return torch.ones(*shape, dtype=torch.float32, device=device)


def with_weights(out: torch.Tensor, w: torch.Tensor | None, return_weights: bool, keys: tuple[int, ...]):
    """The entry points' result: ``out``, or ``(out, w)`` with all-ones weights of shape ``keys`` when
    nothing was rebalanced (``w`` None)."""
    if not return_weights:
        return out
    return out, (unit_weights(*keys, device=out.device) if w is None else w)


def check_return_weights(return_weights) -> None:
    if not isinstance(return_weights, bool):
        raise TypeError(f"return_weights must be a bool, got {type(return_weights).__name__}")


def _transpose_hint(exc: ValueError, layout, q: torch.Tensor, k: torch.Tensor) -> ValueError:
    """The layout error, plus a hint when the layout would fit q and k read as (B, L, H, D) (the layout
    diffusers and flash-attn use), the commonest way to get here."""
    try:
        resolve_layouts(layout, q.shape[0], q.shape[1], k.shape[1])
    except (ValueError, TypeError):
        return exc
    return ValueError(f"{exc}. The layout fits dim 1 of q and k instead: did you pass (B, L, H, D) tensors? "
                      f"dar_attention takes SDPA's (B, H, L, D): transpose(1, 2) first")


def make_call(q, k, v, layout, cfg, attn_mask, scale, is_causal, lengths: tuple[int, int] | None = None) -> DARCall:
    """Validate the public arguments (raising ValueError/TypeError that name them) and plan the batch.

    ``lengths``: the global ``(Lq, Lk)`` the layout refers to when q and k hold a shard of the tokens
    (`dar.parallel`); by default q's and k's own lengths.
    """
    check_tensors(q, k, v, packed=False)
    cfg = resolve_config(cfg)
    b, hq, lq, d = q.shape
    _, hk, lk, dk = k.shape
    if k.shape[0] != b:
        raise ValueError(f"q and k batch sizes differ: {b} vs {k.shape[0]}")
    if v is not None and (v.shape[0] != b or v.shape[1] != hk or v.shape[2] != lk):
        raise ValueError(f"v must have shape (B, Hk, Lk, Dv) = ({b}, {hk}, {lk}, Dv), got {tuple(v.shape)}")
    if min(b, hq, lq, lk, d) == 0:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must not have zero-sized dims")
    scale = resolve_scale("scale", scale, d)
    mask = make_mask_spec(attn_mask, is_causal, q, lk)
    if lengths is not None:
        lq, lk = lengths
    try:
        layouts = resolve_layouts(layout, b, lq, lk)
    except ValueError as exc:
        raise _transpose_hint(exc, layout, q, k) from None
    plan = make_plan(layouts, lq, lk, cfg)
    return DARCall(q, k, v, layouts, cfg, mask, scale, plan)


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


def make_packed_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layouts, cfg,
                     softmax_scale, causal) -> DARCall:
    """Validate the packed (varlen) API's arguments (errors name them) and plan the sequences.

    Ranges are checked against ``max_seqlen_*`` always, and against each sequence's own length when
    ``cu_seqlens_*`` are CPU tensors. On a GPU the per-sequence check would read ``cu_seqlens``
    back (a host synchronisation), so there the caller guarantees, as for flash-attn, that
    ``cu_seqlens`` and ``max_seqlen_*`` are consistent and that each layout fits its sequence.
    """
    check_tensors(q, k, v, packed=True)
    cfg = resolve_config(cfg)
    total_q, hq, d = q.shape
    total_k, hk, dk = k.shape
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
    packing = Packing(cu_seqlens_q, cu_seqlens_k, max_q, max_k, lengths)
    return DARCall(q, k, v, lays, cfg, MaskSpec(None, causal, n, max_q, max_k), scale, plan, packing)
