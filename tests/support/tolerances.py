"""Output tolerances per input dtype, in one place: (atol, rtol) against a float64 computation."""

import torch

OUTPUT_TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}

# Attention mass r sums probabilities over heads and samples: absolute tolerance per unit of mass.
MASS_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

# Keys whose float64 r̂ lies within this margin of a threshold may legitimately round either way.
THRESHOLD_MARGIN = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def assert_close(actual, expected, dtype, what="output"):
    atol, rtol = OUTPUT_TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), torch.as_tensor(expected, dtype=torch.float64),
                               atol=atol, rtol=rtol, msg=lambda m: f"{what} ({dtype}): {m}")


# Unit roundoff of the input dtypes, for bounds on rounding an input-sized tensor (K' = w ⊙ K).
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def key_scale_bound(q, k, v, w, scale, u):
    """Worst-case output error from rounding K' = w ⊙ K to a dtype with unit roundoff u
    (docs/semantics.md, numerical notes): |Δo| <= (exp(2M) - 1) * (max v - min v) / 2 per row,
    M = u * |scale| * max_j sum_d |q_d w_j k_jd|. (B, Hq, Lq, Dv); GQA k / v are repeated to Hq."""
    g = q.shape[1] // k.shape[1]
    qd = q.detach().cpu().double()
    kd = k.detach().cpu().double().repeat_interleave(g, dim=1) * w.detach().cpu().double()[:, None, :, None]
    vd = v.detach().cpu().double().repeat_interleave(g, dim=1)
    a = abs(scale) * (qd.abs() @ kd.abs().transpose(-1, -2))  # (B, H, Lq, Lk): fine at test sizes
    m = u * a.amax(dim=-1, keepdim=True)
    spread = (vd.amax(dim=2, keepdim=True) - vd.amin(dim=2, keepdim=True)) / 2
    return torch.expm1(2 * m) * spread


def assert_close_within(actual, expected, dtype, extra, what="output"):
    """`assert_close`'s tolerance plus an elementwise allowance ``extra`` (e.g. `key_scale_bound`)."""
    atol, rtol = OUTPUT_TOL[dtype]
    exp = torch.as_tensor(expected, dtype=torch.float64)
    err = (actual.double().cpu() - exp).abs()
    excess = err - (atol + rtol * exp.abs() + extra)
    assert not (excess > 0).any() and not torch.isnan(err).any(), \
        f"{what} ({dtype}): max error {err.max():.3g}, {(excess > 0).sum()} elements past the bound"
