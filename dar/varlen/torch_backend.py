"""The varlen torch backend: packed DAR without a per-sequence loop and without host synchronisation.

The N sequences are gathered into padded ``(N, H, L, D)`` tensors with index tensors computed on the
device from ``cu_seqlens`` and the host ints ``max_seqlen_*``; the padded problem is then exactly
the dense one: the scoring is `dar.scoring`'s, and the attention is the dense torch backend's
(`dar.delegate` with SDPA as the kernel, so SDPA's fused kernels run it; any device, autograd). The
result is gathered back to the packed rows. Nothing ``Lq x Lk`` is built.

Frames (where sequence ``n``'s rows sit in the padded tensors):

- not causal: query ``i`` at row ``i``, key ``j`` at column ``j``; padded keys are removed with a
  ``(N, 1, 1, Lk)`` key-padding mask.
- causal (flash-attn's bottom-right rule ``j <= i + Lk_n - Lq_n``): query ``i`` at row
  ``p = i + Lk_n - Lq_n`` of a square ``max_seqlen_k`` frame, key ``j`` at column ``j``. SDPA's
  top-left rule ``j <= p`` is then exactly the bottom-right rule, and the padding keys
  (``j >= Lk_n > p``) are never reachable, so no mask tensor is needed. Queries with ``p < 0`` have
  no allowed key and output zeros.
"""

from __future__ import annotations

import torch

from .. import delegate, scoring
from ..call import DARCall, planned_call
from ..masks import as_bias



class _Frame:
    """Device index tensors mapping packed rows to the padded frame (no host reads)."""

    def __init__(self, call: DARCall):
        dev = call.q.device
        cu_q = call.packing.cu_seqlens_q.long()
        cu_k = call.packing.cu_seqlens_k.long()
        self.len_q = cu_q[1:] - cu_q[:-1]  # (N,)
        self.len_k = cu_k[1:] - cu_k[:-1]
        self.cu_q, self.cu_k = cu_q, cu_k
        self.lk = call.packing.max_seqlen_k
        # Offset of query i in the padded frame: 0, or Lk_n - Lq_n under the causal rule.
        self.shift = (self.len_k - self.len_q) if call.mask.is_causal else torch.zeros_like(self.len_q)
        self.lq = call.packing.max_seqlen_k if call.mask.is_causal else call.packing.max_seqlen_q
        cols = torch.arange(self.lk, device=dev)
        self.key_valid = cols[None, :] < self.len_k[:, None]  # (N, Lk)
        self.key_index = (cu_k[:-1, None] + cols[None, :]).clamp_(0, max(call.k.shape[0] - 1, 0))
        rows = torch.arange(self.lq, device=dev)
        qi = rows[None, :] - self.shift[:, None]  # (N, Lq'): the query index i held by padded row p
        self.row_valid = (qi >= 0) & (qi < self.len_q[:, None])
        self.row_query = qi.clamp(min=0)
        self.row_index = (cu_q[:-1, None] + self.row_query).clamp_(0, max(call.q.shape[0] - 1, 0))
        # Packed row -> (sequence, padded row); searchsorted runs on the device.
        tq = torch.arange(call.q.shape[0], device=dev)
        self.seq_of_q = torch.searchsorted(cu_q[1:], tq, right=True).clamp_(max=max(call.packing.num_seqs - 1, 0))
        p = tq - cu_q[self.seq_of_q] + self.shift[self.seq_of_q]
        self.q_row = p.clamp(0, max(self.lq - 1, 0))
        self.q_has_key = (p >= 0) & (p < self.lq) & (self.len_k[self.seq_of_q] > 0)
        tk = torch.arange(call.k.shape[0], device=dev)
        self.seq_of_k = torch.searchsorted(cu_k[1:], tk, right=True).clamp_(max=max(call.packing.num_seqs - 1, 0))
        self.k_col = (tk - cu_k[self.seq_of_k]).clamp(0, max(self.lk - 1, 0))

    def keys(self, t: torch.Tensor) -> torch.Tensor:
        """(total_k, H, D) -> (N, H, Lk, D), padding columns zero (a permuted view)."""
        # The clamped index fills sequence n's padding columns with sequence n+1's rows; masked or not,
        # a NaN / inf there would reach sequence n (NaN logits, 0 * NaN in P @ V), so they are zeroed.
        return torch.where(self.key_valid[:, :, None, None], t[self.key_index], 0).permute(0, 2, 1, 3)

    def queries(self, t: torch.Tensor) -> torch.Tensor:
        """(total_q, H, D) -> (N, H, Lq', D); rows that hold no query are copies (discarded later)."""
        return t[self.row_index].permute(0, 2, 1, 3)

    def unpad_out(self, out: torch.Tensor) -> torch.Tensor:
        """(N, H, Lq', Dv) -> (total_q, H, Dv); queries without an allowed key get 0."""
        packed = out.permute(0, 2, 1, 3)[self.seq_of_q, self.q_row]
        return torch.where(self.q_has_key[:, None, None], packed, torch.zeros_like(packed))

    def unpad_keys(self, w: torch.Tensor) -> torch.Tensor:
        """(N, Lk) -> (total_k,)."""
        return w[self.seq_of_k, self.k_col]

    def dense_call(self, call: DARCall) -> DARCall:
        """The padded problem as a dense call: padded keys masked out (not causal), or SDPA's top-left
        causal rule on the square frame. Its plan is the packed call's (query coordinates)."""
        mask = None if call.mask.is_causal else self.key_valid[:, None, None, :]
        return planned_call(self.queries(call.q), self.keys(call.k), self.keys(call.v), call.cfg, call.scale,
                            call.plan, mask, call.mask.is_causal, call.layouts)

    def rows(self, call: DARCall, dense: DARCall) -> delegate.QueryRows:
        """The rebalanced rows in the padded frame. Not causal, row ``p`` is query ``p``: the plan's.
        Causal, sequence ``n``'s queries sit ``Lk_n - Lq_n`` rows down, an offset only the device knows:
        no shared ranges (unless every row is rebalanced), and the indicator gathered on the device."""
        rows = delegate.plan_rows(dense)
        if not call.mask.is_causal:
            return rows

        def indicator() -> torch.Tensor:
            on = call.plan.tensors(call.q.device).rebalanced_rows(max(call.packing.max_seqlen_q, 1))  # (N, max_seqlen_q)
            return on.gather(1, self.row_query.clamp(max=on.shape[1] - 1)) & self.row_valid  # (N, Lq')

        return delegate.QueryRows(((0, self.lq),) if rows.every else None, self.lq, indicator)


def _sampled_mass(call: DARCall, fr: _Frame) -> torch.Tensor:
    """(N, Lk) float32 attention mass of each sequence's sampled queries (steps 3-4)."""
    q, k = call.q, call.k
    lk = fr.lk
    pt = call.plan.tensors(q.device)
    s = pt.samples.long()  # (N, M) query index within the sequence, -1 = padding
    valid = (s >= 0) & (s < fr.len_q[:, None])
    s = s.clamp(min=0)
    rows = (fr.cu_q[:-1, None] + s).clamp_(0, max(q.shape[0] - 1, 0))
    qs = q[rows].permute(0, 2, 1, 3)  # (N, Hq, M, D)
    allowed = fr.key_valid[:, None, :]  # (N, 1 -> M, Lk)
    if call.mask.is_causal:
        cols = torch.arange(lk, device=q.device)
        allowed = allowed & (cols[None, None, :] <= (s + fr.len_k[:, None] - fr.len_q[:, None])[..., None])
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    bias = as_bias(allowed, acc)[:, None]
    return scoring.mass_of_rows(qs, fr.keys(k), bias, valid, call.scale)


def unsupported(call: DARCall, backend) -> str | None:
    """Why the torch backend ``backend`` (plain ``torch`` or ``torch:<SDPA kernel>``) cannot run the
    packed ``call``, or None. Head-dim limits of the padded frame's form are checked when it runs."""
    why = backend.device_refusal(call)
    if why is None and call.v is not None and not call.mask.is_causal and backend.sdp == "flash" \
            and call.q.device.type == "cuda":
        why = ("SDPA's CUDA flash kernel takes no attn_mask, and non-causal packed sequences run with a "
               "key-padding mask")
    return why


def key_weights(call: DARCall, backend=None, reduce_mass=None) -> torch.Tensor:
    """(total_k,) float32 key weights (steps 1-6), aligned with ``k``; no autograd graph.

    ``reduce_mass``: with the heads split over ranks, sums the ``(N, Lk)`` mass of this rank's heads
    over the group (`dar.collectives.all_reduce`) before the normalisation.
    """
    with torch.no_grad():
        fr = _Frame(call)
        mass = _sampled_mass(call, fr)
        if reduce_mass is not None:
            mass = reduce_mass(mass)
        pt = call.plan.tensors(call.q.device)
        w, _ = scoring.weights_from_mass(mass, pt.key_groups(fr.lk), fr.key_valid, call.plan.num_groups, call.cfg)
        return fr.unpad_keys(w)


def attention(call: DARCall, weights: torch.Tensor | None, backend) -> torch.Tensor:
    """(total_q, Hq, Dv) in q's dtype (step 7) on the padded frame, through the delegate kernel of the
    dense torch backend ``backend`` (SDPA, or one of its kernels)."""
    q, k, v = call.q, call.k, call.v
    if q.shape[0] == 0 or k.shape[0] == 0 or call.packing.max_seqlen_k == 0:
        return q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
    fr = _Frame(call)
    dense = fr.dense_call(call)
    kernel = backend.kernel(dense)
    if weights is None or not call.plan.active:
        return fr.unpad_out(delegate.plain(dense, kernel))
    rows = fr.rows(call, dense)
    why = delegate.unsupported(dense, kernel, rows)
    if why is not None:
        raise ValueError(f"backend={backend.name!r} cannot run these inputs: {why}")
    w = weights[fr.key_index].masked_fill(~fr.key_valid, 1.0)  # (N, Lk): padded keys weigh 1
    return fr.unpad_out(delegate.attention(dense, w, kernel, rows))
