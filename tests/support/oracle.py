"""An independent float64 transcription of docs/semantics.md in numpy, for tests.

It shares no code with the package: sampling, masking, normalisation, thresholds and attention are
written again here from the text, so a bug in dar's shared helpers cannot hide in both places.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def sample(n: int, num_samples: int, method: str, seed: int) -> list[int]:
    """Positions into P (semantics step 2)."""
    m = min(num_samples, n)
    if m == 0:
        return []
    if method == "strided":
        return [int(math.floor((j + 0.5) * n / m)) for j in range(m)]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[:m].tolist())


def _bias(mask, is_causal, b, hq, lq, lk) -> np.ndarray:
    bias = np.zeros((hq, lq, lk))
    if mask is not None:
        m = mask.detach().cpu()
        m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
        m = m.expand(m.shape[0] if m.shape[0] > 1 else 1, hq, lq, lk)[b if m.shape[0] > 1 else 0]
        if m.dtype == torch.bool:
            bias = np.where(m.numpy(), 0.0, -np.inf)
        else:
            bias = m.double().numpy().copy()
    if is_causal:
        bias = bias + np.where(np.arange(lk)[None, :] <= np.arange(lq)[:, None], 0.0, -np.inf)[None]
    return bias


def _softmax(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite rows: their output is not compared
        mx = np.max(x, axis=-1, keepdims=True)
        mx = np.where(np.isfinite(mx), mx, 0.0)
        e = np.exp(x - mx)
        s = e.sum(axis=-1, keepdims=True)
        return np.where(s > 0, e / np.where(s > 0, s, 1.0), 0.0)


def pinned(q, k, v, attn_mask=None, is_causal=False) -> np.ndarray:
    """(B, Hq, Lq, Dv) bool: output entries the semantics pins for non-finite inputs ("Non-finite
    inputs", step 7): q[b, h, i], all of k[b, hk], v[b, hk, :, c] and row i's mask entries finite
    (a mask entry may be -inf)."""
    qn, kn, vn = (t.detach().double().cpu().numpy() for t in (q, k, v))
    bsz, hq, lq, _ = qn.shape
    hk, lk = kn.shape[1], kn.shape[2]
    g = hq // hk
    q_ok = np.isfinite(qn).all(axis=-1)  # (B, Hq, Lq)
    k_ok = np.repeat(np.isfinite(kn).all(axis=(-1, -2)), g, axis=1)  # (B, Hq)
    v_ok = np.repeat(np.isfinite(vn).all(axis=-2), g, axis=1)  # (B, Hq, Dv)
    out = q_ok[..., None] & k_ok[:, :, None, None] & v_ok[:, :, None, :]
    for b in range(bsz):
        bias = _bias(attn_mask, is_causal, b, hq, lq, lk)
        row_ok = (np.isfinite(bias) | (bias == -np.inf)).all(axis=-1)  # (Hq, Lq)
        out[b] &= row_ok[..., None]
    return out


def dar_float64(q, k, v, layouts, cfg, attn_mask=None, scale=None, is_causal=False):
    """Returns (out (B,Hq,Lq,Dv) float64 ndarray, w (B,Lk), rhat (B,Lk) with NaN outside R, thresholds).

    ``thresholds[b][k]`` is the (t_lo, t_hi) pair that applied to key k (None outside R), so tests
    can tell which keys sit within rounding of a threshold.
    """
    qn = q.detach().double().cpu().numpy()
    kn = k.detach().double().cpu().numpy()
    vn = v.detach().double().cpu().numpy() if v is not None else None
    bsz, hq, lq, d = qn.shape
    hk, lk = kn.shape[1], kn.shape[2]
    g = hq // hk
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if not isinstance(layouts, (list, tuple)):
        layouts = [layouts] * bsz
    W = np.ones((bsz, lk))
    RH = np.full((bsz, lk), np.nan)
    TH = [[None] * lk for _ in range(bsz)]
    out = None if vn is None else np.zeros((bsz, hq, lq, vn.shape[-1]))
    for b in range(bsz):
        lay = layouts[b]
        kr = np.repeat(kn[b], g, axis=0)  # (Hq, Lk, D)
        with np.errstate(invalid="ignore", over="ignore"):
            scores = scale * np.einsum("hid,hjd->hij", qn[b], kr)
            bias = _bias(attn_mask, is_causal, b, hq, lq, lk)
            logits = scores + bias
        pair_ok = bias != -np.inf  # a -inf bias forbids the pair; NaN and +inf allow it
        key_ok = pair_ok.reshape(-1, lk).any(axis=0)
        P = [i for s, e in sorted(lay.gen) for i in range(s, e)]
        R = [j for s, e in lay.ref for j in range(s, e) if key_ok[j]]
        w = np.ones(lk)
        if P and R and cfg.gamma > 0:
            S = [P[p] for p in sample(len(P), cfg.num_samples, cfg.sampling, cfg.seed)]
            ls, ok = logits[:, S, :], pair_ok[:, S, :]
            # A (head, sampled row) with a NaN or +inf logit on an allowed key contributes nothing
            # (-inf is a zero probability).
            clean = ~((np.isnan(ls) | (ls == np.inf)) & ok).any(axis=-1, keepdims=True)
            r = np.where(clean, _softmax(np.where(ok, ls, -np.inf)), 0.0).sum(axis=(0, 1))
            if cfg.normalize == "joint":
                groups = [R]
            else:
                groups = [[j for j in range(s, e) if key_ok[j]] for s, e in lay.ref]
            for grp in groups:
                if not grp:
                    continue
                rg = r[grp]
                lo, hi = rg.min(), rg.max()
                if hi - lo <= 1e-12:
                    continue
                rhat = (rg - lo) / (hi - lo)
                if cfg.thresholds == "quantile":
                    t_hi = float(np.quantile(rhat, cfg.tau_high))
                    t_lo = float(np.quantile(rhat, cfg.tau_low))
                else:
                    t_hi, t_lo = cfg.tau_high, cfg.tau_low
                for j, x in zip(grp, rhat):
                    RH[b, j] = x
                    TH[b][j] = (t_lo, t_hi)
                    # Weights are float32 by contract: 1 +- gamma rounded to float32.
                    if x >= t_hi:
                        w[j] = np.float32(1 + cfg.gamma)
                    elif x <= t_lo:
                        w[j] = np.float32(1 - cfg.gamma)
        W[b] = w
        if out is None:
            continue
        rows = set(range(lq)) if cfg.queries == "all" else set(P)
        sel = np.array([i in rows for i in range(lq)])[None, :, None]
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            if cfg.mode == "key_scale":
                reb = scores * w[None, None, :] + bias
            else:
                reb = logits + np.log(w)[None, None, :]
            p = _softmax(np.where(pair_ok, np.where(sel, reb, logits), -np.inf))
            out[b] = p @ np.repeat(vn[b], g, axis=0)
    return out, W, RH, TH


def stable_keys(rhat: np.ndarray, thresholds, margin: float = 1e-3) -> np.ndarray:
    """(B, Lk) bool: keys whose weight cannot flip under float rounding (r̂ not within ``margin``
    of a threshold). Keys outside R are always stable (weight 1 by definition)."""
    ok = np.ones(rhat.shape, dtype=bool)
    for b in range(rhat.shape[0]):
        for j in range(rhat.shape[1]):
            if thresholds[b][j] is not None:
                t_lo, t_hi = thresholds[b][j]
                # Exactly on a threshold is stable too: a quantile threshold that lands on an element
                # is that same element in every implementation.
                ok[b, j] = all(abs(rhat[b, j] - t) > margin or rhat[b, j] == t for t in (t_lo, t_hi))
    return ok
