"""The varlen oracle: `dar_attention` (reference backend) applied to each sequence on its own.

A literal transcription of the varlen definition (docs/semantics.md, "Packed sequences"): slice each
sequence out of the packed tensors, run the dense reference backend on it with flash-attn's
bottom-right causal rule as an explicit mask, and pack the results. Loops in Python and reads
``cu_seqlens`` on the host; slow by design.
"""

from __future__ import annotations

import torch

from ..call import DARCall, make_call, unit_weights


def bottom_right_causal(lq: int, lk: int, device) -> torch.Tensor:
    """(1, 1, Lq, Lk) bool: flash-attn's causal rule, query ``i`` may attend key ``j`` iff ``j <= i + Lk - Lq``."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return (j <= i + (lk - lq))[None, None]


def _sequences(call: DARCall):
    cq = call.packing.cu_seqlens_q.tolist()
    ck = call.packing.cu_seqlens_k.tolist()
    for n in range(call.packing.num_seqs):
        yield n, cq[n], cq[n + 1], ck[n], ck[n + 1]


def _dense_call(call: DARCall, n: int, q0: int, q1: int, k0: int, k1: int, with_v: bool):
    q = call.q[q0:q1].transpose(0, 1)[None]
    k = call.k[k0:k1].transpose(0, 1)[None]
    v = call.v[k0:k1].transpose(0, 1)[None] if with_v else None
    mask = bottom_right_causal(q1 - q0, k1 - k0, q.device) if call.mask.is_causal else None
    return make_call(q, k, v, call.layouts[n], call.cfg, mask, call.scale, False)


def unsupported(call: DARCall, dense) -> str | None:
    """The oracle runs every packed call."""
    return None


def key_weights(call: DARCall, dense) -> torch.Tensor:
    """``dense``: the dense reference backend, run on each sequence."""
    w = unit_weights(call.k.shape[0], device=call.q.device)
    for n, q0, q1, k0, k1 in _sequences(call):
        if q1 == q0 or k1 == k0:
            continue  # no query or no key: nothing to score, every weight 1
        one = _dense_call(call, n, q0, q1, k0, k1, False)
        if one.plan.active:
            w[k0:k1] = dense.key_weights(one)[0]
    return w


def attention(call: DARCall, weights: torch.Tensor | None, dense) -> torch.Tensor:
    q, v = call.q, call.v
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device=q.device)
    for n, q0, q1, k0, k1 in _sequences(call):
        if q1 == q0 or k1 == k0:
            continue  # a query row with no key outputs zeros
        one = _dense_call(call, n, q0, q1, k0, k1, True)
        w = weights[k0:k1][None] if weights is not None and one.plan.active else None
        out[q0:q1] = dense.attention(one, w)[0].transpose(0, 1)
    return out
