"""`ring_attention`: DAR for one K/V shard of a ring, returning the log-sum-exp the ring merges with.

A ring (diffusers' `TemplatedRingAttention`, for one) attends a rank's queries to one K/V shard at a
time and merges the partial results with their log-sum-exps. DAR changes only the logits of the
rebalanced rows (``s * w`` or ``s + ln w``), so each shard can be attended with its own key weights and
the ring's merge is exact: the merged output is the softmax over every key of the rebalanced logits.

The shard's rows are attended in contiguous row ranges, each through a fused SDPA kernel that also
returns the log-sum-exp (``aten._scaled_dot_product_flash_attention_for_cpu`` on the CPU,
``aten._scaled_dot_product_efficient_attention`` on CUDA); the key mask and ``ln w`` travel as a
``(B, 1, 1, Lc)`` bias, so nothing ``Lq x Lc`` is built.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .call import check_tensors, resolve_scale
from .config import MODES
from .delegate import row_pieces, scaled_keys

_NEG_INF = float("-inf")


def _sdpa_lse(q, k, v, bias, scale: float):
    """(out (B, Hq, L, Dv), lse (B, Hq, L)) of softmax(scale q k^T + bias) v; bias (B, Lc) float or None."""
    b, hq, lq, d = q.shape
    hk, dv = k.shape[1], v.shape[-1]
    g = hq // hk
    if g > 1:  # the query heads of one KV head become rows of that head: no copy of K or V
        q = q.reshape(b, hk, g * lq, d)
    width = max(d, dv)
    if d < width:  # the fused kernels take one head dim for q, k and v; zero columns change nothing
        q, k = F.pad(q, (0, width - d)), F.pad(k, (0, width - d))
    vv = F.pad(v, (0, width - dv)) if dv < width else v
    rows = q.shape[2]
    if q.device.type == "cpu":
        mask = None if bias is None else bias[:, None, None, :].to(torch.float64 if q.dtype == torch.float64
                                                                   else torch.float32)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, vv, 0.0, False, attn_mask=mask,
                                                                               scale=scale)
    elif q.device.type == "cuda":
        mask = None
        if bias is not None:
            # The efficient kernel wants the bias in q's dtype, its rows 16-element aligned; a broadcast view.
            lc = k.shape[2]
            mask = F.pad(bias.to(q.dtype), (0, -lc % 16))[:, None, None, :lc].expand(b, q.shape[1], rows, lc)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, vv, mask, True, 0.0, False,
                                                                           scale=scale)[:2]
        lse = lse[..., :rows]
    else:
        raise ValueError(f"dar.ring_attention runs on CPU and CUDA tensors, got {q.device}")
    out = out[..., :dv]
    if g > 1:
        out, lse = out.reshape(b, hq, lq, dv), lse.reshape(b, hq, lq)
    return out, lse


@functools.lru_cache(maxsize=256)
def _index(members: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The batch rows ``members`` as a device index, built once (not a host-to-device copy per call)."""
    return torch.tensor(members, device=device)


def _row_ranges(rows, batch: int, lq: int) -> list[tuple]:
    if rows is None:
        return [((0, lq),)] * batch
    if isinstance(rows, tuple) and all(isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], int) for r in rows):
        return [rows] * batch  # one set of ranges for the whole batch
    rows = list(rows)
    if len(rows) != batch:
        raise ValueError(f"rows must be one tuple of (start, end) ranges or B={batch} of them, got {len(rows)}")
    for r in rows:
        for s, e in r:
            if not 0 <= s < e <= lq:
                raise ValueError(f"rows range {(s, e)} does not fit Lq={lq}")
    return [tuple(tuple(x) for x in r) for r in rows]


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor | None = None,
                   rows=None, *, mode: str = "key_scale", scale: float | None = None,
                   key_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DAR attention of ``q`` to one K/V shard of a ring; returns ``(out, lse)`` for the ring's merge.

    Args:
        q: ``(B, Hq, Lq, D)``; k, v: ``(B, Hk, Lc, D)`` and ``(B, Hk, Lc, Dv)``, ``Hq % Hk == 0``.
        weights: ``(B, Lc)`` float32 DAR weights of this shard's keys (`dar.compute_key_weights`), or
            None for plain attention.
        rows: the rebalanced query rows as host ``(start, end)`` ranges: one tuple for the batch, or a
            list of B tuples; None means every row.
        mode: ``"key_scale"`` (logits ``s * w``) or ``"prob_scale"`` (``s + ln w``).
        scale: softmax scale, default ``1 / sqrt(D)``.
        key_bias: ``(B or 1, Lc)`` additive float bias of the shard's keys (``-inf`` = masked), or None.

    Returns:
        ``out (B, Hq, Lq, Dv)`` in q's dtype and ``lse (B, Hq, Lq)`` float32 (float64 for float64
        ``q``), the log-sum-exp of the shard's logits as rebalanced. A batch row whose keys in this
        shard are all masked gets ``out = 0`` and ``lse = -inf``.
    """
    if not isinstance(v, torch.Tensor):  # (None would mean a weights-only call to the shared checks)
        raise TypeError(f"v must be a torch.Tensor, got {type(v).__name__}")
    check_tensors(q, k, v, packed=False)  # the checks every entry point makes (dtypes, devices, GQA heads)
    b, hq, lq, d = q.shape
    hk, lc = k.shape[1], k.shape[2]
    if k.shape[0] != b or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} are not (B, Hq, Lq, D), "
                         f"(B, Hk, Lc, D), (B, Hk, Lc, Dv)")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if weights is not None and tuple(weights.shape) != (b, lc):
        raise ValueError(f"weights must have shape (B, Lc) = ({b}, {lc}), got {tuple(weights.shape)}")
    if key_bias is not None and (key_bias.dim() != 2 or key_bias.shape[-1] != lc or key_bias.shape[0] not in (1, b)):
        raise ValueError(f"key_bias must have shape (B or 1, Lc) = ({b}, {lc}), got {tuple(key_bias.shape)}")
    scale = resolve_scale("scale", scale, d)
    bias = None if key_bias is None else key_bias.float().expand(b, lc)
    ranges = _row_ranges(rows, b, lq) if weights is not None else [()] * b
    by_rows: dict[tuple, list[int]] = {}
    for i, r in enumerate(ranges):
        by_rows.setdefault(r, []).append(i)
    out = lse = None
    for r, members in by_rows.items():
        whole = len(members) == b
        idx = None if whole else _index(tuple(members), q.device)

        def pick(t):
            return t if t is None or whole else t.index_select(0, idx)

        qb, kb, vb, wb, bb = pick(q), pick(k), pick(v), pick(weights), pick(bias)
        outs, lses = [], []
        for s, e, rebalanced in row_pieces(r, lq):
            kk, bias_p = kb, bb
            if rebalanced and mode == "key_scale":
                kk = scaled_keys(kb, wb)  # K' = w ⊙ K rounded once; w itself is never rounded
            elif rebalanced:
                log_w = torch.log(wb.double() if q.dtype == torch.float64 else wb)
                bias_p = log_w if bb is None else bb + log_w
            o, lg = _sdpa_lse(qb[:, :, s:e], kk, vb, bias_p, scale)
            outs.append(o)
            lses.append(lg)
        o = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        lg = torch.cat(lses, dim=2) if len(lses) > 1 else lses[0]
        if whole:
            out, lse = o, lg
            break
        if out is None:
            out = q.new_empty(b, hq, lq, v.shape[-1])
            lse = torch.empty(b, hq, lq, dtype=lg.dtype, device=q.device)
        out.index_copy_(0, idx, o.to(out.dtype))
        lse.index_copy_(0, idx, lg)
    if bias is not None:
        # The kernels report lse = 0 (not -inf) for a row with no allowed key: say -inf, output 0.
        empty = ~(bias > _NEG_INF).any(dim=-1)  # (B,)
        lse = torch.where(empty[:, None, None], torch.full_like(lse, _NEG_INF), lse)
        out = torch.where(empty[:, None, None, None], torch.zeros_like(out), out)
    return out.to(q.dtype), lse
