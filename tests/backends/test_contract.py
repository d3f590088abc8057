"""Properties every backend shares, each pinned on every backend that can run on the CPU: exact
float32 weights, float64 precision, weights outside autograd, no_grad inputs that require grad, and
reference ranges that overlap the generation ranges, indifference to torch.autocast (docs/semantics.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dar
from dar.backends import get_backend
from dar.call import make_call
from dar.scoring import sampled_attention_mass, weights_from_mass
from tests.support.oracle import dar_float64, stable_keys
from tests.support.tolerances import assert_close

BACKENDS = ["reference", "torch", "flex", "triton"]


def _available(name, q):
    try:
        impl = get_backend(name)
    except (ImportError, ValueError) as exc:  # pragma: no cover - depends on the install
        pytest.skip(f"{name} backend unavailable: {exc}")
    return impl


def _case(dtype=torch.float32, seed=0, lq=24, lk=24):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, lq, 8, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(1, 1, lk, 8, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(1, 1, lk, 8, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_are_exactly_float32_one_plus_minus_gamma(backend):
    # gamma = 0.9: 1 + (float32(0.1) - 1) = 0.100000024, not float32(1 - 0.9) = 0.1000000015.
    q, k, v = _case()
    _available(backend, q)
    lay = dar.TokenLayout(ref=[(0, 12)], gen=[(12, 24)])
    cfg = dar.DARConfig(gamma=0.9, num_samples=6, sampling="strided")
    w = dar.compute_key_weights(q, k, lay, cfg, backend=backend)
    values = set(w.flatten().tolist())
    boost, damp = float(np.float32(1 + 0.9)), float(np.float32(1 - 0.9))
    assert damp in values and boost in values, values
    assert values <= {boost, damp, 1.0}, values


@pytest.mark.parametrize("mode", ["prob_scale", "key_scale"])
@pytest.mark.parametrize("backend", ["reference", "torch", "flex"])
def test_float64_output_within_float64_tolerance(backend, mode):
    # ln w (prob_scale) and w (key_scale) must be applied in float64 for float64 inputs.
    q, k, v = _case(torch.float64, seed=1)
    lay = dar.TokenLayout(ref=[(0, 12)], gen=[(12, 24)])
    cfg = dar.DARConfig(gamma=0.5, num_samples=6, mode=mode)
    out_ref, w_ref, rhat, th = dar_float64(q, k, v, lay, cfg)
    assert stable_keys(rhat, th, 1e-9).all() and (w_ref != 1).any()
    out = dar.dar_attention(q, k, v, lay, cfg, backend=backend)
    assert_close(out, out_ref, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_weights_never_require_grad(backend):
    q, k, _ = (t.requires_grad_() for t in _case())
    _available(backend, q)
    lay = dar.TokenLayout(ref=[(0, 12)], gen=[(12, 24)])
    w = dar.compute_key_weights(q, k, lay, dar.DARConfig(gamma=0.5), backend=backend)
    assert not w.requires_grad and w.grad_fn is None


def test_flex_under_no_grad_takes_inputs_that_require_grad():
    q, k, v = _case()
    lay = dar.TokenLayout(ref=[(0, 12)], gen=[(12, 24)])
    cfg = dar.DARConfig(gamma=0.5)
    expected = dar.dar_attention(q, k, v, lay, cfg, backend="flex")
    for t in (q, k, v):
        t.requires_grad_()
    with torch.no_grad():
        out = dar.dar_attention(q, k, v, lay, cfg, backend="flex")
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lq", [24, 10])
def test_reference_ranges_may_overlap_generation_ranges(backend, lq):
    # ref indexes keys and gen indexes queries: the same number may name different tokens (Lq != Lk,
    # cached keys) or, in self-attention, a token whose key is a reference and whose query is rebalanced.
    q, k, v = _case(seed=2, lq=lq)
    _available(backend, q)
    lay = dar.TokenLayout(ref=[(0, 14)], gen=[(4, 10)])
    cfg = dar.DARConfig(gamma=0.5, num_samples=4)
    out_ref, w_ref, rhat, th = dar_float64(q, k, v, lay, cfg)
    assert (w_ref != 1).any() and stable_keys(rhat, th).all()
    out, w = dar.dar_attention(q, k, v, lay, cfg, backend=backend, return_weights=True)
    np.testing.assert_array_equal(w.numpy(), w_ref.astype(np.float32))
    assert_close(out, out_ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_changes_nothing(backend, dtype):
    # Models (BAGEL) call attention inside torch.autocast(bfloat16), which recasts float32 matmuls.
    # DAR's functions run with autocast off: weights, output and its dtype are those outside autocast.
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(1, 2, 16, 16, generator=g, dtype=torch.float64) * 2).to(dtype)
    k = torch.randn(1, 1, 48, 16, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(1, 1, 48, 16, generator=g, dtype=torch.float64).to(dtype)
    _available(backend, q)
    lay = dar.TokenLayout(ref=[(0, 48)], gen=[(0, 16)])
    cfg = dar.DARConfig(gamma=0.5, num_samples=4)
    call = make_call(q, k, None, lay, cfg, None, None, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # The case is sensitive: autocast'ed scoring gives other weights than the plain one.
        cast = weights_from_mass(sampled_attention_mass(call), call.plan.tensors(q.device).key_groups(48), None,
                                 call.plan.num_groups, cfg)[0]
        w_cast = dar.compute_key_weights(q, k, lay, cfg, backend=backend)
        out_cast, w_cast2 = dar.dar_attention(q, k, v, lay, cfg, backend=backend, return_weights=True)
    w = dar.compute_key_weights(q, k, lay, cfg, backend=backend)
    out = dar.dar_attention(q, k, v, lay, cfg, backend=backend)
    assert not torch.equal(cast, w)
    assert torch.equal(w_cast, w) and torch.equal(w_cast2, w)
    assert out_cast.dtype == dtype and torch.equal(out_cast, out)
