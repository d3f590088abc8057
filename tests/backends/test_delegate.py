"""The delegate path (dar.delegate): DAR through a plain-attention kernel, and the torch backend on it.

Kernels here are SDPA wrapped to behave like kernels with fewer capabilities (no additive mask,
aligned head dims, equal q/k/v head dims), counting their calls. Every one is checked against the
independent float64 oracle (tests/support/oracle.py) over hypothesis cases.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import dar
from dar import delegate
from tests.support.oracle import dar_float64, stable_keys
from tests.support.strategies import cases
from tests.support.tolerances import OUTPUT_TOL, THRESHOLD_MARGIN, assert_close, key_scale_bound


class Counting:
    """SDPA as a kernel with restricted capabilities; records every call's head dims and mask."""

    def __init__(self, takes_bias=True, multiple=1, same=False, max_head_dim=None, upcast=False):
        self.calls = []
        self.kernel = dar.AttentionKernel(self, name="counting", takes_bias=takes_bias, head_dim_multiple=multiple,
                                          same_head_dims=same, max_head_dim=max_head_dim, upcast=upcast)

    def __call__(self, q, k, v, attn_mask=None, scale=None, is_causal=False):
        self.calls.append(dict(d=q.shape[-1], dv=v.shape[-1], lq=q.shape[2], mask=attn_mask, scale=scale))
        assert scale is not None and scale > 0, "DAR passes an explicit, positive scale"
        if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
            attn_mask = attn_mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=True)


KERNELS = {
    "sdpa-like": dict(),
    "no-bias": dict(takes_bias=False),
    "flash-like": dict(takes_bias=False, multiple=8, same=True),
    "bias-aligned": dict(multiple=8, same=True),
}


def _calls_allowed(case) -> int:
    gen = case.cfg.queries == "all"
    return 1 if gen else 2


@pytest.mark.parametrize("kind", ["flash-like", "bias-aligned"])  # the column and the bias forms, padded
@given(case=cases())
def test_delegate_matches_float64_oracle(kind, case):
    counting = Counting(**KERNELS[kind])
    out_ref, w_ref, rhat, th = dar_float64(case.q, case.k, case.v, case.layouts, case.cfg, **case.kwargs())
    out, w = dar.dar_attention(case.q, case.k, case.v, case.layouts, case.cfg, backend="torch",
                               return_weights=True, attention_fn=counting.kernel, **case.kwargs())
    assert 1 <= len(counting.calls) <= _calls_allowed(case)
    if not KERNELS[kind].get("takes_bias", True) and case.attn_mask is None:
        assert all(c["mask"] is None for c in counting.calls), "no bias handed to a kernel that takes none"
    stable = stable_keys(rhat, th, THRESHOLD_MARGIN[case.q.dtype])
    np.testing.assert_allclose(w.numpy()[stable], w_ref[stable], rtol=0, atol=1e-6)
    assume(stable.all())
    assert_close(out, out_ref, case.q.dtype)


def _case(seed=0, dtype=torch.float32, b=2, h=2, lq=24, lk=24, d=8, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, h, lq, d, generator=g, dtype=torch.float64) * spread).to(dtype)
    k = (torch.randn(b, h, lk, d, generator=g, dtype=torch.float64) * spread).to(dtype)
    v = torch.randn(b, h, lk, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


LAYOUT = dar.TokenLayout(ref=[(12, 18), (18, 24)], gen=[(2, 12)])
CAUSAL_LAYOUT = dar.TokenLayout(ref=[(1, 6), (6, 12)], gen=[(12, 22)])  # references before the queries


@pytest.mark.parametrize("mode", ["key_scale", "prob_scale"])
@pytest.mark.parametrize("queries", ["generation", "all"])
def test_rebalanced_and_plain_rows_take_at_most_two_calls(mode, queries):
    q, k, v = _case()
    cfg = dar.DARConfig(num_samples=6, gamma=0.5, mode=mode, queries=queries)
    for kind, caps in KERNELS.items():
        counting = Counting(**caps)
        dar.dar_attention(q, k, v, LAYOUT, cfg, backend="torch", attention_fn=counting.kernel)
        # Two calls for split rows (K' or the ln w bias on the rebalanced ones); one for every row, and
        # for the extra-column form of prob_scale (kernels without a bias).
        column = mode == "prob_scale" and not caps.get("takes_bias", True)
        assert len(counting.calls) == (1 if queries == "all" or column else 2), (kind, counting.calls)
        # gamma = 0: plain attention, one call with the caller's arguments.
        counting = Counting(**caps)
        dar.dar_attention(q, k, v, LAYOUT, cfg.replace(gamma=0.0), backend="torch", attention_fn=counting.kernel)
        assert len(counting.calls) == 1 and counting.calls[0]["d"] == 8 and counting.calls[0]["mask"] is None


def test_prob_scale_uses_a_key_bias_or_an_aligned_column():
    q, k, v = _case()
    cfg = dar.DARConfig(num_samples=6, gamma=0.5, mode="prob_scale", queries="all")
    bias = Counting()
    dar.dar_attention(q, k, v, LAYOUT, cfg, backend="torch", attention_fn=bias.kernel)
    (c,) = bias.calls
    assert c["d"] == 8 and c["mask"].shape == (2, 1, 1, 24) and c["mask"].is_floating_point()
    # A mask that varies over query rows: ln w is not added to it (that would be a new Lq x Lk tensor).
    rows_mask = torch.rand(2, 1, 24, 24, generator=torch.Generator().manual_seed(5)) > 0.2
    col = Counting()
    dar.dar_attention(q, k, v, LAYOUT, cfg, attn_mask=rows_mask, backend="torch", attention_fn=col.kernel)
    (c,) = col.calls
    assert c["d"] == 9 and c["mask"].dtype == torch.bool and torch.equal(c["mask"], rows_mask)
    flash = Counting(**KERNELS["flash-like"])
    dar.dar_attention(q, k, v, LAYOUT, cfg, backend="torch", attention_fn=flash.kernel)
    (c,) = flash.calls
    assert (c["d"], c["dv"]) == (16, 16) and c["mask"] is None  # D + 1 padded to the kernel's multiple of 8


def test_torch_backend_prob_scale_keeps_sdpa_head_dims():
    # prob_scale used to widen q and k to D + 1 (and pad to 8) without v: SDPA's flash kernels refuse
    # unequal head dims and the call fell back to the math kernel. Now it is a key bias, D unchanged.
    q, k, v = _case()
    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in str(func):
                seen.append((str(func), args[0].shape[-1], args[2].shape[-1]))
            return func(*args, **(kwargs or {}))

    for queries in ("generation", "all"):
        seen.clear()
        cfg = dar.DARConfig(num_samples=6, gamma=0.5, mode="prob_scale", queries=queries)
        with Spy():
            dar.dar_attention(q, k, v, LAYOUT, cfg, backend="torch")
        assert seen and all(d == dv == 8 for _, d, dv in seen), seen
        assert all("flash" in name for name, _, _ in seen), seen  # SDPA's CPU flash kernel, not math


def test_scaled_keys_is_one_pass_and_rounds_once():
    q, k, v = _case(dtype=torch.bfloat16)
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # (B, L, H, D) memory, as diffusers passes it
    w = torch.full((2, 24), float(np.float32(1 - 0.9)))  # bf16(w) != w: rounding w first would show
    ops = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Log():
        ks = delegate.scaled_keys(k, w)
    assert [o for o in ops if "mul" in o or "copy" in o] == ["aten.mul.out"], ops
    assert ks.dtype == torch.bfloat16 and ks.stride() == k.stride()
    exact = (k.float() * w[:, None, :, None]).to(torch.bfloat16)
    assert torch.equal(ks, exact)
    assert not torch.equal(ks, k * w[:, None, :, None].to(torch.bfloat16))


@pytest.mark.parametrize("mode", ["key_scale", "prob_scale"])
@pytest.mark.parametrize("queries", ["generation", "all"])
def test_negative_scale_with_causal_is_finite_and_exact(mode, queries):
    # Issue 15 item 5: PyTorch's CPU SDPA returns NaN rows for is_causal with a negative scale.
    q, k, v = _case(seed=3)
    cfg = dar.DARConfig(num_samples=6, gamma=0.5, mode=mode, queries=queries)
    out_ref, w_ref, rhat, th = dar_float64(q, k, v, CAUSAL_LAYOUT, cfg, scale=-0.4, is_causal=True)
    assert stable_keys(rhat, th, 1e-3).all() and (w_ref != 1).any()
    for gamma in (cfg.gamma, 0.0):
        out = dar.dar_attention(q, k, v, CAUSAL_LAYOUT, cfg.replace(gamma=gamma), scale=-0.4, is_causal=True,
                                backend="torch")
        assert torch.isfinite(out).all()
        if gamma:
            assert_close(out, out_ref, torch.float32)


@given(case=cases(mask_kinds=("none", "key_padding", "causal")))
def test_negative_scale_matches_oracle(case):
    cfg = case.cfg
    kw = {**case.kwargs(), "scale": -0.3}
    out_ref, w_ref, rhat, th = dar_float64(case.q, case.k, case.v, case.layouts, cfg, **kw)
    out, w = dar.dar_attention(case.q, case.k, case.v, case.layouts, cfg, backend="torch", return_weights=True, **kw)
    assume(stable_keys(rhat, th, THRESHOLD_MARGIN[case.q.dtype]).all())
    assert_close(out, out_ref, case.q.dtype)


@pytest.mark.parametrize("seed", [0, 6, 8, 23, 28])  # no key near a threshold; bf16 K' failed 6 and 28
def test_bf16_key_scale_error(seed):
    # Issue 15 item 8: large logits (spread 3) and gamma = 0.9, where bf16(w ⊙ K) moves logits most.
    q, k, v = _case(seed=seed, dtype=torch.bfloat16, b=1, h=2, lq=20, lk=20, d=12, spread=3.0)
    lay = dar.TokenLayout(ref=[(0, 8)], gen=[(8, 20)])
    cfg = dar.DARConfig(num_samples=6, gamma=0.9, queries="all")
    out_ref, w_ref, rhat, th = dar_float64(q, k, v, lay, cfg)
    assert stable_keys(rhat, th, THRESHOLD_MARGIN[torch.bfloat16]).all() and (w_ref != 1).any()
    atol, rtol = OUTPUT_TOL[torch.bfloat16]
    # On CPU the torch backend computes the rebalanced attention in float32: plain bf16 tolerance.
    out, w = dar.dar_attention(q, k, v, lay, cfg, backend="torch", return_weights=True)
    assert_close(out, out_ref, torch.bfloat16)
    # Where K' is rounded to bf16 (GPU kernels: upcast=False), the error stays within the documented bound.
    rounded = Counting(upcast=False)
    out_r = dar.dar_attention(q, k, v, lay, cfg, backend="torch", attention_fn=rounded.kernel)
    bound = key_scale_bound(q, k, v, w, q.shape[-1] ** -0.5, 2.0 ** -8)
    err = (out_r.double() - torch.as_tensor(out_ref)).abs()
    assert (err <= atol + rtol * torch.as_tensor(out_ref).abs() + bound).all()


def test_float64_prob_scale_within_float64_tolerance():
    # Issue 15 item 7 (torch part): ln w in float64 for float64 inputs, every form of the call.
    q, k, v = _case(seed=1, dtype=torch.float64, spread=2.0)
    for queries in ("generation", "all"):
        for causal in (False, True):
            cfg = dar.DARConfig(num_samples=6, gamma=0.5, mode="prob_scale", queries=queries)
            lay = CAUSAL_LAYOUT if causal else LAYOUT
            out_ref, w_ref, rhat, th = dar_float64(q, k, v, lay, cfg, is_causal=causal)
            assert stable_keys(rhat, th, 1e-9).all() and (w_ref != 1).any()
            for kernel in (None, Counting(takes_bias=False).kernel):
                out = dar.dar_attention(q, k, v, lay, cfg, is_causal=causal, backend="torch", attention_fn=kernel)
                assert_close(out, out_ref, torch.float64)


def test_kernel_that_cannot_express_a_call_falls_back_once_with_a_warning():
    q, k, v = _case()
    cfg = dar.DARConfig(num_samples=6, gamma=0.5, mode="prob_scale")
    small = Counting(takes_bias=False, max_head_dim=8)  # prob_scale needs D + 1 = 9 columns
    expected = dar.dar_attention(q, k, v, LAYOUT, cfg, backend="torch")
    with pytest.warns(UserWarning, match=r"'counting' cannot run this call .*head dims up to 8.*torch backend"):
        out = dar.dar_attention(q, k, v, LAYOUT, cfg, backend="torch", attention_fn=small.kernel)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: no second warning
        dar.dar_attention(q, k, v, LAYOUT, cfg, backend="torch", attention_fn=small.kernel)
    assert not small.calls
    torch.testing.assert_close(out, expected)
    # key_scale needs no extra column: the same kernel runs it.
    dar.dar_attention(q, k, v, LAYOUT, cfg.replace(mode="key_scale"), backend="torch", attention_fn=small.kernel)
    assert len(small.calls) == 2


def test_attention_kernel_arguments_are_checked():
    with pytest.raises(TypeError, match="fn must be callable"):
        dar.AttentionKernel(3)
    with pytest.raises(ValueError, match="head_dim_multiple"):
        dar.AttentionKernel(F.scaled_dot_product_attention, head_dim_multiple=0)
    with pytest.raises(ValueError, match="max_head_dim"):
        dar.AttentionKernel(F.scaled_dot_product_attention, max_head_dim=True)
    q, k, v = _case()
    with pytest.raises(TypeError, match="attention_fn must be callable"):
        dar.dar_attention(q, k, v, LAYOUT, attention_fn="flash")


def test_bare_callable_and_strided_inputs():
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _case(seed=2))  # (B, L, H, D) views
    cfg = dar.DARConfig(num_samples=6, gamma=0.5)
    out = dar.dar_attention(q, k, v, LAYOUT, cfg, backend="torch", attention_fn=F.scaled_dot_product_attention)
    ref = dar.dar_attention(q, k, v, LAYOUT, cfg, backend="reference")
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-6)
    assert math.isfinite(float(out.abs().max()))


def _flash_layout(q, k, v, attn_mask=None, scale=None, is_causal=False):
    """A kernel that computes the right attention but returns flash-attn's (B, L, H, D) layout."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, is_causal=is_causal,
                                          enable_gqa=True).transpose(1, 2).contiguous()


@pytest.mark.parametrize("queries", ["generation", "all"])  # the split path (two kernel calls) and one call
def test_kernel_output_in_another_layout_is_refused_naming_the_kernel(queries):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=g) for _ in range(3))
    lay = dar.TokenLayout(ref=[(0, 12)], gen=[(12, 24)])
    cfg = dar.DARConfig(num_samples=4, gamma=0.5, queries=queries)
    with pytest.raises(ValueError, match=r"'_flash_layout' returned shape \(1, (12|24), 2, 16\).*flash-attn"):
        dar.dar_attention(q, k, v, lay, cfg, backend="torch", attention_fn=_flash_layout)
    with pytest.raises(ValueError, match=r"'_flash_layout' returned shape \(1, 24, 2, 16\)"):  # plain call
        dar.dar_attention(q, k, v, lay, cfg.replace(gamma=0.0), backend="torch", attention_fn=_flash_layout)


def test_kernel_output_dtype_device_and_type_are_checked():
    q, k, v = _case()
    cfg = dar.DARConfig(num_samples=6, gamma=0.5)

    def doubles(q, k, v, attn_mask=None, scale=None, is_causal=False):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=True).double()

    def with_lse(q, k, v, attn_mask=None, scale=None, is_causal=False):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=True), None

    with pytest.raises(ValueError, match=r"'doubles' returned .*torch.float64.*torch.float32"):
        dar.dar_attention(q, k, v, LAYOUT, cfg, backend="torch", attention_fn=doubles)
    with pytest.raises(TypeError, match=r"'with_lse' returned tuple"):
        dar.dar_attention(q, k, v, LAYOUT, cfg, backend="torch", attention_fn=with_lse)
