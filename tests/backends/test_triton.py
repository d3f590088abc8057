"""``backend="triton"`` through the public API: weights and output against the reference backend
and the independent float64 oracle (tests/support/oracle.py), routing of unsupported inputs, and
torch.compile(fullgraph=True) through both Triton ops.

On the CPU this needs ``TRITON_INTERPRET=1`` (as CI sets); tolerances are tests/support/tolerances.py's.
"""

from __future__ import annotations

import importlib
import math
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings

import dar
from dar.backends import get_backend, select_backend
from dar.call import make_call
from tests.support.oracle import dar_float64, stable_keys
from tests.support.strategies import cases
from tests.support.tolerances import THRESHOLD_MARGIN, assert_close

attention = pytest.importorskip("dar.kernels.attention", reason="triton is not installed")
DEVICE = "cpu" if attention.INTERPRETED else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("the triton kernels need TRITON_INTERPRET=1 (CPU) or a CUDA GPU", allow_module_level=True)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KEY_ONLY_MASKS = ("none", "key_padding", "causal")  # what the triton backend takes
REFERENCE = get_backend("reference")


def _to(case, device):
    for name in ("q", "k", "v"):
        setattr(case, name, getattr(case, name).to(device))
    if case.attn_mask is not None:
        case.attn_mask = case.attn_mask.to(device)
    return case


def _run(case, backend):
    return dar.dar_attention(case.q, case.k, case.v, case.layouts, case.cfg, backend=backend,
                             return_weights=True, **case.kwargs())


def _float64_attention(case, w):
    """Step 7 in float64 with the given weights, by the reference backend."""
    cpu = [t.detach().cpu().double() for t in (case.q, case.k, case.v)]
    mask = case.attn_mask.cpu() if case.attn_mask is not None else None
    call = make_call(*cpu, case.layouts, case.cfg, mask, case.scale, case.is_causal)
    return REFERENCE.attention(call, w.cpu() if call.plan.active else None)


@settings(max_examples=40)
@given(case=cases(dtypes=DTYPES, head_dims=(16, 24), mask_kinds=KEY_ONLY_MASKS, max_len=40))
def test_triton_matches_reference_and_float64(case):
    """Every DARConfig combination (strategies.configs), GQA, per-row layouts, key padding, causal."""
    case = _to(case, DEVICE)
    out_t, w_t = _run(case, "triton")
    out_r, w_r = _run(case, "reference")
    _, w64, rhat, th = dar_float64(case.q, case.k, None, case.layouts, case.cfg, **case.kwargs())
    stable = stable_keys(rhat, th, THRESHOLD_MARGIN[case.q.dtype])
    assert w_t.dtype == torch.float32 and w_t.shape == (case.q.shape[0], case.k.shape[2])
    assert out_t.dtype == case.q.dtype and out_t.shape == case.q.shape[:3] + case.v.shape[-1:]
    np.testing.assert_allclose(w_t.cpu().numpy()[stable], w64[stable], rtol=0, atol=1e-6)
    np.testing.assert_allclose(w_t.cpu().numpy()[stable], w_r.cpu().numpy()[stable], rtol=0, atol=1e-6)
    # The output given the triton weights (a key within rounding of a threshold may flip its weight
    # legitimately; the attention must still be exact for whichever weights were chosen).
    assert_close(out_t, _float64_attention(case, w_t), case.q.dtype, "triton output")
    if bool((w_t.cpu() == w_r.cpu()).all()):
        assert_close(out_r, _float64_attention(case, w_t), case.q.dtype, "reference output")


@pytest.mark.parametrize("mode", ["key_scale", "prob_scale"])
def test_float_key_bias_broadcast_over_batch(mode):
    """An additive float mask of shape (1, 1, 1, Lk) with -inf entries is a key-only mask."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 30, 16, generator=g).to(DEVICE) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    mask = torch.randn(1, 1, 1, 30, generator=g)
    mask[..., 3] = mask[..., 17] = -math.inf
    mask = mask.to(DEVICE)
    lay = dar.TokenLayout(ref=[(0, 10), (10, 20)], gen=[(20, 30)])
    cfg = dar.DARConfig(num_samples=6, gamma=0.4, mode=mode, normalize="per_image", sampling="strided")
    out, w = dar.dar_attention(q, k, v, lay, cfg, mask, backend="triton", return_weights=True)
    out64, w64, rhat, th = dar_float64(q, k, v, lay, cfg, attn_mask=mask)
    assert stable_keys(rhat, th, THRESHOLD_MARGIN[torch.float32]).all()
    assert (w64 != 1).any()
    np.testing.assert_allclose(w.cpu().numpy(), w64, rtol=0, atol=1e-6)
    assert_close(out, out64, torch.float32)


def test_empty_gen_or_ref_rows_are_plain_attention():
    """Rows with no generated queries or no references run plain; gamma=0 skips scoring."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 2, 24, 16, generator=g).to(DEVICE) for _ in range(3))
    lays = [dar.TokenLayout(ref=[(0, 8)], gen=[(8, 24)]), dar.TokenLayout(ref=[(0, 8)]),
            dar.TokenLayout(gen=[(0, 24)])]
    for gamma in (0.0, 0.5):
        cfg = dar.DARConfig(num_samples=4, gamma=gamma, queries="all")
        out, w = dar.dar_attention(q, k, v, lays, cfg, backend="triton", return_weights=True)
        out64, w64, _, _ = dar_float64(q, k, v, lays, cfg)
        assert (w[1:] == 1).all() and (w[0] != 1).any() == (gamma > 0)
        np.testing.assert_allclose(w.cpu().numpy(), w64, rtol=0, atol=1e-6)
        assert_close(out, out64, torch.float32)


def test_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces dar_attention through dar::key_weights and
    dar::rebalanced_attention (their fake implementations) with no graph break."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 20, 4, 16, generator=g).to(DEVICE).transpose(1, 2)  # (B, L, H, D) strided
    k, v = (torch.randn(2, 2, 20, 16, generator=g).to(DEVICE) for _ in range(2))
    lays = [dar.TokenLayout(ref=[(0, 6), (6, 12)], gen=[(12, 20)]), dar.TokenLayout(ref=[(0, 6)], gen=[(14, 20)])]
    cfg = dar.DARConfig(num_samples=5, gamma=0.5, normalize="per_image")

    def f(q, k, v):
        return dar.dar_attention(q, k, v, lays, cfg, is_causal=True, backend="triton", return_weights=True)

    out_c, w_c = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    out_e, w_e = f(q, k, v)
    assert (w_e != 1).any()
    assert torch.equal(w_c, w_e) and torch.equal(out_c, out_e)


# ------------------------------------------------------------------------------------------------
# Routing: what the triton backend refuses, and what "auto" picks
# ------------------------------------------------------------------------------------------------


def _small(dtype=torch.float32, d=16, requires_grad=False):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 8, d, generator=g).to(dtype).to(DEVICE).requires_grad_(requires_grad)
               for _ in range(3))
    return q, k, v, dar.TokenLayout(ref=[(0, 4)], gen=[(4, 8)])


@pytest.mark.parametrize("mask_shape", [(1, 1, 8, 8), (1, 2, 1, 8), (8, 8)])
def test_general_mask_is_refused_by_name_and_routed_by_auto(mask_shape):
    q, k, v, lay = _small()
    mask = torch.rand(mask_shape).to(DEVICE) > 0.2
    with pytest.raises(ValueError, match="not a key-only mask"):
        dar.dar_attention(q, k, v, lay, attn_mask=mask, backend="triton")
    call = make_call(q, k, v, lay, None, mask, None, False)
    assert select_backend("auto", call).name == "torch"


def test_auto_uses_torch_on_cpu():
    q, k, v, lay = _small()
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    assert select_backend("auto", make_call(q, k, v, lay, None, None, None, False)).name == "torch"


@pytest.mark.skipif(not torch.cuda.is_available() or attention.INTERPRETED, reason="needs a CUDA GPU")
def test_auto_uses_triton_on_cuda():
    q, k, v, lay = _small()
    assert select_backend("auto", make_call(q, k, v, lay, None, None, None, False)).name == "triton"


@pytest.mark.parametrize("what,kwargs,message", [
    ("float64", dict(dtype=torch.float64), "float16, bfloat16 or float32"),
    ("head dim", dict(d=264), "exceeds 256"),
    ("autograd", dict(requires_grad=True), "forward-only"),
])
def test_unsupported_inputs_raise_when_named(what, kwargs, message):
    q, k, v, lay = _small(**kwargs)
    with pytest.raises(ValueError, match=message):
        dar.dar_attention(q, k, v, lay, backend="triton")
    assert get_backend("triton").unsupported(make_call(q, k, v, lay, None, None, None, False))


def test_key_weights_alone_accept_inputs_that_require_grad():
    """Only the attention kernel is forward-only; the weights (zero gradient) run with grad on."""
    q, k, v, lay = _small(requires_grad=True)
    cfg = dar.DARConfig(num_samples=3, gamma=0.5, sampling="strided")
    w = dar.compute_key_weights(q, k, lay, cfg, backend="triton")
    ref = dar.compute_key_weights(q.detach(), k.detach(), lay, cfg, backend="reference")
    _, _, rhat, th = dar_float64(q, k, None, lay, cfg)
    assert stable_keys(rhat, th, THRESHOLD_MARGIN[torch.float32]).all()
    assert torch.equal(w.cpu(), ref.cpu())


def test_no_grad_lifts_the_autograd_refusal():
    q, k, v, lay = _small(requires_grad=True)
    with torch.no_grad():
        out = dar.dar_attention(q, k, v, lay, backend="triton")
        assert_close(out, dar.dar_attention(q.double(), k.double(), v.double(), lay, backend="reference"),
                     torch.float32)


def test_import_without_triton_raises_import_error(monkeypatch):
    """With triton absent, importing the backend raises ImportError (the registry records it)."""
    saved = sys.modules.pop("dar.backends.triton")
    try:
        monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
        with pytest.raises(ImportError, match="triton"):
            importlib.import_module("dar.backends.triton")
    finally:
        sys.modules["dar.backends.triton"] = saved
        dar.backends.triton = saved


# ------------------------------------------------------------------------------------------------
# GPU only (not run in CI)
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available() or attention.INTERPRETED, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["key_scale", "prob_scale"])
def test_cuda_triton_matches_torch_backend(dtype, mode):
    g = torch.Generator().manual_seed(4)
    b, hq, hk, lq, d = 2, 8, 2, 1536, 128
    q = torch.randn(b, lq, hq, d, generator=g).to(dtype).cuda().transpose(1, 2)
    k = torch.randn(b, lq, hk, d, generator=g).to(dtype).cuda().transpose(1, 2)
    v = torch.randn(b, lq, hk, d, generator=g).to(dtype).cuda().transpose(1, 2)
    lay = dar.TokenLayout(ref=[(0, 256), (256, 512)], gen=[(512, 1536)])
    cfg = dar.DARConfig(gamma=0.3, mode=mode, sampling="strided")
    out_t, w_t = dar.dar_attention(q, k, v, lay, cfg, backend="triton", return_weights=True)
    case = type("C", (), {})()
    case.q, case.k, case.v, case.layouts, case.cfg, case.attn_mask, case.is_causal, case.scale = (
        q, k, v, lay, cfg, None, False, None)
    assert_close(out_t, _float64_attention(case, w_t), dtype)
