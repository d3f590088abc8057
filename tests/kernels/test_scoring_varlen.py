"""The packed (varlen) scoring kernel ``dar::key_weights_varlen`` against a torch per-sequence
reference: each sequence scored on its own by the dense reference backend (with flash-attn's
bottom-right causal rule as an explicit mask) and by the float64 oracle (tests/support/oracle.py).

Runs on the CPU under ``TRITON_INTERPRET=1`` (and on CUDA when present).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import dar
from dar.plan import make_plan
from tests.support.oracle import dar_float64, stable_keys
from tests.support.tolerances import THRESHOLD_MARGIN

scoring = pytest.importorskip("dar.kernels.scoring")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not scoring.interpreting():
    pytest.skip("the triton scoring kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def bottom_right(lq: int, lk: int) -> torch.Tensor:
    """flash-attn's causal rule for Lq != Lk: query i sees key j iff j <= i + Lk - Lq."""
    return torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)


def per_sequence(q, k, lens, layouts, cfg, causal, scale):
    """Per sequence: (w from the reference backend, w / stable mask from the float64 oracle)."""
    out = []
    oq = ok = 0
    for (lq, lk), lay in zip(lens, layouts):
        if lk == 0:
            out.append((torch.ones(0), np.ones(0), np.ones(0, dtype=bool)))
        elif lq == 0:
            out.append((torch.ones(lk), np.ones(lk), np.ones(lk, dtype=bool)))
        else:
            qn = q[oq:oq + lq].transpose(0, 1)[None].cpu()
            kn = k[ok:ok + lk].transpose(0, 1)[None].cpu()
            mask = bottom_right(lq, lk)[None, None] if causal else None
            w_ref = dar.compute_key_weights(qn, kn, lay, cfg, attn_mask=mask, scale=scale, backend="reference")[0]
            _, w64, rhat, th = dar_float64(qn, kn, None, lay, cfg, attn_mask=mask, scale=scale)
            out.append((w_ref, w64[0], stable_keys(rhat, th, THRESHOLD_MARGIN[q.dtype])[0]))
        oq, ok = oq + lq, ok + lk
    return out


def run(q, k, lens, layouts, cfg, causal=False, scale=None, extra_max=0):
    cu_q = torch.tensor([0] + list(np.cumsum([a for a, _ in lens])), dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0] + list(np.cumsum([b for _, b in lens])), dtype=torch.int32, device=DEVICE)
    max_q = max(a for a, _ in lens) + extra_max
    max_k = max(b for _, b in lens) + extra_max
    pt = make_plan(tuple(layouts), max_q, max_k, cfg).tensors(DEVICE)
    plan = make_plan(tuple(layouts), max_q, max_k, cfg)
    scale_ = scale if scale is not None else q.shape[-1] ** -0.5
    mass, w = scoring.key_statistics_varlen(q, k, cu_q, cu_k, max_q, max_k, pt.samples, pt.ref_ranges,
                                            pt.ref_groups, plan.num_groups, causal, scale_, cfg.gamma,
                                            cfg.tau_high, cfg.tau_low, cfg.thresholds)
    w_op = torch.ops.dar.key_weights_varlen(q, k, cu_q, cu_k, max_q, max_k, pt.samples, pt.ref_ranges,
                                            pt.ref_groups, plan.num_groups, causal, scale_, cfg.gamma,
                                            cfg.tau_high, cfg.tau_low, cfg.thresholds)
    assert torch.equal(w, w_op)
    assert w.shape == (k.shape[0],) and w.dtype == torch.float32 and mass.shape == w.shape
    return mass, w


def check(q, k, lens, layouts, cfg, causal=False, scale=None, extra_max=0):
    mass, w = run(q, k, lens, layouts, cfg, causal, scale, extra_max)
    w = w.cpu()
    ok = 0
    compared = 0
    for (lq, lk), (w_ref, w64, stable) in zip(lens, per_sequence(q, k, lens, layouts, cfg, causal, scale)):
        wn = w[ok:ok + lk]
        np.testing.assert_array_equal(wn.numpy()[stable], w64.astype(np.float32)[stable])
        np.testing.assert_array_equal(wn.numpy()[stable], w_ref.numpy()[stable])
        compared += int(stable.sum())
        ok += lk
    return mass, w, compared


@st.composite
def packed_cases(draw):
    n = draw(st.integers(1, 4))
    lens = [(draw(st.integers(0, 20)), draw(st.integers(0, 20))) for _ in range(n)]
    if all(lk == 0 for _, lk in lens):
        lens[0] = (lens[0][0], 5)
    hk = draw(st.sampled_from([1, 2]))
    hq = hk * draw(st.sampled_from([1, 3]))
    d = draw(st.sampled_from([8, 24]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 20)))
    tq, tk = sum(a for a, _ in lens), sum(b for _, b in lens)
    strided = draw(st.booleans())  # q / k slices of wider buffers: any strides
    q = torch.randn(tq, hq, 2 * d if strided else d, generator=g).to(dtype)
    k = torch.randn(tk, hk, 2 * d if strided else d, generator=g).to(dtype)
    if strided:
        q, k = q[..., ::2], k[..., 1::2]
    layouts = []
    for lq, lk in lens:
        ref = _ranges(draw, lk, 3)
        gen = _ranges(draw, lq, 2)
        layouts.append(dar.TokenLayout(ref=ref, gen=gen))
    cfg = dar.DARConfig(num_samples=draw(st.sampled_from([1, 4, 64])), gamma=0.5,
                        tau_high=draw(st.sampled_from([0.7, 0.55])), tau_low=draw(st.sampled_from([0.3, 0.1])),
                        sampling=draw(st.sampled_from(["random", "strided"])),
                        normalize=draw(st.sampled_from(["joint", "per_image"])),
                        thresholds=draw(st.sampled_from(["minmax", "quantile"])))
    return dict(q=q.to(DEVICE), k=k.to(DEVICE), lens=lens, layouts=layouts, cfg=cfg,
                causal=draw(st.booleans()), scale=draw(st.sampled_from([None, 0.7])),
                extra_max=draw(st.sampled_from([0, 0, 7])))


def _ranges(draw, n: int, max_count: int):
    count = draw(st.integers(0, min(max_count, (n + 1) // 2)))
    cuts = sorted(draw(st.lists(st.integers(0, n), min_size=2 * count, max_size=2 * count, unique=True)))
    return [(cuts[2 * i], cuts[2 * i + 1]) for i in range(count)]


@settings(max_examples=40, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(case=packed_cases())
def test_varlen_matches_per_sequence_reference(case):
    check(**case)


def test_omnigen2_heads_gqa_21_7_head_dim_120():
    g = torch.Generator().manual_seed(0)
    lens = [(30, 30), (17, 17), (41, 41)]
    q = torch.randn(88, 21, 120, generator=g).to(DEVICE)
    k = torch.randn(88, 7, 120, generator=g).to(DEVICE)
    layouts = [dar.TokenLayout(ref=[(4, 14), (14, 22)], gen=[(22, 30)]), dar.TokenLayout(ref=[], gen=[(5, 17)]),
               dar.TokenLayout(ref=[(3, 20)], gen=[(20, 41)])]
    cfg = dar.DARConfig(num_samples=8, normalize="per_image")
    _, w, compared = check(q, k, lens, layouts, cfg)
    assert (w[:30] != 1).any() and (w[30:47] == 1).all() and (w[47:] != 1).any() and compared > 80


def test_bottom_right_causal_with_lq_below_lk():
    # BAGEL-like: few queries at the end of a long key sequence see every key (Lk - Lq offset).
    g = torch.Generator().manual_seed(1)
    lens = [(6, 26), (10, 10)]
    q = torch.randn(16, 2, 16, generator=g).to(DEVICE)
    k = torch.randn(36, 2, 16, generator=g).to(DEVICE)
    layouts = [dar.TokenLayout(ref=[(0, 20)], gen=[(0, 6)]), dar.TokenLayout(ref=[(0, 10)], gen=[(0, 10)])]
    mass, w, _ = check(q, k, lens, layouts, dar.DARConfig(num_samples=6, sampling="strided"), causal=True)
    assert (mass[:20] > 0).all()  # top-left would have hidden keys 6.. from every query
    assert (w[:20] != 1).any()


def test_zero_length_sequences():
    g = torch.Generator().manual_seed(2)
    lens = [(0, 8), (12, 12), (5, 0)]
    q = torch.randn(17, 1, 8, generator=g).to(DEVICE)
    k = torch.randn(20, 1, 8, generator=g).to(DEVICE)
    layouts = [dar.TokenLayout(ref=[(0, 8)]), dar.TokenLayout(ref=[(0, 6)], gen=[(6, 12)]), dar.TokenLayout(gen=[(0, 5)])]
    _, w, _ = check(q, k, lens, layouts, dar.DARConfig(num_samples=4))
    assert (w[:8] == 1).all() and (w[8:] != 1).any()


def test_nonfinite_query_drops_only_its_row():
    g = torch.Generator().manual_seed(3)
    lens = [(12, 12), (12, 12)]
    q = torch.randn(24, 2, 8, generator=g).to(DEVICE)
    k = torch.randn(24, 1, 8, generator=g).to(DEVICE)
    lay = dar.TokenLayout(ref=[(0, 6)], gen=[(6, 12)])
    cfg = dar.DARConfig(num_samples=3, sampling="strided")  # samples 7, 9, 11
    q[9, 0, 2] = float("nan")
    _, w, compared = check(q, k, lens, [lay, lay], cfg)
    assert (w[:6] != 1).any() and compared == 24


def test_compiles_fullgraph_and_has_zero_gradient():
    g = torch.Generator().manual_seed(4)
    lens = [(10, 10), (6, 6)]
    q = torch.randn(16, 2, 16, generator=g).to(DEVICE).requires_grad_()
    k = torch.randn(16, 2, 16, generator=g).to(DEVICE)
    layouts = (dar.TokenLayout(ref=[(0, 5)], gen=[(5, 10)]), dar.TokenLayout(ref=[(0, 3)], gen=[(3, 6)]))
    cfg = dar.DARConfig(num_samples=4, thresholds="quantile")
    plan = make_plan(layouts, 10, 10, cfg)
    pt = plan.tensors(DEVICE)
    cu = torch.tensor([0, 10, 16], dtype=torch.int32, device=DEVICE)

    def weights(q, k, cu):
        return torch.ops.dar.key_weights_varlen(q, k, cu, cu, 10, 10, pt.samples, pt.ref_ranges, pt.ref_groups,
                                                plan.num_groups, False, 0.25, 0.15, 0.7, 0.3, "quantile") * 2

    eager = weights(q, k, cu)
    compiled = torch.compile(weights, fullgraph=True, backend="aot_eager")(q, k, cu)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    (eager * torch.arange(16.0, device=DEVICE)).sum().backward()
    assert q.grad is None or (q.grad == 0).all()


def test_bad_inputs_raise():
    q = torch.randn(10, 2, 8, device=DEVICE)
    cu = torch.tensor([0, 10], dtype=torch.int32, device=DEVICE)
    pt = make_plan((dar.TokenLayout(ref=[(0, 5)], gen=[(5, 10)]),), 10, 10, dar.DARConfig()).tensors(DEVICE)
    plan = (pt.samples, pt.ref_ranges, pt.ref_groups, 1, False, 0.3, 0.15, 0.7, 0.3, "minmax")
    op = scoring.key_weights_varlen
    with pytest.raises(ValueError, match="3-D"):
        op(q[None], q[None], cu, cu, 10, 10, *plan)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        op(q, q, cu.long(), cu, 10, 10, *plan)
    with pytest.raises(ValueError, match="same number of sequences"):
        op(q, q, cu, torch.tensor([0, 5, 10], dtype=torch.int32, device=DEVICE), 10, 10, *plan)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        op(q, q, cu, cu, 10, -1, *plan)
    with pytest.raises(ValueError, match="samples must have shape"):
        op(q, q, cu, cu, 10, 10, pt.samples.repeat(2, 1), *plan[1:])
    with pytest.raises(ValueError, match="multiple"):
        op(q, q[:, :1].repeat(1, 3, 1), cu, cu, 10, 10, *plan)
