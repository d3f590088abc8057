"""Steps 3-6 of docs/semantics.md in plain torch: sampled-query attention mass -> key weights.

Shared by the torch backend and by inspection tools. Tensors are at most ``B x Hq x m x Lk``
(m sampled queries) and ``B x G x Lk`` (G reference groups); never ``Lq x Lk``.
"""

from __future__ import annotations

import dataclasses

import torch

from .call import DARCall
from .config import DARConfig
from .kernels.shared import DEGENERATE_SPAN


@dataclasses.dataclass(frozen=True)
class KeyStats:
    """Per-key statistics of one call, all (B, Lk) float32.

    mass:   r, attention mass the sampled queries put on each key (summed over heads and samples).
    rhat:   r̂, the min-max normalised mass within the key's group; NaN for keys outside R and
            for keys of degenerate groups.
    weight: w, the key weights.
    """

    mass: torch.Tensor
    rhat: torch.Tensor
    weight: torch.Tensor


# Scoring works on chunks of key heads so that its float32 temporaries (a K head upcast, m x Lk
# logits per query head) stay near this many elements whatever the model size.
_CHUNK_ELEMENTS = 1 << 25


def sampled_attention_mass(call: DARCall) -> torch.Tensor:
    """(B, Lk) float32: ``r_k = sum_i sum_h softmax(scale * q_i k^T + mask)_k`` over sampled rows i."""
    q, plan = call.q, call.plan
    b, hq, _, d = q.shape
    pt = plan.tensors(q.device)
    rows = pt.samples.long()  # (B, M), -1 = padding
    valid = rows >= 0
    rows = rows.clamp(min=0)
    m = rows.shape[1]
    qs = q.gather(2, rows[:, None, :, None].expand(b, hq, m, d))  # (B, Hq, M, D): only the sampled rows
    bias = call.mask.rows_bias(rows, hq)  # (B, 1 or Hq, M, Lk) or None
    return mass_of_rows(qs, call.k, bias, valid, call.scale)


def mass_of_rows(qs: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, valid: torch.Tensor,
                 scale: float, reduce_lse=None) -> torch.Tensor:
    """(B, Lk) float32 attention mass of the query rows ``qs (B, Hq, M, D)`` over ``k (B, Hk, Lk, D)``,
    summed over heads and the rows where ``valid (B, M)``; ``bias (B, 1 or Hq, M or 1, Lk)`` is additive
    (-inf = key not allowed) or None. Chunked over key heads; shared by the dense, packed and sharded paths.

    ``reduce_lse``: when ``k`` holds one rank's share of the keys (`dar.parallel`), combines the
    ``(B, Hq, M)`` log-sum-exps of the rows over this rank's keys into those over every rank's keys;
    the mass is then two passes over the chunks (log-sum-exps, then probabilities).
    """
    b, hq, m, d = qs.shape
    hk, lk = k.shape[1], k.shape[2]
    g = hq // hk
    acc = torch.float64 if qs.dtype == torch.float64 else torch.float32
    per_head = b * (g * m + d) * lk
    step = max(1, min(hk, _CHUNK_ELEMENTS // max(per_head, 1)))
    chunks = [(h0, min(hk, h0 + step)) for h0 in range(0, hk, step)]

    def logits_of(h0: int, h1: int) -> torch.Tensor:
        # Query heads of one KV head share its keys: fold them into the matmul's row dimension.
        qc = qs[:, h0 * g:h1 * g].to(acc).reshape(b, h1 - h0, g * m, d)
        logits = torch.matmul(qc, k[:, h0:h1].to(acc).transpose(-1, -2)).mul_(scale)
        logits = logits.reshape(b, (h1 - h0) * g, m, lk)
        if bias is not None:  # logits of keys that are not allowed (-inf bias) are ignored
            bias_c = (bias if bias.shape[1] == 1 else bias[:, h0 * g:h1 * g]).to(acc)
            allowed = bias_c != float("-inf")
            logits = torch.where(allowed, logits + bias_c, torch.full_like(logits, float("-inf")))
        return logits

    mass = torch.zeros(b, lk, dtype=acc, device=qs.device)
    if reduce_lse is not None:
        # Each row's log-sum-exp over every rank's keys. A NaN or +inf logit on an allowed key (any rank)
        # makes it non-finite, as does a row with no allowed key (-inf): such rows contribute no mass.
        lse = reduce_lse(torch.cat([torch.logsumexp(logits_of(h0, h1), dim=-1) for h0, h1 in chunks], dim=1))
        ok = torch.isfinite(lse) & valid[:, None, :]
        lse = torch.where(ok, lse, torch.zeros_like(lse))
        for h0, h1 in chunks:
            p = torch.exp(logits_of(h0, h1) - lse[:, h0 * g:h1 * g, :, None])
            mass += torch.where(ok[:, h0 * g:h1 * g, :, None], p, torch.zeros_like(p)).sum(dim=(1, 2))
        return mass.float()
    for h0, h1 in chunks:
        logits = logits_of(h0, h1)
        # Non-finite inputs (docs/semantics.md): a (head, sampled row) with a NaN or +inf logit on an
        # allowed key contributes no mass.
        clean = ~(torch.isnan(logits) | (logits == float("inf"))).any(dim=-1, keepdim=True)
        logits = torch.where(clean, logits, torch.full_like(logits, float("-inf")))
        # A row with no allowed key has all -inf logits; give it zero mass instead of NaN.
        row_max = logits.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        p = torch.exp(logits - row_max)
        denom = p.sum(dim=-1, keepdim=True)
        p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
        mass += (p * (clean & valid[:, None, :, None])).sum(dim=(1, 2))
    return mass.float()


def group_quantile(values: torch.Tensor, member: torch.Tensor, tau: float) -> torch.Tensor:
    """torch.quantile's linear rule, per group: values/member (B, G, Lk) -> (B, G)."""
    n = member.sum(dim=-1)
    ordered = torch.where(member, values, torch.full_like(values, float("inf"))).sort(dim=-1).values
    pos = tau * (n - 1).clamp(min=0).to(values.dtype)
    lo = pos.floor()
    hi = pos.ceil()
    v_lo = ordered.gather(-1, lo.long()[..., None])[..., 0]
    v_hi = ordered.gather(-1, hi.long()[..., None])[..., 0]
    return torch.lerp(v_lo, v_hi, pos - lo)


def weights_from_mass(mass: torch.Tensor, key_groups: torch.Tensor, key_allowed: torch.Tensor | None,
                      num_groups: int, cfg: DARConfig, reduce_extrema=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 5-6: per-group min-max normalisation and thresholds -> ``(w, rhat)``, both (B, Lk) float32.

    ``reduce_extrema``: when ``mass`` holds one rank's share of the keys (`dar.parallel`), maps this
    rank's per-group ``(lo, hi)`` (``(B, G, 1)``; +inf / -inf for a group with no key here) to the
    groups' minima and maxima over every rank. (Quantile thresholds need every key's mass instead.)
    """
    b, lk = mass.shape
    in_r = key_groups >= 0
    if key_allowed is not None:
        in_r = in_r & key_allowed
    gids = torch.arange(max(num_groups, 1), device=mass.device, dtype=key_groups.dtype)
    member = (key_groups[:, None, :] == gids[None, :, None]) & in_r[:, None, :]  # (B, G, Lk)
    r = mass[:, None, :].expand(b, gids.numel(), lk)
    lo = torch.where(member, r, torch.full_like(r, float("inf"))).amin(dim=-1, keepdim=True)
    hi = torch.where(member, r, torch.full_like(r, float("-inf"))).amax(dim=-1, keepdim=True)
    if reduce_extrema is not None:
        lo, hi = reduce_extrema(lo, hi)
    span = hi - lo  # -inf for an empty group
    ok = span > DEGENERATE_SPAN
    rhat = (r - torch.where(ok, lo, torch.zeros_like(lo))) / torch.where(ok, span, torch.ones_like(span))
    use = member & ok
    if cfg.thresholds == "quantile":
        t_hi = group_quantile(rhat, use, cfg.tau_high)[..., None]
        t_lo = group_quantile(rhat, use, cfg.tau_low)[..., None]
    else:
        t_hi, t_lo = cfg.tau_high, cfg.tau_low
    # float32(1 ± gamma) exactly, as the spec says (1 + (w - 1) would round twice).
    boost = torch.full_like(rhat, 1.0 + cfg.gamma)
    damp = torch.full_like(rhat, 1.0 - cfg.gamma)
    w = torch.where(rhat >= t_hi, boost, torch.where(rhat <= t_lo, damp, torch.ones_like(rhat)))
    # Each key belongs to at most one group: summing over groups adds exact zeros to that group's w.
    in_group = use.any(dim=1)
    weight = torch.where(in_group, torch.where(use, w, torch.zeros_like(w)).sum(dim=1), torch.ones_like(mass))
    rhat_key = torch.where(use, rhat, torch.zeros_like(rhat)).sum(dim=1)
    rhat_key = torch.where(in_group, rhat_key, torch.full_like(rhat_key, float("nan")))
    return weight.float(), rhat_key.float()


def key_weights(call: DARCall) -> torch.Tensor:
    """(B, Lk) float32 key weights of a call (steps 1-6), in torch; no autograd graph."""
    with torch.no_grad():  # w is piecewise constant in q and k: its gradient is zero
        mass = sampled_attention_mass(call)
        pt = call.plan.tensors(call.q.device)
        w, _ = weights_from_mass(mass, pt.key_groups(call.plan.lk), call.mask.key_allowed(),
                                 call.plan.num_groups, call.cfg)
    return w


def key_statistics(call: DARCall) -> KeyStats:
    """r, r̂ and w of a call, computed with the torch implementation (used for inspection)."""
    mass = sampled_attention_mass(call)
    pt = call.plan.tensors(call.q.device)
    w, rhat = weights_from_mass(mass, pt.key_groups(call.plan.lk), call.mask.key_allowed(),
                                call.plan.num_groups, call.cfg)
    if not call.plan.active:
        w = torch.ones_like(w)
    return KeyStats(mass, rhat, w)
