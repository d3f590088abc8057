"""The oracle: docs/semantics.md transcribed literally, one batch row and one group at a time.

Materialises the full attention matrix in float32 (float64 for float64 inputs). Slow by design;
every other backend is tested against it.
"""

from __future__ import annotations

import math

import torch

from ..call import DARCall
from ..sampling import sampled_queries
from .base import Backend


def _compute_dtype(call: DARCall) -> torch.dtype:
    return torch.float64 if call.q.dtype == torch.float64 else torch.float32


def _logit_bias(call: DARCall, b: int) -> torch.Tensor:
    """(Hq, Lq, Lk) additive bias of batch row b: 0 where allowed, -inf where masked (or the float mask)."""
    _, hq, lq, _ = call.q.shape
    lk = call.k.shape[2]
    dt = _compute_dtype(call)
    bias = torch.zeros(hq, lq, lk, dtype=dt, device=call.q.device)
    m = call.mask
    if m.mask is not None:
        row = m.mask[b if m.mask.size(0) > 1 else 0].expand(hq, lq, lk)
        bias = bias.masked_fill(~row, -math.inf) if row.dtype == torch.bool else bias + row.to(dt)
    if m.is_causal:
        causal = torch.ones(lq, lk, dtype=torch.bool, device=call.q.device).tril()
        bias = bias.masked_fill(~causal, -math.inf)
    return bias


def _scores(call: DARCall, b: int) -> torch.Tensor:
    """(Hq, Lq, Lk): scale * q k^T for batch row b, K heads repeated for GQA (no mask)."""
    dt = _compute_dtype(call)
    q = call.q[b].to(dt)
    k = call.k[b].to(dt).repeat_interleave(call.groups_per_kv, dim=0)
    return call.scale * q @ k.transpose(-1, -2)


def _logits(call: DARCall, b: int) -> torch.Tensor:
    """(Hq, Lq, Lk): the model's own attention logits, mask applied."""
    return _scores(call, b) + _logit_bias(call, b)


def _softmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim in IEEE arithmetic (a NaN or +inf logit gives a NaN row, as SDPA's math
    kernel does); a row with no allowed key is all zeros."""
    p = torch.softmax(logits, dim=-1)
    return torch.where(allowed.any(dim=-1, keepdim=True), p, torch.zeros_like(p))


def _allowed(bias: torch.Tensor) -> torch.Tensor:
    """Allowed (query, key) pairs: every bias but -inf (NaN and +inf biases allow the key)."""
    return bias != -math.inf


def _row_weights(call: DARCall, b: int) -> torch.Tensor:
    cfg = call.cfg
    lay = call.layouts[b]
    lk = call.k.shape[2]
    w = torch.ones(lk, dtype=torch.float32, device=call.q.device)
    if cfg.gamma == 0:
        return w
    # Step 1: R = reference keys some query row may attend to.
    pair_ok = _allowed(_logit_bias(call, b))
    allowed = pair_ok.any(dim=0).any(dim=0)  # (Lk,)
    # Step 2: the sampled queries.
    samples = sampled_queries(lay.gen, cfg.num_samples, cfg.sampling, cfg.seed)
    if not samples or not lay.ref:
        return w
    # Steps 3-4: attention of the sampled queries, summed over heads and samples. A (head, row) with a
    # NaN or +inf logit on an allowed key contributes nothing; logits of other keys are ignored.
    rows = list(samples)
    logits, ok = _logits(call, b)[:, rows, :], pair_ok[:, rows, :]  # (Hq, m, Lk)
    logits = logits.masked_fill(~ok, -math.inf)
    # (a row whose allowed logits are all -inf has no probability to give either)
    clean = ~(logits.isnan() | (logits == math.inf)).any(dim=-1, keepdim=True) & (logits > -math.inf).any(
        dim=-1, keepdim=True)
    p = _softmax(logits.masked_fill(~clean, -math.inf), ok)
    r = torch.where(clean, p, torch.zeros_like(p)).sum(dim=(0, 1)).float()
    # Step 5: groups.
    if cfg.normalize == "joint":
        groups = [[i for s, e in lay.ref for i in range(s, e)]]
    else:
        groups = [list(range(s, e)) for s, e in lay.ref]
    for keys in groups:
        keys = [i for i in keys if bool(allowed[i])]
        if not keys:
            continue
        idx = torch.tensor(keys, device=r.device)
        rg = r[idx]
        lo, hi = rg.min(), rg.max()
        if float((hi - lo).detach()) <= 1e-12:
            continue
        rhat = (rg - lo) / (hi - lo)
        if cfg.thresholds == "quantile":
            # In float64: torch.quantile on float32 forms the position tau * (n - 1) in float32, which
            # moves a threshold that falls on an element (0.6 * 5 = 3) just past it.
            t_hi, t_lo = (torch.quantile(rhat.double(), t).to(rhat.dtype) for t in (cfg.tau_high, cfg.tau_low))
        else:
            t_hi, t_lo = cfg.tau_high, cfg.tau_low
        # Step 6: boost above the high threshold, damp below the low one (boost wins a tie).
        wg = torch.ones_like(rhat)
        wg = torch.where(rhat <= t_lo, torch.full_like(rhat, 1 - cfg.gamma), wg)
        wg = torch.where(rhat >= t_hi, torch.full_like(rhat, 1 + cfg.gamma), wg)
        w[idx] = wg
    return w


class ReferenceBackend(Backend):
    name = "reference"

    def key_weights(self, call: DARCall) -> torch.Tensor:
        return torch.stack([_row_weights(call, b) for b in range(call.q.shape[0])])

    def attention(self, call: DARCall, weights: torch.Tensor | None) -> torch.Tensor:
        dt = _compute_dtype(call)
        outs = []
        for b in range(call.q.shape[0]):
            bias = _logit_bias(call, b)
            scores = _scores(call, b)
            logits = scores + bias  # (Hq, Lq, Lk)
            if weights is not None:
                w = weights[b].to(dt)
                rows = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
                for s, e in call.plan.gen_ranges[b]:
                    rows[s:e] = True
                if call.cfg.mode == "key_scale":
                    rebalanced = scores * w + bias  # softmax(Q (w ⊙ K)^T * scale)
                else:
                    rebalanced = logits + torch.log(w)  # probabilities scaled by w, renormalised
                logits = torch.where(rows[None, :, None], rebalanced, logits)
            ok = _allowed(bias)
            p = _softmax(logits.masked_fill(~ok, -math.inf), ok)  # over the allowed keys only
            v = call.v[b].to(dt).repeat_interleave(call.groups_per_kv, dim=0)
            outs.append(p @ v)
        return torch.stack(outs).to(call.q.dtype)
