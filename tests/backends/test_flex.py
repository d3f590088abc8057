"""The flex backend (FlexAttention with a weight-reading score_mod) against the reference backend
and an independent float64 computation written here.

FlexAttention runs eagerly on CPU; every distinct shape costs a dynamo trace (~0.5-1 s), so the
cases are few and small.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dar
from dar.backends import get_backend
from dar.call import make_call

pytest.importorskip("torch.nn.attention.flex_attention")

TAU_MARGIN = 1e-4


def _inputs(b, hq, hk, lq, lk, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g).to(dtype)
    k = torch.randn(b, hk, lk, d, generator=g).to(dtype)
    v = torch.randn(b, hk, lk, d, generator=g).to(dtype)
    return q, k, v


def _allowed(mask, is_causal, b, hq, lq, lk):
    """(B, Hq, Lq, Lk) bool of allowed pairs and (B, Hq, Lq, Lk) float64 additive bias."""
    allowed = torch.ones(b, hq, lq, lk, dtype=torch.bool)
    bias = torch.zeros(b, hq, lq, lk, dtype=torch.float64)
    if mask is not None:
        m = mask.expand(b, hq, lq, lk)
        if m.dtype == torch.bool:
            allowed &= m
        else:
            allowed &= m != -math.inf
            bias = torch.where(allowed, m.double(), bias)
    if is_causal:
        allowed &= torch.ones(lq, lk, dtype=torch.bool).tril()
    return allowed, bias


def _softmax64(logits, allowed):
    logits = logits.masked_fill(~allowed, -math.inf)
    p = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(p, nan=0.0)  # rows with no allowed key contribute / output 0


def _float64_weights_and_rhat(q, k, layouts, cfg, samples, mask, is_causal, scale):
    """Steps 1-6 of the semantics in float64, dense: (w, rhat) each (B, Lk)."""
    b, hq, lq, _ = q.shape
    hk, lk = k.shape[1], k.shape[2]
    allowed, bias = _allowed(mask, is_causal, b, hq, lq, lk)
    kk = k.double().repeat_interleave(hq // hk, dim=1)
    logits = scale * q.double() @ kk.transpose(-1, -2) + bias
    p = _softmax64(logits, allowed)
    w = torch.ones(b, lk, dtype=torch.float64)
    rhat = torch.full((b, lk), float("nan"), dtype=torch.float64)
    key_ok = allowed.any(dim=1).any(dim=1)  # (B, Lk)
    for bi, lay in enumerate(layouts):
        if not samples[bi] or not lay.ref:
            continue
        r = p[bi][:, list(samples[bi]), :].sum(dim=(0, 1))
        groups = ([[j for s, e in lay.ref for j in range(s, e)]] if cfg.normalize == "joint"
                  else [list(range(s, e)) for s, e in lay.ref])
        for keys in groups:
            keys = [j for j in keys if key_ok[bi, j]]
            if not keys:
                continue
            rg = r[keys]
            lo, hi = rg.min(), rg.max()
            if hi - lo <= 1e-12:
                continue
            rh = (rg - lo) / (hi - lo)
            wg = torch.where(rh >= cfg.tau_high, 1 + cfg.gamma, torch.where(rh <= cfg.tau_low, 1 - cfg.gamma, 1.0))
            w[bi, keys] = wg.double()
            rhat[bi, keys] = rh
    return w, rhat


def _float64_attention(q, k, v, w, rows, mode, mask, is_causal, scale):
    """Step 7 in float64 with given weights w (B, Lk) and rebalanced rows (B, Lq)."""
    b, hq, lq, _ = q.shape
    hk, lk = k.shape[1], k.shape[2]
    allowed, bias = _allowed(mask, is_causal, b, hq, lq, lk)
    g = hq // hk
    kk = k.double().repeat_interleave(g, dim=1)
    vv = v.double().repeat_interleave(g, dim=1)
    s = scale * q.double() @ kk.transpose(-1, -2)
    w = w.double()[:, None, None, :]
    reb = s * w if mode == "key_scale" else s + torch.log(w)
    logits = torch.where(rows[:, None, :, None], reb, s) + bias
    return _softmax64(logits, allowed) @ vv


TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


def _check(b, hq, hk, lq, lk, d, layout, cfg, *, mask=None, is_causal=False, dtype=torch.float32, seed=0):
    q, k, v = _inputs(b, hq, hk, lq, lk, d, dtype, seed)
    out, w = dar.dar_attention(q, k, v, layout, cfg, attn_mask=mask, is_causal=is_causal, backend="flex",
                               return_weights=True)
    ref_out, ref_w = dar.dar_attention(q, k, v, layout, cfg, attn_mask=mask, is_causal=is_causal,
                                       backend="reference", return_weights=True)
    assert out.shape == (b, hq, lq, d) and out.dtype == dtype
    call = make_call(q, k, v, layout, cfg, mask, None, is_causal)
    w64, rhat = _float64_weights_and_rhat(q, k, call.layouts, cfg, call.plan.samples, mask, is_causal, call.scale)
    # Weights: exact on keys away from the thresholds (hard comparisons tie within rounding).
    clear = ~((rhat - cfg.tau_high).abs() < TAU_MARGIN) & ~((rhat - cfg.tau_low).abs() < TAU_MARGIN)
    assert torch.equal(w[clear], ref_w[clear])
    assert torch.equal(w[clear].double(), w64[clear].float().double())
    # Output: against the reference, and against float64 using flex's own weights.
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    rows = call.plan.tensors("cpu").rebalanced_rows(lq)
    exp = _float64_attention(q, k, v, w, rows, cfg.mode, mask, is_causal, call.scale)
    torch.testing.assert_close(out.double(), exp, atol=tol, rtol=tol)
    return w


def _layout(l, refs=2, text=8, gen_last=False):
    if gen_last:  # references before the generated tokens, so causal queries can see them
        per = (l - text) // (refs + 1)
        ref = [(text + i * per, text + (i + 1) * per) for i in range(refs)]
        return dar.TokenLayout(ref=ref, gen=[(text + refs * per, l)])
    gen_end = text + (l - text) // (refs + 1)
    per = (l - gen_end) // refs
    ref = [(gen_end + i * per, gen_end + (i + 1) * per) for i in range(refs)]
    return dar.TokenLayout(ref=ref, gen=[(text, gen_end)])


CASES = [
    # id, (B, Hq, Hk, L, D), cfg changes, mask kind, causal, dtype
    ("mha-keyscale", (2, 2, 2, 200, 32), {}, None, False, torch.float32),
    ("gqa-probscale-perimage", (2, 4, 2, 260, 16), dict(mode="prob_scale", normalize="per_image"), None, False,
     torch.float32),
    ("gqa-all-rows", (1, 4, 1, 150, 32), dict(queries="all", sampling="strided"), None, False, torch.float32),
    ("key-padding-bool", (2, 2, 1, 300, 32), {}, "bool", False, torch.float32),
    ("key-bias-float", (2, 2, 2, 280, 16), dict(mode="prob_scale"), "float", False, torch.float32),
    ("causal", (1, 2, 2, 260, 32), {}, None, True, torch.float32),
    ("bf16", (2, 4, 2, 200, 64), {}, None, False, torch.bfloat16),
    ("fp16-padding", (2, 2, 2, 200, 32), dict(mode="prob_scale"), "bool", False, torch.float16),
]


def _mask(kind, b, lk):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(7)
    if kind == "bool":
        m = torch.ones(b, 1, 1, lk, dtype=torch.bool)
        m[0, ..., lk // 2: lk // 2 + 70] = False  # a run of padded keys spanning a 128-block boundary
        m[-1, ..., lk - 40:] = False  # trailing padding
        return m
    m = torch.randn(b, 1, 1, lk, generator=g)
    m[0, ..., 10:30] = -math.inf
    return m


@pytest.mark.parametrize("name,shape,changes,mask_kind,causal,dtype", CASES, ids=[c[0] for c in CASES])
def test_flex_matches_reference(name, shape, changes, mask_kind, causal, dtype):
    b, hq, hk, l, d = shape
    cfg = dar.DARConfig(num_samples=24, **changes)
    w = _check(b, hq, hk, l, l, d, _layout(l, gen_last=causal), cfg, mask=_mask(mask_kind, b, l), is_causal=causal, dtype=dtype)
    # The case must actually rebalance: some keys boosted and some damped.
    assert (w > 1).any() and (w < 1).any()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 2), hk=st.integers(1, 2), g=st.sampled_from([1, 2]), l=st.integers(40, 200),
    d=st.sampled_from([8, 16]), refs=st.integers(1, 3), mode=st.sampled_from(["key_scale", "prob_scale"]),
    padded=st.booleans(), seed=st.integers(0, 2**16),
)
def test_flex_matches_reference_hypothesis(b, hk, g, l, d, refs, mode, padded, seed):
    mask = None
    if padded:
        mask = torch.ones(b, 1, 1, l, dtype=torch.bool)
        mask[..., l - l // 5:] = False
    cfg = dar.DARConfig(num_samples=16, mode=mode, seed=seed % 100)
    _check(b, hk * g, hk, l, l, d, _layout(l, refs=refs), cfg, mask=mask, seed=seed)


def test_fully_masked_row_outputs_zero():
    l = 160
    mask = torch.ones(2, 1, 1, l, dtype=torch.bool)
    mask[1] = False  # batch row 1 may attend to nothing
    q, k, v = _inputs(2, 2, 2, l, l, 16, torch.float32, 3)
    out = dar.dar_attention(q, k, v, _layout(l), dar.DARConfig(num_samples=8), attn_mask=mask, backend="flex")
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    ref = dar.dar_attention(q, k, v, _layout(l), dar.DARConfig(num_samples=8), attn_mask=mask, backend="reference")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_inactive_plan_is_plain_attention():
    q, k, v = _inputs(1, 2, 1, 130, 130, 16, torch.float32, 4)
    out = dar.dar_attention(q, k, v, _layout(130), dar.DARConfig(gamma=0.0), backend="flex")
    exp = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(out, exp, atol=2e-5, rtol=2e-5)


def test_general_mask_is_unsupported_with_reason():
    q, k, v = _inputs(1, 2, 2, 64, 64, 8, torch.float32, 5)
    mask = torch.ones(1, 1, 64, 64, dtype=torch.bool).tril()  # varies over query rows
    call = make_call(q, k, v, _layout(64), None, mask, None, False)
    why = get_backend("flex").unsupported(call)
    assert why is not None and "key-padding" in why
    with pytest.raises(ValueError, match="flex"):
        dar.dar_attention(q, k, v, _layout(64), attn_mask=mask, backend="flex")


def test_cpu_backward_is_unsupported():
    q, k, v = _inputs(1, 2, 2, 64, 64, 8, torch.float32, 6)
    q.requires_grad_(True)
    call = make_call(q, k, v, _layout(64), None, None, None, False)
    assert "backward" in get_backend("flex").unsupported(call)
    with torch.no_grad():
        assert get_backend("flex").unsupported(call) is None


def test_traces_under_torch_compile_fullgraph():
    l = 140
    q, k, v = _inputs(2, 4, 2, l, l, 16, torch.float32, 8)
    mask = torch.ones(2, 1, 1, l, dtype=torch.bool)
    mask[0, ..., 100:] = False
    lay, cfg = _layout(l), dar.DARConfig(num_samples=16)

    def f(q, k, v, m):
        return dar.dar_attention(q, k, v, lay, cfg, attn_mask=m, backend="flex")

    out = torch.compile(f, fullgraph=True, backend="eager")(q, k, v, mask)
    ref = dar.dar_attention(q, k, v, lay, cfg, attn_mask=mask, backend="reference")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
