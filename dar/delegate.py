"""Rebalanced attention through a plain-attention kernel: the delegate path.

Once the key weights ``w`` are known, DAR's rebalanced rows are plain attention on transformed
inputs (docs/semantics.md, step 7):

- ``key_scale``: plain attention over ``K' = w ⊙ K``;
- ``prob_scale``: plain attention with the additive key bias ``ln w``, or, for kernels that take no
  mask, with one extra head-dim column: ``q' = [q, 1]``, ``k' = [k, ln w / scale]``.

So DAR runs on any kernel computing ``softmax(scale * q kᵀ + mask) v`` — SDPA's kernels,
FlashAttention, cuDNN, SageAttention, a diffusers attention backend — at that kernel's speed plus
the scoring. `AttentionKernel` describes such a kernel (the callable and what it accepts);
`attention` runs one call through it. The rebalanced and the plain query rows take at most two
kernel calls (one when every row is rebalanced); a call the kernel cannot express is reported by
`unsupported` so the caller can fall back once, saying why. `QueryRows` says which query rows are
rebalanced: the call's plan by default, or the caller's own (the packed API's padded frame, where a
sequence's rows sit at an offset only the device knows).

Memory: ``K'`` is built in one pass (``w`` applied in float32, rounded once to k's dtype): a
transient ``B x Hk x Lk x D`` tensor, the size of ``k``. The one-call forms used for causal masks
or per-row layouts that differ across the batch add head-dim columns to q and k (and v for kernels
that need equal head dims), again ``O(B x H x L x D)``. Nothing here is ``Lq x Lk``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

from .call import DARCall
from .kernels.shared import scaled_keys

__all__ = ["AttentionKernel", "QueryRows", "as_kernel", "attention", "plain", "plan_rows", "row_pieces",
           "scaled_keys", "unsupported"]


@dataclasses.dataclass(frozen=True)
class AttentionKernel:
    """A plain-attention kernel DAR can delegate to, and what it accepts.

    fn: ``fn(q, k, v, attn_mask=None, scale=None, is_causal=False) -> out`` with SDPA's layout and
        meaning: ``q (B, Hq, Lq, D)``, ``k (B, Hk, Lk, D)``, ``v (B, Hk, Lk, Dv)`` (any strides,
        ``Hq`` a multiple of ``Hk``), ``out (B, Hq, Lq, Dv)``. DAR always passes ``scale``, and a
        positive one (a negative scale is folded into ``q``).
    name: used in messages.
    takes_bias: the kernel adds a float ``attn_mask`` broadcastable to ``(B, Hq, Lq, Lk)`` to the
        logits. Then ``prob_scale`` uses the key bias ``ln w``; otherwise an extra head-dim column.
        (The caller's own mask is always passed through as given.)
    head_dim_multiple: head dims DAR widens (the ``prob_scale`` column, the causal ``key_scale``
        form) are zero-padded to a multiple of this (8 for FlashAttention / cuDNN).
    max_head_dim: the largest head dim the kernel runs, or None.
    same_head_dims: q, k and v must share one head dim (FlashAttention; also what keeps SDPA on its
        CPU flash kernel): when DAR widens q and k it zero-pads v to match and drops those columns.
    upcast: run the rebalanced attention of bfloat16 / float16 inputs in float32 (for kernels that
        are as fast in float32, like SDPA on CPU). Otherwise ``K'`` is rounded to the input dtype,
        which perturbs the logits (bound in docs/semantics.md, "Numerical notes").
    """

    fn: Callable[..., torch.Tensor]
    name: str = "attention_fn"
    takes_bias: bool = True
    head_dim_multiple: int = 1
    max_head_dim: int | None = None
    same_head_dims: bool = False
    upcast: bool = False

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"AttentionKernel.fn must be callable, got {type(self.fn).__name__}")
        if isinstance(self.head_dim_multiple, bool) or not isinstance(self.head_dim_multiple, int) \
                or self.head_dim_multiple < 1:
            raise ValueError(f"AttentionKernel.head_dim_multiple must be an int >= 1, got {self.head_dim_multiple!r}")
        if self.max_head_dim is not None and (isinstance(self.max_head_dim, bool) or not isinstance(
                self.max_head_dim, int) or self.max_head_dim < 1):
            raise ValueError(f"AttentionKernel.max_head_dim must be None or an int >= 1, got {self.max_head_dim!r}")


def as_kernel(attention_fn) -> AttentionKernel:
    """An `AttentionKernel` as given, or a bare callable taken to behave like SDPA (takes a bias,
    any head dims)."""
    if isinstance(attention_fn, AttentionKernel):
        return attention_fn
    if not callable(attention_fn):
        raise TypeError(f"attention_fn must be callable or a dar.AttentionKernel, got {type(attention_fn).__name__}")
    return AttentionKernel(attention_fn, name=getattr(attention_fn, "__name__", "attention_fn"))


# ---------------------------------------------------------------------------------------------
# Which rows are rebalanced, and which form a call takes


@dataclasses.dataclass(frozen=True)
class QueryRows:
    """The rebalanced query rows of a call, as the delegate forms need them.

    shared: the query ranges every rebalancing batch row has, as host ints (what a split into two
        kernel calls cuts along), or None when they differ across the batch.
    lq: the number of query rows of the call's q.
    indicator: returns the ``(B, Lq)`` bool of rebalanced rows on the device; only the one-call forms
        that mix rebalanced and plain rows call it.
    """

    shared: tuple[tuple[int, int], ...] | None
    lq: int
    indicator: Callable[[], torch.Tensor]

    @property
    def every(self) -> bool:
        return self.shared == ((0, self.lq),)


def _shared_rows(call: DARCall):
    """The rebalanced query ranges every rebalancing batch row shares, or None when they differ.

    A batch row that rebalances nothing has all weights 1, so either path gives it the same result
    and it follows the others.
    """
    shared = None
    for ranges in call.plan.gen_ranges:
        if not ranges:
            continue
        if shared is None:
            shared = ranges
        elif ranges != shared:
            return None
    return shared


def plan_rows(call: DARCall) -> QueryRows:
    """The rows the call's plan rebalances (its ``gen`` ranges, or every row for ``queries="all"``)."""
    lq = call.plan.lq
    return QueryRows(_shared_rows(call), lq, lambda: call.plan.tensors(call.q.device).rebalanced_rows(lq))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _form(call: DARCall, kernel: AttentionKernel, rows: QueryRows) -> tuple[str, int]:
    """(form, widened head dim) for an active call.

    Forms: ``keys`` (one call on K'), ``keys_split`` (rebalanced rows on K', plain rows on K),
    ``keys_fused`` (one call, ``q' = [q·r, q·(1-r)]``, ``k' = [K', K]``), ``bias`` (one call, key
    bias ln w), ``bias_split``, ``column`` (one call, ``q' = [q, r]``, ``k' = [k, ln w / scale]``),
    with r the row indicator.
    """
    every_row = rows.every
    causal = call.mask.is_causal
    d, dv = call.q.shape[-1], call.v.shape[-1]
    if call.cfg.mode == "key_scale":
        if every_row:
            return "keys", d
        if rows.shared is not None and not causal:
            return "keys_split", d
        width = 2 * d
        form = "keys_fused"
    else:
        # A causal bias would be Lq x Lk, a row split breaks the positional causal rule, and ln w added
        # to a mask that varies over query rows would be a new Lq x Lk tensor: the column form carries
        # ln w there and passes the caller's mask and is_causal as they are.
        mask = call.mask.mask
        per_row_mask = mask is not None and mask.size(2) > 1
        if kernel.takes_bias and not causal and not per_row_mask and rows.shared is not None:
            return ("bias" if every_row else "bias_split"), d
        width = d + 1
        form = "column"
    if kernel.same_head_dims:
        width = max(width, dv)
    return form, _round_up(width, kernel.head_dim_multiple)


def unsupported(call: DARCall, kernel: AttentionKernel, rows: QueryRows | None = None) -> str | None:
    """Why ``kernel`` cannot run this call's rebalanced attention, or None when it can.

    ``rows``: the rebalanced rows when they are not the plan's (`QueryRows`).
    """
    if not call.plan.active:
        return None
    form, width = _form(call, kernel, plan_rows(call) if rows is None else rows)
    if kernel.max_head_dim is not None and width > kernel.max_head_dim:
        what = ("the causal / per-row key_scale form doubles the head dim" if form == "keys_fused"
                else "prob_scale without an additive mask needs one more head-dim column")
        return (f"{kernel.name} runs head dims up to {kernel.max_head_dim}, and {what} "
                f"(D={call.q.shape[-1]} -> {width})")
    return None


# ---------------------------------------------------------------------------------------------
# Building blocks


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _log_weights(call: DARCall, w: torch.Tensor) -> torch.Tensor:
    """(B, Lk) ln w in float32, or float64 for float64 inputs (exact to the tests' 1e-10)."""
    return torch.log(w.to(_acc(call.q.dtype)))


def _rows(t: torch.Tensor, ranges) -> torch.Tensor:
    """Rows ``ranges`` of dim 2, concatenated (a view for one range)."""
    parts = [t[:, :, s:e] for s, e in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _mask_rows(mask, ranges):
    if mask is None or mask.size(2) == 1:
        return mask
    return _rows(mask, ranges)


def row_pieces(ranges, lq: int) -> list[tuple[int, int, bool]]:
    """``(start, end, rebalanced)`` pieces covering query rows ``[0, lq)`` in order: the rebalanced
    ``ranges`` (sorted, disjoint) and the plain rows between them. Shared with `dar.ring`."""
    pieces, cursor = [], 0
    for s, e in sorted(ranges):
        if cursor < s:
            pieces.append((cursor, s, False))
        pieces.append((s, e, True))
        cursor = e
    if cursor < lq:
        pieces.append((cursor, lq, False))
    return pieces


def _with_bias(mask, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The caller's mask (None, bool or float) plus the key bias ``bias (B, 1, 1, Lk)``, in ``dtype``."""
    if mask is None:
        return bias.to(dtype)
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, float("-inf")).to(dtype)  # a Python scalar: no host-to-device copy
    return (mask.to(bias.dtype) + bias).to(dtype)


def pad_columns(t: torch.Tensor, cols: list[torch.Tensor], width: int) -> torch.Tensor:
    """``t`` with ``cols`` appended to its head dim and zeros up to ``width`` columns."""
    cat = torch.cat([t, *cols], dim=-1) if cols else t
    pad = width - cat.shape[-1]
    return F.pad(cat, (0, pad)) if pad else cat


def _indicator(rows: QueryRows, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, Lq, 1): 1 on rebalanced query rows, 0 elsewhere."""
    return rows.indicator()[:, None, :, None].to(dtype)


def _signed(call: DARCall) -> tuple[torch.Tensor, float]:
    """(q, scale) with a positive scale: ``scale * <q, k> = |scale| * <-q, k>``.

    Kernels (SDPA's CPU path among them) can turn masked logits into NaN when scale < 0: they
    scale after masking, so -inf becomes +inf. Negating q is exact.
    """
    if call.scale < 0:
        return -call.q, -call.scale
    return call.q, call.scale


def _run(kernel: AttentionKernel, q, k, v, attn_mask, scale: float, is_causal: bool) -> torch.Tensor:
    """``kernel.fn`` on these inputs, its output checked against SDPA's contract: a tensor of shape
    ``(B, Hq, Lq, Dv)`` in q's dtype on q's device. Metadata only (no device read), once per kernel call:
    a kernel returning another layout (flash-attn's ``(B, L, H, D)``) would otherwise scramble rows
    silently when the rows are cut and put back."""
    out = kernel.fn(q, k, v, attn_mask=attn_mask, scale=scale, is_causal=is_causal)
    want = (q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"attention kernel {kernel.name!r} returned {type(out).__name__}; it must return one "
                        f"tensor of shape (B, Hq, Lq, Dv) = {want} (SDPA's layout)")
    if tuple(out.shape) != want or out.dtype != q.dtype or out.device != q.device:
        hint = ""
        if tuple(out.shape) == (want[0], want[2], want[1], want[3]) and want[1] != want[2]:
            hint = "; it looks like (B, Lq, Hq, Dv), flash-attn's layout: return out.transpose(1, 2)"
        raise ValueError(f"attention kernel {kernel.name!r} returned shape {tuple(out.shape)}, {out.dtype} on "
                         f"{out.device}; for q {tuple(q.shape)} it must return (B, Hq, Lq, Dv) = {want}, "
                         f"{q.dtype} on {q.device} (SDPA's layout and q's dtype){hint}")
    return out


def _split(kernel: AttentionKernel, q, v, scale: float, lq: int, rows, reb_args, plain_args) -> torch.Tensor:
    """Rebalanced rows in one kernel call, plain rows in another; outputs back in row order.

    ``reb_args`` / ``plain_args``: (k, mask) for each call; masks with a query dim are cut to the rows.
    """
    order = row_pieces(rows, lq)
    others = tuple((s, e) for s, e, reb in order if not reb)
    k_r, mask_r = reb_args
    k_p, mask_p = plain_args
    out_r = _run(kernel, _rows(q, rows), k_r, v, _mask_rows(mask_r, rows), scale, False)
    if not others:
        return out_r
    out_p = _run(kernel, _rows(q, others), k_p, v, _mask_rows(mask_p, others), scale, False)
    pieces, at_r, at_p = [], 0, 0
    for s, e, reb in order:
        n = e - s
        if reb:
            pieces.append(out_r[:, :, at_r:at_r + n])
            at_r += n
        else:
            pieces.append(out_p[:, :, at_p:at_p + n])
            at_p += n
    return torch.cat(pieces, dim=2)


# ---------------------------------------------------------------------------------------------
# Entry points


def plain(call: DARCall, kernel: AttentionKernel) -> torch.Tensor:
    """Plain attention of a call through ``kernel`` (scale made positive)."""
    q, scale = _signed(call)
    return _run(kernel, q, call.k, call.v, call.mask.mask, scale, call.mask.is_causal)


def attention(call: DARCall, weights: torch.Tensor | None, kernel: AttentionKernel,
              rows: QueryRows | None = None) -> torch.Tensor:
    """Step 7 of docs/semantics.md through ``kernel``; ``weights=None`` (or an inactive plan) is plain.

    ``rows``: the rebalanced query rows when they are not the plan's (`QueryRows`). Check
    `unsupported` first: a form the kernel cannot take raises inside the kernel.
    """
    if weights is None or not call.plan.active:
        return plain(call, kernel)
    q, scale = _signed(call)
    k, v, mask = call.k, call.v, call.mask.mask
    if kernel.upcast and q.dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    if rows is None:
        rows = plan_rows(call)
    form, width = _form(call, kernel, rows)
    dv = v.shape[-1]
    if form == "keys":
        out = _run(kernel, q, scaled_keys(k, weights), v, mask, scale, call.mask.is_causal)
    elif form == "keys_split":
        out = _split(kernel, q, v, scale, rows.lq, rows.shared, (scaled_keys(k, weights), mask), (k, mask))
    elif form in ("bias", "bias_split"):
        bias = _with_bias(mask, _log_weights(call, weights)[:, None, None, :], q.dtype)
        if form == "bias":
            out = _run(kernel, q, k, v, bias, scale, False)
        else:
            out = _split(kernel, q, v, scale, rows.lq, rows.shared, (k, bias), (k, mask))
    else:
        ind = _indicator(rows, q.dtype)
        if form == "keys_fused":
            q2 = pad_columns(q * ind, [q * (1 - ind)], width)
            k2 = pad_columns(scaled_keys(k, weights), [k], width)
        else:  # column: scale * <[q, r], [k, ln w / scale]> = scale * <q, k> + r * ln w
            col = (_log_weights(call, weights) / scale)[:, None, :, None]
            q2 = pad_columns(q, [ind.expand(*q.shape[:3], 1)], width)
            k2 = pad_columns(k, [col.to(k.dtype).expand(*k.shape[:3], 1)], width)
        v2 = pad_columns(v, [], width) if kernel.same_head_dims and dv < width else v
        out = _run(kernel, q2, k2, v2, mask, scale, call.mask.is_causal)
        if out.shape[-1] != dv:
            out = out[..., :dv]
    return out.to(call.q.dtype)
