"""The torch backend: sampled-query scoring in plain torch, attention through SDPA.

Runs on any device and supports autograd. Never builds an ``Lq x Lk`` tensor: scoring touches
``m x Lk`` logits, and the rebalanced attention is expressed as SDPA on transformed K (and Q), so
FlashAttention / cuDNN / memory-efficient kernels are used wherever PyTorch has them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..call import DARCall
from .. import scoring
from .base import Backend


def sdpa(q, k, v, mask, is_causal: bool, scale: float) -> torch.Tensor:
    """SDPA with GQA and a float mask cast to q's dtype (SDPA requires the match)."""
    if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def _row_indicator(call: DARCall) -> torch.Tensor:
    """(B, 1, Lq, 1) float in q's dtype: 1 on rebalanced query rows, 0 elsewhere."""
    pt = call.plan.tensors(call.q.device)
    return pt.rebalanced_rows(call.plan.lq)[:, None, :, None].to(call.q.dtype)


def _pad_last(t: torch.Tensor, extra: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``extra`` columns to the head dim and zero-pad it to a multiple of 8."""
    cat = torch.cat([t, *extra], dim=-1)
    pad = -cat.shape[-1] % 8
    return F.pad(cat, (0, pad)) if pad else cat


def _prob_scale(call: DARCall, w: torch.Tensor) -> torch.Tensor:
    """logits + ln w on rebalanced rows, in one SDPA call.

    One extra head-dim column carries it: q gets the row indicator, k gets ``ln w / scale``, so
    ``scale * <q', k'> = scale * <q, k> + [row rebalanced] * ln w``. Masks and causality pass to
    SDPA untouched.
    """
    q, k, v = call.q, call.k, call.v
    ind = _row_indicator(call).expand(*q.shape[:3], 1)
    bias = (torch.log(w) / call.scale)[:, None, :, None].to(k.dtype).expand(*k.shape[:3], 1)
    return sdpa(_pad_last(q, [ind]), _pad_last(k, [bias]), v, call.mask.mask, call.mask.is_causal, call.scale)


def _key_scale_fused(call: DARCall, k_scaled: torch.Tensor) -> torch.Tensor:
    """``s * w`` on rebalanced rows, plain logits elsewhere, in one SDPA call of twice the head dim.

    q' = [q * ind, q * (1 - ind)], k' = [k * w, k]. Used where rows cannot be split (causal masks
    are positional), at the cost of a wider QK^T.
    """
    q = call.q
    ind = _row_indicator(call)
    q2 = torch.cat([q * ind, q * (1 - ind)], dim=-1)
    k2 = torch.cat([k_scaled, call.k], dim=-1)
    return sdpa(q2, k2, call.v, call.mask.mask, call.mask.is_causal, call.scale)


def _mask_rows(mask, batch_idx, s: int, e: int):
    if mask is None:
        return None
    if batch_idx is not None and mask.size(0) > 1:
        mask = mask.index_select(0, batch_idx)
    return mask[:, :, s:e] if mask.size(2) > 1 else mask


def _effective_ranges(plan) -> list[tuple]:
    """Rebalanced query ranges per batch row; a plain row (all weights 1) may use either path,
    so it joins the rows that rebalance everything."""
    return [r if r else ((0, plan.lq),) for r in plan.gen_ranges]


def _key_scale_split(call: DARCall, k_scaled: torch.Tensor) -> torch.Tensor:
    """``s * w`` on rebalanced rows via separate SDPA calls per contiguous row range.

    Batch rows that rebalance the same query ranges are run together; each range of query rows
    runs against either the scaled or the original keys.
    """
    q, k, v, plan = call.q, call.k, call.v, call.plan
    lq = plan.lq
    by_rows: dict[tuple, list[int]] = {}
    for b, ranges in enumerate(_effective_ranges(plan)):
        by_rows.setdefault(ranges, []).append(b)
    out = None
    for ranges, rows_b in by_rows.items():
        whole = len(rows_b) == q.shape[0]
        bidx = None if whole else torch.tensor(rows_b, device=q.device)
        pick = (lambda t: t) if whole else (lambda t: t.index_select(0, bidx))
        qb, kb, ksb, vb = pick(q), pick(k), pick(k_scaled), pick(v)
        pieces, cursor = [], 0
        for s, e in ranges:
            if cursor < s:
                pieces.append((cursor, s, False))
            pieces.append((s, e, True))
            cursor = e
        if cursor < lq:
            pieces.append((cursor, lq, False))
        parts = [
            sdpa(qb[:, :, s:e], ksb if reb else kb, vb, _mask_rows(call.mask.mask, bidx, s, e), False, call.scale)
            for s, e, reb in pieces
        ]
        res = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
        if whole:
            return res
        if out is None:
            out = q.new_empty(q.shape[:3] + (v.shape[-1],))
        out.index_copy_(0, bidx, res)
    return out


class TorchBackend(Backend):
    name = "torch"

    def key_weights(self, call: DARCall) -> torch.Tensor:
        return scoring.key_weights(call)

    def attention(self, call: DARCall, weights: torch.Tensor | None) -> torch.Tensor:
        q, k, v, mask = call.q, call.k, call.v, call.mask
        if weights is None or not call.plan.active:
            return sdpa(q, k, v, mask.mask, mask.is_causal, call.scale)
        if call.cfg.mode == "prob_scale":
            return _prob_scale(call, weights)
        k_scaled = k * weights[:, None, :, None].to(k.dtype)
        if all(r == ((0, call.plan.lq),) for r in _effective_ranges(call.plan)):
            return sdpa(q, k_scaled, v, mask.mask, mask.is_causal, call.scale)
        if mask.is_causal:
            return _key_scale_fused(call, k_scaled)
        return _key_scale_split(call, k_scaled)
