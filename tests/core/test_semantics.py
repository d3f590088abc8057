"""Reference and torch backends against the independent float64 oracle, over hypothesis cases."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, strategies as st

import dar
from tests.support.oracle import dar_float64, stable_keys
from tests.support.strategies import cases
from tests.support.tolerances import THRESHOLD_MARGIN, assert_close

BACKENDS = ["reference", "torch"]


def _run(case, backend):
    return dar.dar_attention(case.q, case.k, case.v, case.layouts, case.cfg, backend=backend,
                             return_weights=True, **case.kwargs())


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases())
def test_backend_matches_float64_oracle(backend, case):
    out_ref, w_ref, rhat, th = dar_float64(case.q, case.k, case.v, case.layouts, case.cfg, **case.kwargs())
    stable = stable_keys(rhat, th, THRESHOLD_MARGIN[case.q.dtype])
    out, w = _run(case, backend)
    assert w.dtype == torch.float32 and w.shape == (case.q.shape[0], case.k.shape[2])
    assert out.dtype == case.q.dtype and out.shape == case.q.shape[:3] + case.v.shape[-1:]
    np.testing.assert_allclose(w.numpy()[stable], w_ref[stable], rtol=0, atol=1e-6)
    assume(stable.all())  # a flipped weight near a threshold changes the output legitimately
    assert_close(out, out_ref, case.q.dtype)


@given(case=cases(dtypes=(torch.float32, torch.float16, torch.bfloat16)))
def test_torch_backend_matches_reference(case):
    out_r, w_r = _run(case, "reference")
    out_t, w_t = _run(case, "torch")
    _, _, rhat, th = dar_float64(case.q, case.k, None, case.layouts, case.cfg, **case.kwargs())
    stable = stable_keys(rhat, th, THRESHOLD_MARGIN[case.q.dtype])
    np.testing.assert_allclose(w_t.numpy()[stable], w_r.numpy()[stable], rtol=0, atol=1e-6)
    assume(bool((w_t == w_r).all()))
    # Both compute in float32 from the same low-precision inputs and round the output to the input
    # dtype (on CPU the torch backend runs the rebalanced rows in float32): that dtype's tolerance.
    out_64 = dar_float64(case.q, case.k, case.v, case.layouts, case.cfg, **case.kwargs())[0]
    assert_close(out_t, out_64, case.q.dtype)
    assert_close(out_r, out_64, case.q.dtype)


@given(case=cases(), backend=st.sampled_from(BACKENDS))
def test_gamma_zero_is_plain_attention(case, backend):
    cfg = case.cfg.replace(gamma=0.0)
    out, w = dar.dar_attention(case.q, case.k, case.v, case.layouts, cfg, backend=backend,
                               return_weights=True, **case.kwargs())
    assert bool((w == 1).all())
    expected = F.scaled_dot_product_attention(
        case.q.double(), case.k.double(), case.v.double(), attn_mask=_sdpa_mask(case.attn_mask),
        is_causal=case.is_causal, scale=case.scale, enable_gqa=True)
    assert_close(out, _zero_nan(expected), case.q.dtype)


def _sdpa_mask(mask):
    return mask.double() if mask is not None and mask.is_floating_point() else mask


def _zero_nan(t):
    return torch.nan_to_num(t, nan=0.0)


@given(case=cases(mask_kinds=("none", "key_padding", "bool")), backend=st.sampled_from(BACKENDS))
def test_key_scale_all_rows_is_sdpa_with_scaled_keys(case, backend):
    cfg = case.cfg.replace(mode="key_scale", queries="all")
    out, w = dar.dar_attention(case.q, case.k, case.v, case.layouts, cfg, backend=backend,
                               return_weights=True, **case.kwargs())
    ks = case.k.double() * w.double()[:, None, :, None]
    expected = F.scaled_dot_product_attention(case.q.double(), ks, case.v.double(), attn_mask=case.attn_mask,
                                              is_causal=case.is_causal, scale=case.scale, enable_gqa=True)
    assert_close(out, _zero_nan(expected), case.q.dtype)


@given(case=cases(mask_kinds=("none", "key_padding", "bool")), backend=st.sampled_from(BACKENDS))
def test_prob_scale_is_sdpa_with_log_weight_bias(case, backend):
    cfg = case.cfg.replace(mode="prob_scale", queries="all")
    out, w = dar.dar_attention(case.q, case.k, case.v, case.layouts, cfg, backend=backend,
                               return_weights=True, **case.kwargs())
    bias = torch.log(w.double())[:, None, None, :]
    if case.attn_mask is not None:
        bias = bias.masked_fill(~case.attn_mask, float("-inf"))
    expected = F.scaled_dot_product_attention(case.q.double(), case.k.double(), case.v.double(), attn_mask=bias,
                                              is_causal=False, scale=case.scale, enable_gqa=True) \
        if not case.is_causal else _causal_bias_sdpa(case, bias)
    assert_close(out, _zero_nan(expected), case.q.dtype)


def _causal_bias_sdpa(case, bias):
    lq, lk = case.q.shape[2], case.k.shape[2]
    causal = torch.ones(lq, lk, dtype=torch.bool).tril()
    return F.scaled_dot_product_attention(case.q.double(), case.k.double(), case.v.double(),
                                          attn_mask=bias.masked_fill(~causal, float("-inf")),
                                          scale=case.scale, enable_gqa=True)


@given(case=cases())
def test_compute_key_weights_matches_dar_attention(case):
    w1 = dar.compute_key_weights(case.q, case.k, case.layouts, case.cfg, backend="torch", **case.kwargs())
    _, w2 = _run(case, "torch")
    assert torch.equal(w1, w2)


def test_rows_outside_generation_are_plain():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    lay = dar.TokenLayout(ref=[(0, 10), (10, 20)], gen=[(20, 30)])
    cfg = dar.DARConfig(num_samples=5, gamma=0.5, sampling="strided")
    plain = F.scaled_dot_product_attention(q, k, v)
    for backend in BACKENDS:
        out, w = dar.dar_attention(q, k, v, lay, cfg, backend=backend, return_weights=True)
        assert (w != 1).any(), "the case must actually rebalance something"
        torch.testing.assert_close(out[:, :, :20], plain[:, :, :20])
        assert (out[:, :, 20:] - plain[:, :, 20:]).abs().max() > 1e-3


def test_per_row_layouts_differ_per_batch_row():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 2, 24, 8), torch.randn(2, 2, 24, 8), torch.randn(2, 2, 24, 8)
    lays = [dar.TokenLayout(ref=[(0, 8)], gen=[(16, 24)]), dar.TokenLayout(ref=[], gen=[(8, 24)])]
    cfg = dar.DARConfig(num_samples=4, gamma=0.5)
    for backend in BACKENDS:
        out, w = dar.dar_attention(q, k, v, lays, cfg, backend=backend, return_weights=True)
        assert (w[0, :8] != 1).any() and bool((w[1] == 1).all()) and bool((w[0, 8:] == 1).all())
        torch.testing.assert_close(out[1], F.scaled_dot_product_attention(q, k, v)[1])


def test_masked_reference_keys_are_not_in_R():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 1, 12, 8), torch.randn(1, 1, 12, 8), torch.randn(1, 1, 12, 8)
    lay = dar.TokenLayout(ref=[(0, 6)], gen=[(6, 12)])
    mask = torch.ones(1, 1, 1, 12, dtype=torch.bool)
    mask[..., 0] = False
    cfg = dar.DARConfig(num_samples=6, gamma=0.5, sampling="strided")
    for backend in BACKENDS:
        w = dar.compute_key_weights(q, k, lay, cfg, attn_mask=mask, backend=backend)
        assert w[0, 0] == 1  # masked key: outside R, weight 1 even though it is in a ref range
    # everything but one key masked: a one-key group is degenerate, weights stay 1
    mask2 = torch.zeros(1, 1, 1, 12, dtype=torch.bool)
    mask2[..., 3] = True
    for backend in BACKENDS:
        out, w = dar.dar_attention(q, k, v, lay, cfg, attn_mask=mask2, backend=backend, return_weights=True)
        assert bool((w == 1).all())
        torch.testing.assert_close(out, v[:, :, 3:4].expand_as(out))


def test_degenerate_group_keeps_weight_one():
    q = torch.randn(1, 1, 10, 4)
    k = torch.zeros(1, 1, 10, 4)  # identical keys: every r equal
    v = torch.randn(1, 1, 10, 4)
    lay = dar.TokenLayout(ref=[(0, 5)], gen=[(5, 10)])
    for backend in BACKENDS:
        w = dar.compute_key_weights(q, k, lay, dar.DARConfig(gamma=0.5), backend=backend)
        assert bool((w == 1).all())


def test_huge_logits_stay_finite():
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 2, 16, 8) * 100, torch.randn(1, 2, 16, 8) * 100, torch.randn(1, 2, 16, 8)
    lay = dar.TokenLayout(ref=[(0, 8)], gen=[(8, 16)])
    cfg = dar.DARConfig(num_samples=4, gamma=0.5)
    out_ref, w_ref, rhat, th = dar_float64(q, k, v, lay, cfg)
    for backend in BACKENDS:
        out, w = dar.dar_attention(q, k, v, lay, cfg, backend=backend, return_weights=True)
        assert torch.isfinite(out).all() and torch.isfinite(w).all()
        stable = stable_keys(rhat, th)
        np.testing.assert_allclose(w.numpy()[stable], w_ref[stable])


def test_one_query_one_key():
    q, k, v = torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4)
    lay = dar.TokenLayout(ref=[(0, 1)], gen=[(0, 1)])
    for backend in BACKENDS:
        out, w = dar.dar_attention(q, k, v, lay, dar.DARConfig(), backend=backend, return_weights=True)
        torch.testing.assert_close(out, v)
        assert bool((w == 1).all())  # a one-key group is degenerate


def test_autograd_through_torch_backend():
    torch.manual_seed(4)
    q = torch.randn(1, 2, 12, 8, requires_grad=True)
    k = torch.randn(1, 2, 12, 8, requires_grad=True)
    v = torch.randn(1, 2, 12, 8, requires_grad=True)
    lay = dar.TokenLayout(ref=[(0, 6)], gen=[(6, 12)])
    cfg = dar.DARConfig(num_samples=4, gamma=0.5)
    out = dar.dar_attention(q, k, v, lay, cfg, backend="torch")
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = dar.dar_attention(q, k, v, lay, cfg, backend="reference")
    ref.square().sum().backward()
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad, atol=1e-5, rtol=1e-5)


def test_scoring_in_head_chunks_matches_reference(monkeypatch):
    import dar.scoring
    monkeypatch.setattr(dar.scoring, "_CHUNK_ELEMENTS", 1)  # one key head per chunk
    torch.manual_seed(5)
    q, k = torch.randn(2, 6, 30, 8), torch.randn(2, 3, 30, 8)
    mask = torch.rand(1, 6, 30, 30) > 0.2  # per-head mask rows must follow their heads
    lay = dar.TokenLayout(ref=[(0, 12)], gen=[(12, 30)])
    cfg = dar.DARConfig(num_samples=6, gamma=0.5)
    for kw in (dict(), dict(attn_mask=mask), dict(is_causal=True)):
        w_t = dar.compute_key_weights(q, k, lay, cfg, backend="torch", **kw)
        w_r = dar.compute_key_weights(q, k, lay, cfg, backend="reference", **kw)
        assert (w_r != 1).any() and torch.equal(w_t, w_r)
