"""`DARCall`: one validated `dar_attention` / `compute_key_weights` call, as backends receive it."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from .config import DARConfig
from .layout import TokenLayout, resolve_layouts
from .masks import MaskSpec, make_mask_spec
from .plan import DARPlan, make_plan
from .scalars import as_real

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True)
class DARCall:
    """Everything a backend needs. ``v`` is None for `compute_key_weights`."""

    kind: ClassVar[str] = "dense"  # the call kind backends declare capabilities for (dar.backends.base)
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor | None
    layouts: tuple[TokenLayout, ...]
    cfg: DARConfig
    mask: MaskSpec
    scale: float
    plan: DARPlan

    @property
    def groups_per_kv(self) -> int:
        return self.q.shape[1] // self.k.shape[1]


def _check_tensor(name: str, t, dims: int = 4, form: str = "(B, H, L, D) like SDPA") -> None:
    """``t`` is a float tensor of ``dims`` dims; shared with the packed API (3-D, flash-attn's form)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D {form}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_heads_and_kinds(q, k, v, d: int, dk: int, hq: int, hk: int) -> None:
    """Head dims and counts (GQA) agree; k and v share q's dtype and device. Shared with the varlen API."""
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
    _check_tensor("q", q)
    _check_tensor("k", k)
    if v is not None:
        _check_tensor("v", v)
    cfg = resolve_config(cfg)
    b, hq, lq, d = q.shape
    _, hk, lk, dk = k.shape
    if k.shape[0] != b:
        raise ValueError(f"q and k batch sizes differ: {b} vs {k.shape[0]}")
    check_heads_and_kinds(q, k, v, d, dk, hq, hk)
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
