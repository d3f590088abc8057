"""Correctness of the very configuration that is timed, at the timed shape, before it is timed.

The check calls the callable the timing will call, on the same (strided) inputs, inside the same
context (SDPA kernel selection), and compares its output:

- small shapes (at most `FULL_CHECK_ELEMENTS` attention scores): with the reference backend, whole
  output, and DAR's key weights with the reference's on every key whose r̂ is > `TAU_MARGIN` from
  both thresholds (a key within rounding of a threshold may legitimately go either way);
- larger shapes (the reference materialises ``Lq x Lk``): key weights with the torch scoring path
  (``m x Lk`` work) under the same margin rule, and the output on `ROWS` query rows (rebalanced and
  plain ones, evenly spread) with exact attention of those rows using the implementation's own
  weights, in float64 on CPU, float32 on CUDA.

Plain implementations (SDPA, FlexAttention, eager) are compared with plain attention the same way.
"""

from __future__ import annotations

import torch

from dar.backends import get_backend
from dar.call import make_call
from dar.scoring import key_statistics

from .impls import Impl, Unavailable

TOLERANCE = {"fp32": 2e-4, "fp16": 4e-3, "bf16": 3e-2}
TAU_MARGIN = 1e-4
FULL_CHECK_ELEMENTS = 1 << 24  # B * Hq * Lq * Lk up to this: the reference backend checks everything
ROWS = 32


def _split_result(impl: Impl, result):
    """(out, w) from what the timed callable returns."""
    if isinstance(result, tuple):
        return result
    if getattr(impl, "weights_only", False):
        return None, result
    return result, None


def reference_rows(call, weights, rows: torch.Tensor) -> torch.Tensor:
    """Exact step 7 of docs/semantics.md for query rows ``rows (R,)`` of every batch row and head:
    ``(B, Hq, R, Dv)``; ``weights=None`` is plain attention. Memory ``B x Hq x R x Lk``."""
    acc = torch.float64 if call.q.device.type == "cpu" else torch.float32
    b, hq, _, d = call.q.shape
    hk, lk = call.k.shape[1], call.k.shape[2]
    g, r = hq // hk, rows.numel()
    q = call.q[:, :, rows].to(acc).reshape(b, hk, g * r, d)
    scores = (torch.matmul(q, call.k.to(acc).transpose(-1, -2)) * call.scale).reshape(b, hq, r, lk)
    bias = call.mask.rows_bias(rows[None].expand(b, r).to(call.q.device), hq)
    bias = torch.zeros((), dtype=acc, device=scores.device) if bias is None else bias.to(acc)
    logits = scores + bias
    if weights is not None and call.plan.active:
        reb = call.plan.tensors(call.q.device).rebalanced_rows(call.plan.lq)[:, rows][:, None, :, None]
        w = weights.to(acc)[:, None, None, :]
        rebalanced = scores * w + bias if call.cfg.mode == "key_scale" else logits + torch.log(w)
        logits = torch.where(reb, rebalanced, logits)
    p = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    v = call.v.to(acc)
    return torch.matmul(p.reshape(b, hk, g * r, lk), v).reshape(b, hq, r, v.shape[-1])


def _check_rows(call) -> torch.Tensor:
    """ROWS query rows: half rebalanced, half plain (as far as there are), evenly spread."""
    lq = call.plan.lq
    reb = torch.zeros(lq, dtype=torch.bool)
    for ranges in call.plan.gen_ranges[:1]:
        for s, e in ranges:
            reb[s:e] = True
    picked = []
    for sel in (reb.nonzero().flatten(), (~reb).nonzero().flatten()):
        n = min(ROWS // 2, sel.numel())
        if n:
            picked.append(sel[torch.linspace(0, sel.numel() - 1, n).round().long()])
    return torch.cat(picked).unique().to(call.q.device)


def check(impl: Impl, fn, q, k, v, layout, cfg, dtype_name: str) -> dict:
    """Run the timed callable ``fn`` once and compare it; returns a JSON-ready record (never raises)."""
    b, hq, lq, d = q.shape
    rec = {"impl": impl.name, "dtype": dtype_name, "head_dim": d, "gqa_group": hq // k.shape[1],
           "seq": lq, "tolerance": TOLERANCE[dtype_name]}
    cfg = impl.config(cfg) if hasattr(impl, "config") else cfg
    try:
        with torch.no_grad(), impl.context():
            out, w = _split_result(impl, fn())
    except Unavailable as exc:
        return {**rec, "status": "unavailable", "reason": str(exc), "passed": None}
    except Exception as exc:  # a crash is a failed check, reported, not raised
        return {**rec, "status": "error", "reason": f"{type(exc).__name__}: {exc}"[:500], "passed": False}
    full = b * hq * lq * k.shape[2] <= FULL_CHECK_ELEMENTS
    rec["reference"] = "reference backend, whole output" if full else f"torch scoring + exact attention of {ROWS} rows"
    with torch.no_grad():
        call = make_call(q, k, v, layout, cfg, None, None, False)
        mismatches = None
        if w is not None:
            stats = key_statistics(call)
            ref_w = get_backend("reference").key_weights(call) if full else stats.weight
            rhat = stats.rhat
            near = ((rhat - cfg.tau_high).abs() <= TAU_MARGIN) | ((rhat - cfg.tau_low).abs() <= TAU_MARGIN)
            mismatches = int(((w != ref_w) & ~near).sum())
            rec["rebalanced_keys"] = int((ref_w != 1).sum())
        err, finite = 0.0, True
        if out is not None:
            finite = bool(torch.isfinite(out).all())
            if full:
                expected = get_backend("reference").attention(call, w)
                err = (out.double() - expected.double()).abs().max().item()
            else:
                rows = _check_rows(call)
                rec["rows_checked"] = int(rows.numel())
                expected = reference_rows(call, w, rows)
                err = (out[:, :, rows].double() - expected.double()).abs().max().item()
    passed = finite and err <= rec["tolerance"] and (mismatches in (None, 0))
    return {**rec, "status": "pass" if passed else "fail", "passed": passed, "max_abs_err": err,
            "weight_mismatches": mismatches, "finite": finite}
