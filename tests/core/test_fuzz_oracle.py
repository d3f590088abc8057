"""Every backend against the independent float64 oracle (tests/support/oracle.py) over hypothesis cases, half
of them with NaN / +-inf inputs (docs/semantics.md, "Non-finite inputs"): dense calls, packed sequences
(`dar.dar_attention_varlen`, `dar.compute_key_weights_varlen`, the oracle applied per sequence) and user
attention kernels (`dar_attention(..., attention_fn=)`, a `dar.AttentionKernel` of each capability or a
plain callable). About 1,500 cases in all under the CI profile, weighted by cost: the triton interpreter
and FlexAttention's eager path are the slow ones, so they get fewer, and smaller, cases.

Weights are compared exactly (float32 ``1 +- gamma``) on keys whose float64 r̂ is not within rounding
of a threshold; outputs on the entries the semantics pins, when every weight is stable.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dar
from dar.backends import get_backend
from tests.support.oracle import dar_float64, pinned, stable_keys
from tests.support.strategies import NONFINITE, nonfinite_cases
from tests.support.varlen_cases import bottom_right_mask, oracle, varlen_cases
from tests.support.tolerances import THRESHOLD_MARGIN, assert_close

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN arithmetic is the point here

KEY_ONLY = ("none", "key_padding", "float_key", "causal")
ALL_MASKS = KEY_ONLY + ("bool", "float")


def _check(case, backend):
    try:
        get_backend(backend)
    except (ImportError, ValueError) as exc:  # pragma: no cover - depends on the install
        pytest.skip(f"{backend}: {exc}")
    out64, w64, rhat, th = dar_float64(case.q, case.k, case.v, case.layouts, case.cfg, **case.kwargs())
    out, w = dar.dar_attention(case.q, case.k, case.v, case.layouts, case.cfg, backend=backend,
                               return_weights=True, **case.kwargs())
    assert w.dtype == torch.float32 and torch.isfinite(w).all()
    stable = stable_keys(rhat, th, THRESHOLD_MARGIN[case.q.dtype])
    np.testing.assert_array_equal(w.numpy()[stable], w64.astype(np.float32)[stable])
    if not stable.all():
        return  # a weight that may flip changes the output legitimately
    keep = pinned(case.q, case.k, case.v, case.attn_mask, case.is_causal)
    assert_close(torch.where(torch.from_numpy(keep), out.double(), 0.0), np.where(keep, out64, 0.0),
                 case.q.dtype, what=f"{backend} pinned output")


# Cases per backend: 400 + 400 + 100 + 100 = 1,000. Measured CPU time (one thread, this repo's CI
# profile): reference ~5 s, torch ~3 s, flex ~20 s, triton interpreter ~30 s.
@settings(max_examples=400)
@given(case=nonfinite_cases(mask_kinds=ALL_MASKS))
def test_reference_fuzz(case):
    _check(case, "reference")


@settings(max_examples=400)
@given(case=nonfinite_cases(mask_kinds=ALL_MASKS))
def test_torch_fuzz(case):
    _check(case, "torch")


@settings(max_examples=100)
@given(case=nonfinite_cases(mask_kinds=KEY_ONLY, max_len=12, head_dims=(8,)))
def test_flex_fuzz(case):
    _check(case, "flex")


@settings(max_examples=100)
@given(case=nonfinite_cases(mask_kinds=KEY_ONLY, max_len=12, head_dims=(8,), dtypes=(torch.float32,)))
def test_triton_fuzz(case):
    _check(case, "triton")


# -- Packed sequences ---------------------------------------------------------------------------------

@st.composite
def nonfinite_varlen_cases(draw, **kwargs):
    """`varlen_cases` with, half of the time, one to three NaN / +-inf values put into q, k or v."""
    case = draw(varlen_cases(**kwargs))
    if draw(st.booleans()):
        return case
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(["q", "k", "v"]))
        t = getattr(case, name).clone()
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(NONFINITE))
        setattr(case, name, t)
    return case


def _packed_pinned(case) -> np.ndarray:
    """(total_q, Hq, Dv) bool: the pinned entries, sequence by sequence (oracle.pinned on each)."""
    cq, ck = case.cu_q.tolist(), case.cu_k.tolist()
    parts = []
    for n in range(len(case.layouts)):
        qn, kn, vn = (t[a[n]:a[n + 1]].transpose(0, 1)[None] for t, a in ((case.q, cq), (case.k, ck), (case.v, ck)))
        mask = bottom_right_mask(qn.shape[2], kn.shape[2])[None, None] if case.causal else None
        parts.append(pinned(qn, kn, vn, mask)[0].transpose(1, 0, 2))
    return np.concatenate(parts)


def _check_packed(case, backend):
    try:
        get_backend(backend)
    except (ImportError, ValueError) as exc:  # pragma: no cover - depends on the install
        pytest.skip(f"{backend}: {exc}")
    out64, w64, rhat, th = oracle(case)
    out, w = dar.dar_attention_varlen(*case.args(), backend=backend, return_weights=True)
    w_only = dar.compute_key_weights_varlen(*case.args(with_v=False), backend=backend)
    assert w.dtype == torch.float32 and torch.isfinite(w).all()
    torch.testing.assert_close(w_only, w, rtol=0, atol=0)
    stable = stable_keys(rhat[None], [th], THRESHOLD_MARGIN[case.q.dtype])[0]
    np.testing.assert_array_equal(w.numpy()[stable], w64.astype(np.float32)[stable])
    if not stable.all():
        return
    keep = _packed_pinned(case)
    assert_close(torch.where(torch.from_numpy(keep), out.double(), 0.0), np.where(keep, out64, 0.0),
                 case.q.dtype, what=f"{backend} packed pinned output")


SMALL_HEADS = [(4, 2, 8), (2, 1, 4), (3, 3, 12)]


@settings(max_examples=80)
@given(case=nonfinite_varlen_cases(heads=SMALL_HEADS + [(21, 7, 120)]))
def test_reference_packed_fuzz(case):
    _check_packed(case, "reference")


@settings(max_examples=80)
@given(case=nonfinite_varlen_cases(heads=SMALL_HEADS + [(21, 7, 120)]))
def test_torch_packed_fuzz(case):
    _check_packed(case, "torch")


@settings(max_examples=12)
@given(case=nonfinite_varlen_cases(heads=SMALL_HEADS, max_len=8, dtypes=(torch.float32,)))
def test_triton_packed_fuzz(case):
    _check_packed(case, "triton")


# -- User attention kernels (attention_fn) -------------------------------------------------------------

def sdpa_kernel(q, k, v, attn_mask=None, scale=None, is_causal=False):
    """A user's kernel with SDPA's contract (GQA included), as `attention_fn` takes it."""
    sdpa_kernel.calls += 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, is_causal=is_causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


sdpa_kernel.calls = 0

# Every capability the delegate adapts to: no additive mask (prob_scale takes a head-dim column),
# head dims padded to a multiple of 8, q/k/v sharing one head dim, float32 upcast, and a bare callable.
KERNELS = [
    sdpa_kernel,
    dar.AttentionKernel(sdpa_kernel, name="sdpa"),
    dar.AttentionKernel(sdpa_kernel, name="no-bias", takes_bias=False),
    dar.AttentionKernel(sdpa_kernel, name="flash-like", takes_bias=False, head_dim_multiple=8, same_head_dims=True),
    dar.AttentionKernel(sdpa_kernel, name="aligned-bias", head_dim_multiple=8, same_head_dims=True, upcast=True),
]


@settings(max_examples=150)
@given(case=nonfinite_cases(mask_kinds=ALL_MASKS), kernel=st.sampled_from(KERNELS))
def test_attention_fn_fuzz(case, kernel):
    out64, w64, rhat, th = dar_float64(case.q, case.k, case.v, case.layouts, case.cfg, **case.kwargs())
    before = sdpa_kernel.calls
    out, w = dar.dar_attention(case.q, case.k, case.v, case.layouts, case.cfg, backend="torch",
                               return_weights=True, attention_fn=kernel, **case.kwargs())
    assert sdpa_kernel.calls > before, "the call must run on the user's kernel"
    assert out.shape == case.q.shape[:3] + case.v.shape[-1:] and out.dtype == case.q.dtype
    stable = stable_keys(rhat, th, THRESHOLD_MARGIN[case.q.dtype])
    np.testing.assert_array_equal(w.numpy()[stable], w64.astype(np.float32)[stable])
    if not stable.all():
        return
    keep = pinned(case.q, case.k, case.v, case.attn_mask, case.is_causal)
    assert_close(torch.where(torch.from_numpy(keep), out.double(), 0.0), np.where(keep, out64, 0.0),
                 case.q.dtype, what=f"attention_fn {getattr(kernel, 'name', 'callable')} pinned output")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_quantile_threshold_on_an_element_matches_the_oracle(backend):
    # Found by the packed fuzz: 6 keys, tau_high 0.6 puts t_hi exactly on the 4th-smallest r̂
    # (position 0.6 * 5 = 3 in float64). Computing the position in float32 (0.6f * 5 = 3.0000001)
    # moved t_hi just above that element and took its boost away.
    cfg = dar.DARConfig(num_samples=1, gamma=0.15, tau_high=0.6, tau_low=0.0, thresholds="quantile")
    lay = dar.TokenLayout(ref=[(0, 6)], gen=[(0, 1)])
    hits = 0
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        q, k = torch.randn(1, 4, 2, 8, generator=g) * 3, torch.randn(1, 2, 6, 8, generator=g) * 3
        _, w64, rhat, th = dar_float64(q, k, None, lay, cfg)
        w = dar.compute_key_weights(q, k, lay, cfg, backend=backend)
        np.testing.assert_array_equal(w.numpy(), w64.astype(np.float32), err_msg=f"seed {seed}")
        hits += int((rhat[0] == th[0][0][1]).any())
    assert hits >= 6  # the threshold lands on an element in these cases
