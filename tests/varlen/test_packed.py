"""Packed (varlen) DAR: every backend against the float64 oracle applied per sequence, agreement with
`dar_attention` on the same data padded, and argument validation."""

import numpy as np
import pytest
import torch
from hypothesis import assume, given, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import dar
from tests.support.oracle import stable_keys
from tests.support.tolerances import THRESHOLD_MARGIN, assert_close
from tests.support.varlen_cases import bottom_right_mask, cu, oracle, varlen_cases

BACKENDS = ["reference", "torch"]


def _stable(case, rhat, th):
    return stable_keys(rhat[None], [th], THRESHOLD_MARGIN[case.q.dtype])[0]


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=varlen_cases())
def test_varlen_matches_float64_oracle(backend, case):
    out_ref, w_ref, rhat, th = oracle(case)
    stable = _stable(case, rhat, th)
    out, w = dar.dar_attention_varlen(*case.args(), backend=backend, return_weights=True)
    assert w.dtype == torch.float32 and w.shape == (case.k.shape[0],)
    assert out.dtype == case.q.dtype and out.shape == (case.q.shape[0], case.q.shape[1], case.v.shape[2])
    np.testing.assert_allclose(w.numpy()[stable], w_ref[stable], rtol=0, atol=1e-6)
    w_only = dar.compute_key_weights_varlen(*case.args(with_v=False), backend=backend)
    assert torch.equal(w_only, w)
    assume(stable.all())  # a weight flipped at a threshold changes the output legitimately
    assert_close(out, out_ref, case.q.dtype)


# Unit-scale inputs: SDPA rounds the rebalanced keys (k * w) to the input dtype, which the dtype's
# output tolerance covers for logits of moderate size.
@given(case=varlen_cases(dtypes=(torch.float16, torch.bfloat16), heads=[(4, 2, 8), (21, 7, 120)], spreads=(1.0,)))
def test_varlen_torch_low_precision(case):
    out_ref, w_ref, rhat, th = oracle(case)
    out, w = dar.dar_attention_varlen(*case.args(), backend="torch", return_weights=True)
    w_r = dar.compute_key_weights_varlen(*case.args(with_v=False), backend="reference")
    stable = _stable(case, rhat, th)
    np.testing.assert_allclose(w.numpy()[stable], w_r.numpy()[stable], rtol=0, atol=1e-6)
    assume(bool((w == torch.as_tensor(w_ref, dtype=torch.float32)).all()))
    assert_close(out, out_ref, case.q.dtype)


def _padded(case):
    """The same data as a dense batch: rows padded at the end, a mask removing padded keys."""
    n, lq, lk = len(case.lens_q), case.max_q, case.max_k
    hq, hk, d, dv = case.q.shape[1], case.k.shape[1], case.q.shape[2], case.v.shape[2]
    q = case.q.new_zeros(n, hq, lq, d)
    k = case.k.new_zeros(n, hk, lk, d)
    v = case.v.new_zeros(n, hk, lk, dv)
    mask = torch.zeros(n, 1, lq, lk, dtype=torch.bool)
    cq, ck = case.cu_q.tolist(), case.cu_k.tolist()
    for b, (a, e) in enumerate(zip(case.lens_q, case.lens_k)):
        q[b, :, :a] = case.q[cq[b]:cq[b + 1]].transpose(0, 1)
        k[b, :, :e] = case.k[ck[b]:ck[b + 1]].transpose(0, 1)
        v[b, :, :e] = case.v[ck[b]:ck[b + 1]].transpose(0, 1)
        mask[b, 0, :a, :e] = bottom_right_mask(a, e) if case.causal else True
        mask[b, 0, a:, :e] = True  # padded query rows: anything, they are dropped
    return q, k, v, mask


@given(case=varlen_cases(heads=[(4, 2, 8), (21, 7, 120)]), backend=st.sampled_from(BACKENDS))
def test_varlen_equals_dense_on_padded_data(case, backend):
    q, k, v, mask = _padded(case)
    out_d, w_d = dar.dar_attention(q, k, v, case.layouts, case.cfg, mask, case.scale, backend=backend,
                                   return_weights=True)
    out, w = dar.dar_attention_varlen(*case.args(), backend=backend, return_weights=True)
    cq, ck = case.cu_q.tolist(), case.cu_k.tolist()
    for b, (a, e) in enumerate(zip(case.lens_q, case.lens_k)):
        assert torch.equal(w[ck[b]:ck[b + 1]], w_d[b, :e])  # the same statistics in the same order
        assert_close(out[cq[b]:cq[b + 1]], out_d[b, :, :a].transpose(0, 1).double(), case.q.dtype)


@given(case=varlen_cases(max_len=8), backend=st.sampled_from(BACKENDS))
def test_varlen_gamma_zero_is_plain_attention(case, backend):
    case.cfg = case.cfg.replace(gamma=0.0)
    out, w = dar.dar_attention_varlen(*case.args(), backend=backend, return_weights=True)
    assert bool((w == 1).all())
    assert_close(out, oracle(case)[0], case.q.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_empty_sequences(backend, causal):
    # Zero-length sequences are legal in flash-attn; a query without keys outputs zeros.
    lens_q, lens_k = [3, 0, 4, 2], [5, 2, 0, 3]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(sum(lens_q), 4, 8, generator=g), torch.randn(sum(lens_k), 2, 8, generator=g),
               torch.randn(sum(lens_k), 2, 8, generator=g))
    lays = [dar.TokenLayout(ref=[(0, 3)], gen=[(0, 3)]), dar.TokenLayout(ref=[(0, 2)]), dar.TokenLayout(gen=[(0, 4)]),
            dar.TokenLayout(ref=[(0, 2)], gen=[(1, 2)])]
    cfg = dar.DARConfig(gamma=0.5, num_samples=2)
    out, w = dar.dar_attention_varlen(q, k, v, cu(lens_q), cu(lens_k), 4, 5, lays, cfg, causal=causal,
                                      backend=backend, return_weights=True)
    assert torch.equal(out[3:7], torch.zeros(4, 4, 8))  # sequence 2 has no keys
    ref = dar.dar_attention_varlen(q, k, v, cu(lens_q), cu(lens_k), 4, 5, lays, cfg, causal=causal,
                                   backend="reference")
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    assert w.shape == (10,) and bool((w[5:7] == 1).all())  # sequence 1 has no generated-image queries
    assert bool((w[:5] != 1).any())


def test_causal_rows_without_keys_output_zero():
    # Lq > Lk under the bottom-right rule: the first Lq - Lk queries see no key.
    q, k, v = torch.randn(6, 2, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    for backend in BACKENDS:
        out = dar.dar_attention_varlen(q, k, v, cu([6]), cu([2]), 6, 2, [dar.TokenLayout(ref=[(0, 1)], gen=[(0, 6)])],
                                       causal=True, backend=backend)
        assert torch.equal(out[:4], torch.zeros(4, 2, 8)) and out[4:].abs().sum() > 0


Q, K, V = torch.randn(7, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 6)
CQ, CK = cu([3, 4]), cu([4, 5])
LAYS = [dar.TokenLayout(ref=[(0, 2)], gen=[(2, 3)]), dar.TokenLayout(ref=[(0, 3)], gen=[(0, 4)])]


def _call(**over):
    a = dict(q=Q, k=K, v=V, cu_seqlens_q=CQ, cu_seqlens_k=CK, max_seqlen_q=4, max_seqlen_k=5, layouts=LAYS)
    a.update(over)
    return dar.dar_attention_varlen(**a)


@pytest.mark.parametrize("over, exc, words", [
    (dict(q=Q[None]), ValueError, "q must be 3-D"),
    (dict(q=Q.long()), TypeError, "q must be float"),
    (dict(k=K.double()), TypeError, "k has dtype"),
    (dict(v=None), TypeError, "v must be"),
    (dict(v=V[:8]), ValueError, "v must have shape"),
    (dict(k=torch.randn(9, 3, 8), v=torch.randn(9, 3, 6)), ValueError, "multiple"),
    (dict(k=torch.randn(9, 2, 4)), ValueError, "head dims"),
    (dict(cu_seqlens_q=CQ.long()), TypeError, "cu_seqlens_q must be an int32"),
    (dict(cu_seqlens_k=[0, 4, 9]), TypeError, "cu_seqlens_k must be a torch.Tensor"),
    (dict(cu_seqlens_q=CQ[None]), ValueError, "cu_seqlens_q must be 1-D"),
    (dict(cu_seqlens_k=cu([4, 3, 2])), ValueError, "N \\+ 1"),
    (dict(cu_seqlens_q=torch.tensor([1, 3, 7], dtype=torch.int32)), ValueError, r"cu_seqlens_q\[0\]"),
    (dict(cu_seqlens_q=torch.tensor([0, 5, 4], dtype=torch.int32)), ValueError, "non-decreasing"),
    (dict(cu_seqlens_k=cu([4, 4])), ValueError, r"cu_seqlens_k\[-1\]"),
    (dict(max_seqlen_q=3, layouts=[LAYS[0], dar.TokenLayout(gen=[(0, 3)])]), ValueError, "max_seqlen_q = 3"),
    (dict(max_seqlen_k=4.0), TypeError, "max_seqlen_k must be an int"),
    (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k must be >= 0"),
    (dict(layouts=LAYS[:1]), ValueError, "N = 2"),
    (dict(layouts=[LAYS[0], "x"]), TypeError, r"layouts\[1\]"),
    (dict(layouts={"a": 1}), TypeError, "layouts must be"),
    (dict(layouts=[LAYS[0], dar.TokenLayout(ref=[(0, 6)])]), ValueError, r"layouts\[1\].ref"),
    # within max_seqlen_q but beyond sequence 0's own 3 queries
    (dict(layouts=[dar.TokenLayout(gen=[(0, 4)]), LAYS[1]]), ValueError, r"layouts\[0\].gen.*Lq=3"),
    (dict(cfg="x"), TypeError, "cfg must be"),
    (dict(softmax_scale=0.0), ValueError, "softmax_scale"),
    (dict(softmax_scale="1"), TypeError, "softmax_scale"),
    (dict(softmax_scale=float("inf")), ValueError, "softmax_scale"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(backend="flex"), ValueError, "flex has no varlen path"),
    (dict(backend=3), TypeError, "backend must be a str"),
    (dict(return_weights=1), TypeError, "return_weights"),
])
def test_varlen_rejects(over, exc, words):
    with pytest.raises(exc, match=words):
        _call(**over)


def test_single_layout_applies_to_every_sequence():
    lay = dar.TokenLayout(ref=[(0, 2)], gen=[(2, 3)])
    a = _call(layouts=lay, cfg=dar.DARConfig(gamma=0.5), backend="reference")
    b = _call(layouts=[lay, lay], cfg=dar.DARConfig(gamma=0.5), backend="reference")
    assert torch.equal(a, b)


def test_torch_backend_has_gradients():
    q, k, v = (t.clone().requires_grad_() for t in (Q, K, V))
    out = _call(q=q, k=k, v=v, cfg=dar.DARConfig(gamma=0.5, num_samples=2), backend="torch")
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def _cpu_sdpa_fuses_gqa() -> bool:
    """Whether plain SDPA on the CPU reaches a fused kernel for GQA here (torch 2.5 falls back to math)."""
    ops = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k = torch.randn(1, 4, 11, 4), torch.randn(1, 2, 11, 4)
    with Ops():
        torch.nn.functional.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    return any("scaled_dot_product" in op for op in ops)


@pytest.mark.parametrize("mode", ["key_scale", "prob_scale"])
@pytest.mark.parametrize("causal", [False, True])
def test_torch_path_stays_on_sdpa_fused_kernel(mode, causal):
    # The packed torch path attends through the dense torch backend's delegate kernel: every SDPA call
    # keeps q, k and v at one head dim (SDPA's CPU flash kernel, not math), and no op makes a tensor
    # of Lq x Lk (here 11 x 11; head dims and samples stay below 11). SDPA's math kernel would show as
    # bmm / softmax on 11 x 11 and no fused SDPA op.
    if not _cpu_sdpa_fuses_gqa():
        pytest.skip(f"torch {torch.__version__}'s CPU SDPA has no fused kernel for grouped-query attention "
                    f"(it runs the math kernel for enable_gqa=True even without DAR)")
    lens = [10, 11]
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(21, 4, 4, generator=g), torch.randn(21, 2, 4, generator=g), torch.randn(21, 2, 4, generator=g)
    lays = [dar.TokenLayout(ref=[(0, 4)], gen=[(4, 10)]), dar.TokenLayout(ref=[(0, 5)], gen=[(5, 11)])]
    seen, square = [], []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if "scaled_dot_product" in str(func):
                seen.append((str(func), args[0].shape[-1], args[1].shape[-1], args[2].shape[-1]))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and min(t.shape[-2:]) >= 11:
                    square.append((str(func), tuple(t.shape)))
            return out

    for queries in ("generation", "all"):
        seen.clear()
        cfg = dar.DARConfig(num_samples=3, gamma=0.5, mode=mode, queries=queries)
        with Spy():
            out = dar.dar_attention_varlen(q, k, v, cu(lens), cu(lens), 11, 11, lays, cfg, causal=causal,
                                           backend="torch")
        ref = dar.dar_attention_varlen(q, k, v, cu(lens), cu(lens), 11, 11, lays, cfg, causal=causal,
                                       backend="reference")
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
        assert seen and all(d == dk == dv for _, d, dk, dv in seen), seen
        assert all("flash" in name for name, *_ in seen), seen
        assert not square, square


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequences_are_isolated(backend):
    # A non-finite key in sequence 0 changes nothing in sequence 1 (no leak through padding or statistics).
    lens = [6, 5]
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(11, 4, 8, generator=g), torch.randn(11, 2, 8, generator=g), torch.randn(11, 2, 8, generator=g)
    k[2, 0, 3] = float("nan")
    lays = [dar.TokenLayout(ref=[(0, 3)], gen=[(3, 6)]), dar.TokenLayout(ref=[(0, 2)], gen=[(2, 5)])]
    cfg = dar.DARConfig(gamma=0.5, num_samples=3)
    for causal in (False, True):
        out, w = dar.dar_attention_varlen(q, k, v, cu(lens), cu(lens), 6, 6, lays, cfg, causal=causal,
                                          backend=backend, return_weights=True)
        alone, w1 = dar.dar_attention_varlen(q[6:], k[6:], v[6:], cu([5]), cu([5]), 5, 5, lays[1:], cfg,
                                             causal=causal, backend=backend, return_weights=True)
        assert torch.equal(w[6:], w1)
        torch.testing.assert_close(out[6:], alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_does_not_change_the_result(backend):
    # BAGEL calls attention under torch.autocast(bfloat16): the statistics stay float32 all the same.
    lens = [6, 7]
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(13, 4, 8, generator=g).bfloat16() for _ in range(3))
    lays = [dar.TokenLayout(ref=[(0, 3)], gen=[(3, 6)]), dar.TokenLayout(ref=[(0, 4)], gen=[(4, 7)])]
    args = (q, k[:, :2], v[:, :2], cu(lens), cu(lens), 7, 7, lays, dar.DARConfig(gamma=0.5, num_samples=3))
    plain = dar.dar_attention_varlen(*args, backend=backend, return_weights=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = dar.dar_attention_varlen(*args, backend=backend, return_weights=True)
    assert torch.equal(plain[0], cast[0]) and torch.equal(plain[1], cast[1])


def test_torch_path_compiles_fullgraph():
    lays = [dar.TokenLayout(ref=[(0, 3)], gen=[(3, 6)]), dar.TokenLayout(ref=[(0, 2)], gen=[(2, 5)])]
    cfg, cq = dar.DARConfig(gamma=0.5, num_samples=3), cu([6, 5])
    q, k, v = torch.randn(11, 4, 8), torch.randn(11, 2, 8), torch.randn(11, 2, 8)

    def f(q, k, v):
        return dar.dar_attention_varlen(q, k, v, cq, cq, 6, 6, lays, cfg, backend="torch")

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v), rtol=1e-5, atol=1e-5)


def test_packed_and_dense_calls_are_one_call_object():
    """Issue 21: one call object for dense and packed calls, validated in one place (dar.call); a packed
    call is a `DARCall` whose ``packing`` holds flash-attn's bookkeeping and whose causal flag is the
    mask's."""
    from dar.call import DARCall, make_call, make_packed_call
    from dar.varlen import VarlenCall

    q = torch.randn(7, 2, 8)
    cus = torch.tensor([0, 3, 7], dtype=torch.int32)
    lay = dar.TokenLayout(ref=[(0, 2)], gen=[(2, 3)])
    packed = make_packed_call(q, q, q, cus, cus, 4, 4, lay, None, None, True)
    dense = make_call(q[None, :4].transpose(1, 2), q[None, :4].transpose(1, 2), None, lay, None, None, None, False)
    assert type(packed) is type(dense) is DARCall is VarlenCall
    assert (packed.kind, dense.kind) == ("packed", "dense") and dense.packing is None
    assert packed.packing.num_seqs == 2 and packed.packing.lengths == ((3, 3), (4, 4))
    assert packed.mask.is_causal and packed.mask.mask is None and (packed.mask.lq, packed.mask.lk) == (4, 4)
