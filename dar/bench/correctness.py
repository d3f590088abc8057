"""Correctness of each implementation on a small case before it is timed.

DAR implementations are checked in two parts, so a key whose normalised score sits within rounding
of a threshold (where two correct implementations may legitimately disagree) cannot fail the check
and cannot hide an error either:
- weights: equal to the reference backend's on every key whose r̂ is > 1e-4 from both thresholds;
- output: equal, within the dtype's tolerance, to the reference backend's attention run with the
  implementation's own weights.
Plain implementations (SDPA, eager) are compared with the reference backend's plain attention.
"""

from __future__ import annotations

import torch

import dar
from dar.backends import get_backend
from dar.call import make_call
from dar.scoring import key_statistics

from .impls import Impl, Unavailable
from .shapes import Shape, sweep_shape

TOLERANCE = {"fp32": 2e-4, "fp16": 4e-3, "bf16": 3e-2}
TAU_MARGIN = 1e-4


def check_case(shape: Shape, seq: int = 320) -> Shape:
    """The small case standing in for ``shape``: same dtype, head dim and GQA ratio, batch 2."""
    group = shape.heads_q // shape.heads_kv
    return sweep_shape(seq, shape.head_dim, shape.dtype, group > 1, family="check", heads=2 * group, batch=2)


def check_key(shape: Shape) -> tuple:
    return (shape.dtype, shape.head_dim, shape.heads_q // shape.heads_kv)


def _inputs(shape: Shape, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = shape.torch_dtype

    def rnd(h):
        return torch.randn(shape.batch, h, shape.seq, shape.head_dim, generator=g).to(device=device, dtype=dt)

    return rnd(shape.heads_q), rnd(shape.heads_kv), rnd(shape.heads_kv)


def check(impl: Impl, shape: Shape, device: torch.device, cfg: dar.DARConfig, seq: int = 320) -> dict:
    """Run ``impl`` on the small case for ``shape`` and compare; returns a JSON-ready record."""
    case = check_case(shape, seq)
    rec = {"impl": impl.name, "dtype": case.dtype, "head_dim": case.head_dim,
           "gqa_group": case.heads_q // case.heads_kv, "case": case.name, "tolerance": TOLERANCE[case.dtype]}
    q, k, v = _inputs(case, device)
    layout = case.layout()
    try:
        with torch.no_grad(), impl.context():
            out, w = impl.outputs(q, k, v, layout, cfg)
    except Unavailable as exc:
        return {**rec, "status": "unavailable", "reason": str(exc), "passed": None}
    except Exception as exc:  # a crash is a failed check, reported, not raised
        return {**rec, "status": "error", "reason": f"{type(exc).__name__}: {exc}"[:500], "passed": False}
    ref = get_backend("reference")
    with torch.no_grad():
        call = make_call(q, k, v, layout, cfg, None, None, False)
        mismatches = None
        if w is not None:
            ref_w = ref.key_weights(call)
            rhat = key_statistics(call).rhat
            near = ((rhat - cfg.tau_high).abs() <= TAU_MARGIN) | ((rhat - cfg.tau_low).abs() <= TAU_MARGIN)
            mismatches = int(((w != ref_w) & ~near).sum())
            rec["rebalanced_keys"] = int((ref_w != 1).sum())
            expected = ref.attention(call, w)
        else:
            expected = ref.attention(call, None)
        err = (out.float() - expected.float()).abs().max().item()
        finite = bool(torch.isfinite(out).all())
    passed = finite and err <= rec["tolerance"] and (mismatches in (None, 0))
    return {**rec, "status": "pass" if passed else "fail", "passed": passed, "max_abs_err": err,
            "weight_mismatches": mismatches, "finite": finite}
