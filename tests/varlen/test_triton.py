"""The varlen triton path (packed attention kernel; Triton's interpreter on the CPU) against the float64
oracle per sequence and the reference backend."""

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings

import dar
from dar.varlen import triton_unavailable
from tests.support.oracle import stable_keys
from tests.support.tolerances import THRESHOLD_MARGIN, assert_close
from tests.support.varlen_cases import cu, oracle, varlen_cases

why = triton_unavailable()
if why is not None and not torch.cuda.is_available():
    pytest.skip(f"{why}; set TRITON_INTERPRET=1 (tests/conftest.py does without a GPU)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _to(case):
    for name in ("q", "k", "v", "cu_q", "cu_k"):
        setattr(case, name, getattr(case, name).to(DEVICE))
    return case


@settings(max_examples=15)
@given(case=varlen_cases(dtypes=(torch.float32, torch.float16), heads=[(4, 2, 8), (2, 1, 4), (3, 3, 12)], max_len=10,
                         spreads=(1.0,)))
def test_triton_varlen_matches_oracle(case):
    out_ref, w_ref, rhat, th = oracle(case)
    case = _to(case)
    out, w = dar.dar_attention_varlen(*case.args(), backend="triton", return_weights=True)
    assert out.shape == (case.q.shape[0], case.q.shape[1], case.v.shape[2]) and out.dtype == case.q.dtype
    stable = stable_keys(rhat[None], [th], THRESHOLD_MARGIN[case.q.dtype])[0]
    np.testing.assert_allclose(w.cpu().numpy()[stable], w_ref[stable], rtol=0, atol=1e-6)
    assume(stable.all())
    assert_close(out, out_ref, case.q.dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", ["key_scale", "prob_scale"])
def test_triton_varlen_omnigen2_heads(causal, mode):
    # OmniGen2's head shape (21 query heads, 7 KV heads, D = 120), three sequences of different lengths.
    lens_q, lens_k = [5, 3, 7], [6, 3, 9]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lens_q), 21, 120, generator=g), torch.randn(sum(lens_k), 7, 120, generator=g),
               torch.randn(sum(lens_k), 7, 120, generator=g))
    lays = [dar.TokenLayout(ref=[(0, 2), (2, 4)], gen=[(1, 5)]), dar.TokenLayout(),
            dar.TokenLayout(ref=[(0, 3), (4, 8)], gen=[(2, 7)])]
    cfg = dar.DARConfig(gamma=0.5, num_samples=3, mode=mode)
    args = (cu(lens_q), cu(lens_k), 7, 9, lays, cfg)
    ref = dar.dar_attention_varlen(q, k, v, *args, causal=causal, backend="reference")
    out = dar.dar_attention_varlen(*(t.to(DEVICE) for t in (q, k, v)), *(t.to(DEVICE) for t in args[:2]), *args[2:],
                                   causal=causal, backend="triton")
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-5, atol=2e-5)


def test_triton_refuses_what_it_cannot_run():
    q = torch.randn(4, 2, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        dar.dar_attention_varlen(q, q, q, cu([4]).to(DEVICE), cu([4]).to(DEVICE), 4, 4, [dar.TokenLayout()],
                                 backend="triton")
    q = torch.randn(4, 2, 8, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="forward-only"):
        dar.dar_attention_varlen(q, q, q, cu([4]).to(DEVICE), cu([4]).to(DEVICE), 4, 4, [dar.TokenLayout()],
                                 backend="triton")
