"""The Triton scoring kernels (dar.kernels.scoring) against the reference backend and a float64 oracle.

Runs on the CPU under ``TRITON_INTERPRET=1`` (and on CUDA when present). Inputs are exactly what the
triton backend passes: `dar.call.make_call` validates the arguments and ``call.plan.tensors(device)``
and ``call.mask.key_bias()`` provide the plan tensors and the per-key bias.

Comparison rules (TEAM.md): the mass r is compared with a tolerance per dtype (TOL) plus the
first-order effect of float32 rounding of the logits, which a float64 oracle can bound exactly; the
weights w are compared only on keys whose float64 r̂ lies farther than a margin from the thresholds
(w is a hard threshold of r̂, so a key within rounding of a threshold may legitimately go either way).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dar
from dar.call import make_call
from dar.sampling import sampled_queries

scoring = pytest.importorskip("dar.kernels.scoring")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not scoring.interpreting():
    pytest.skip("the triton scoring kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

# Tolerances on r, per input dtype. Both sides see the same dtype-rounded q and k and accumulate in
# float32, so these only cover float32 exp/log/summation rounding (rtol) and near-zero masses (atol,
# per sampled row); the dot-product rounding, which grows with |logits|, is bounded per case in
# `float64_statistics`. Loosen here, and only here, if a GPU needs it.
TOL = {
    torch.float32: dict(rtol=3e-5, atol=1e-6),
    torch.float16: dict(rtol=3e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=3e-5, atol=1e-6),
}
# Distance from a threshold below which w is not compared (see the module docstring).
TIE_MARGIN = 1e-4
EPS32 = 2.0 ** -24

# ------------------------------------------------------------------------------------------------
# Independent float64 oracle (loops over rows, groups and keys; shares no code with the package
# except the step-2 sampler, which defines which queries are scored)
# ------------------------------------------------------------------------------------------------


def _quantile64(values: list[float], tau: float) -> float:
    """torch.quantile's linear rule on a Python list."""
    v = sorted(values)
    pos = tau * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def float64_statistics(q, k, layouts, cfg, key_bias, is_causal, scale):
    """Float64 r, the tolerance on r, and for every key (group, r̂, t_hi, t_lo, margin, w) or None."""
    bsz, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    q64, k64 = q.double().cpu(), k.double().cpu()
    bias = torch.zeros(bsz, lk, dtype=torch.float64) if key_bias is None else key_bias.double().cpu()
    mass = torch.zeros(bsz, lk, dtype=torch.float64)
    tol = torch.zeros(bsz, lk, dtype=torch.float64)
    rtol, atol = TOL[q.dtype]["rtol"], TOL[q.dtype]["atol"]
    keys = torch.arange(lk)
    per_key = [[None] * lk for _ in range(bsz)]
    weights = torch.ones(bsz, lk, dtype=torch.float64)
    for b in range(bsz):
        lay = layouts[b]
        rows = sampled_queries(lay.gen, cfg.num_samples, cfg.sampling, cfg.seed)
        for h in range(hq):
            kh = k64[b, h // (hq // hk)]
            for i in rows:
                allowed = torch.isfinite(bias[b]) & ((keys <= i) if is_causal else torch.ones(lk, dtype=torch.bool))
                if not allowed.any():
                    continue  # no allowed key: the row contributes nothing
                prods = q64[b, h, i][None, :] * kh  # (Lk, D)
                logits = scale * prods.sum(-1) + bias[b]
                logits = torch.where(allowed, logits, torch.full_like(logits, -math.inf))
                p = torch.softmax(logits, dim=0)
                mass[b] += p
                # First-order float32 error. Logit k is off by eps_k ~ (2 sqrt(D) + 4) u (|scale| Σ|q k| + |bias|)
                # (rounding errors of a D-term sum add up like a random walk; 2 sqrt(D) is generous for it, the
                # worst case D is never approached), and d p_k = p_k (d s_k - Σ_j p_j d s_j), so
                # |d p_k| <= p_k (eps_k + Σ_j p_j eps_j): a one-hot row is insensitive, a near-tie is not.
                eps = (2 * math.sqrt(d) + 4) * EPS32 * (abs(scale) * prods.abs().sum(-1)
                                                         + bias[b].abs().nan_to_num(0, 0, 0))
                eps = torch.where(allowed, eps, torch.zeros_like(eps))
                tol[b] += p * (eps + (p * eps).sum()) + rtol * p + atol
        if not rows or not lay.ref:
            mass[b] = 0
            continue
        in_r = [j for s, e in lay.ref for j in range(s, e)
                if math.isfinite(bias[b, j]) and (not is_causal or j < lq)]
        not_r = [j for j in range(lk) if j not in in_r]
        mass[b, not_r] = 0
        groups = [in_r] if cfg.normalize == "joint" else \
            [[j for j in range(s, e) if j in in_r] for s, e in lay.ref]
        for g, members in enumerate(groups):
            if not members:
                continue
            vals = [mass[b, j].item() for j in members]
            lo, hi = min(vals), max(vals)
            span = hi - lo
            if span <= 1e-12:
                for j in members:
                    per_key[b][j] = dict(group=g, span=span, rhat=None, margin=0.0)
                continue
            rhat = [(v - lo) / span for v in vals]
            if cfg.thresholds == "quantile":
                t_hi, t_lo = _quantile64(rhat, cfg.tau_high), _quantile64(rhat, cfg.tau_low)
            else:
                t_hi, t_lo = cfg.tau_high, cfg.tau_low
            # r̂ = (r - lo) / span moves by at most ~3 max|dr| / span; the thresholds (quantiles) by as much.
            margin = TIE_MARGIN + 6 * max(tol[b, j].item() for j in members) / span
            for j, x in zip(members, rhat):
                w = 1 + cfg.gamma if x >= t_hi else (1 - cfg.gamma if x <= t_lo else 1.0)
                weights[b, j] = w
                per_key[b][j] = dict(group=g, span=span, rhat=x, t_hi=t_hi, t_lo=t_lo, margin=margin)
    return mass, tol, weights, per_key


def comparable(info) -> bool:
    """True when w of this key is determined robustly (away from thresholds and from degeneracy)."""
    if info is None:
        return True  # outside R: always 1
    if info["rhat"] is None:
        return info["span"] == 0.0  # exactly degenerate in float64; near-degenerate spans are ties
    return min(abs(info["rhat"] - info["t_hi"]), abs(info["rhat"] - info["t_lo"])) > info["margin"]


# ------------------------------------------------------------------------------------------------
# Running the kernels on a case
# ------------------------------------------------------------------------------------------------


def run_kernels(call, ops: bool):
    """(r, w) of the kernels: through the two custom ops, or one `key_statistics` run (half the time)."""
    pt = call.plan.tensors(call.q.device)
    cfg = call.cfg
    args = (call.q, call.k, pt.samples, pt.ref_ranges, pt.ref_groups)
    flags = (call.mask.key_bias(), call.mask.is_causal, call.scale)
    config = (cfg.gamma, cfg.tau_high, cfg.tau_low, cfg.thresholds)
    if not ops:
        return scoring.key_statistics(*args, call.plan.num_groups, *flags, *config)
    mass = scoring.sampled_attention_mass(*args, *flags)
    w = scoring.key_weights(*args, call.plan.num_groups, *flags, *config)
    return mass, w


def check_case(q, k, layout, cfg, attn_mask=None, scale=None, is_causal=False, ops=True):
    """Kernel r and w against the float64 oracle, and w against the reference backend."""
    call = make_call(q, k, None, layout, cfg, attn_mask, scale, is_causal)
    mass, w = run_kernels(call, ops)
    assert mass.shape == w.shape == (q.shape[0], k.shape[2])
    assert mass.dtype == w.dtype == torch.float32
    r64, tol, w64, per_key = float64_statistics(q, k, call.layouts, cfg, call.mask.key_bias(), is_causal, call.scale)
    err = (mass.double().cpu() - r64).abs()
    assert (err <= tol).all(), f"mass off by {(err - tol).max().item():.3g} beyond tolerance\n{mass}\n{r64}"
    w_ref = dar.compute_key_weights(q, k, layout, cfg, attn_mask, scale, is_causal=is_causal, backend="reference")
    if not call.plan.active:
        assert (w == 1).all()
    mask = torch.tensor([[comparable(info) for info in row] for row in per_key])
    # Keys outside R are always comparable, and must be exactly 1.
    torch.testing.assert_close(w.cpu()[mask], w64.float()[mask], rtol=0, atol=0)
    torch.testing.assert_close(w.cpu()[mask], w_ref.cpu()[mask], rtol=0, atol=0)
    return mass, w, mask


# ------------------------------------------------------------------------------------------------
# Hypothesis search over shapes, dtypes, masks, layouts and configs
# ------------------------------------------------------------------------------------------------


def _ranges(draw, n: int, max_count: int):
    """Up to max_count disjoint, ordered, non-empty half-open ranges inside [0, n)."""
    count = draw(st.integers(0, min(max_count, (n + 1) // 2)))
    cuts = sorted(draw(st.lists(st.integers(0, n), min_size=2 * count, max_size=2 * count, unique=True)))
    return [(cuts[2 * i], cuts[2 * i + 1]) for i in range(count)]


@st.composite
def cases(draw):
    bsz = draw(st.integers(1, 2))
    hk = draw(st.sampled_from([1, 2]))
    hq = hk * draw(st.sampled_from([1, 2])) if hk == 2 else draw(st.sampled_from([1, 2, 3, 4]))  # GQA 1..4
    lq, lk = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    d = draw(st.sampled_from([8, 16, 24, 64, 72]))  # 8, 24, 72: padded to 16, 32, 128 inside the kernels
    dtype = draw(st.sampled_from(list(TOL)))
    blhd = draw(st.booleans())  # diffusers' (B, L, H, D) memory layout, transposed without a copy
    huge = draw(st.integers(0, 5)) == 0
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))

    def make(h, n):
        if blhd:
            return torch.randn(bsz, n, h, d, generator=gen).to(dtype).transpose(1, 2)
        return torch.randn(bsz, h, n, d, generator=gen).to(dtype)

    q, k = make(hq, lq), make(hk, lk)
    layouts = [dar.TokenLayout(ref=_ranges(draw, lk, 3), gen=_ranges(draw, lq, 2))
               for _ in range(draw(st.sampled_from([1, bsz])))]
    layout = layouts[0] if len(layouts) == 1 else layouts
    mask_kind = draw(st.sampled_from(["none", "causal", "bool", "float", "broadcast"]))
    attn_mask, is_causal = None, mask_kind == "causal"
    if mask_kind in ("bool", "float", "broadcast"):
        rows = 1 if mask_kind == "broadcast" else bsz
        keep = torch.rand(rows, 1, 1, lk, generator=gen) < draw(st.sampled_from([0.5, 0.9]))
        keep[..., torch.randint(lk, (1,), generator=gen)] = True
        attn_mask = keep
        if mask_kind == "float":  # an additive bias: finite values, -inf on padded keys
            attn_mask = (torch.randn(rows, 1, 1, lk, generator=gen) * 2).masked_fill(~keep, -math.inf)
    cfg = dar.DARConfig(
        num_samples=draw(st.sampled_from([1, 3, 8, 64])),
        gamma=draw(st.sampled_from([0.15, 0.5])),
        tau_high=draw(st.sampled_from([0.7, 0.55])), tau_low=draw(st.sampled_from([0.3, 0.1])),
        sampling=draw(st.sampled_from(["random", "strided"])), seed=draw(st.integers(0, 3)),
        normalize=draw(st.sampled_from(["joint", "per_image"])),
        thresholds=draw(st.sampled_from(["minmax", "quantile"])),
    )
    scale = 1e4 / math.sqrt(d) if huge else None  # logits ~ 1e4
    return dict(q=q.to(DEVICE), k=k.to(DEVICE), layout=layout, cfg=cfg,
                attn_mask=None if attn_mask is None else attn_mask.to(DEVICE), scale=scale, is_causal=is_causal)


@settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
def test_matches_reference_and_float64(case):
    check_case(**case, ops=False)  # the named tests below go through the custom ops


# ------------------------------------------------------------------------------------------------
# Named edge cases
# ------------------------------------------------------------------------------------------------


def _qk(b, hq, hk, lq, lk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(b, hk, lk, d, generator=g).to(dtype).to(DEVICE)
    return q, k


@pytest.mark.parametrize("dtype", list(TOL))
def test_per_image_quantile_with_gqa(dtype):
    q, k = _qk(2, 4, 2, 40, 44, 24, dtype)
    layout = dar.TokenLayout(ref=[(0, 12), (14, 30), (31, 44)], gen=[(10, 40)])
    cfg = dar.DARConfig(num_samples=16, normalize="per_image", thresholds="quantile")
    _, w, mask = check_case(q, k, layout, cfg)
    assert (w != 1).any() and mask.float().mean() > 0.9  # the check compared real weights


def test_bf16_interpreter_upcast_is_needed(monkeypatch):
    """Without the interpreter's fp32 upcast the bf16 dot is garbage; the oracle comparison must catch it."""
    if not scoring.interpreting():
        pytest.skip("only the interpreter's bf16 tl.dot is broken")
    q, k = _qk(1, 2, 2, 24, 24, 16, torch.bfloat16)
    layout = dar.TokenLayout(ref=[(0, 24)], gen=[(0, 24)])
    cfg = dar.DARConfig(num_samples=8)
    check_case(q, k, layout, cfg)  # with the upcast: correct
    monkeypatch.setattr(scoring, "_dot_mode", lambda dtype: (False, "ieee"))  # a raw bf16 tl.dot
    with pytest.raises(AssertionError):
        check_case(q, k, layout, cfg)


def test_empty_gen_or_ref_give_ones():
    q, k = _qk(2, 2, 2, 16, 16, 16)
    cfg = dar.DARConfig(num_samples=4)
    for layout in (dar.TokenLayout(ref=[(0, 8)], gen=[]), dar.TokenLayout(ref=[], gen=[(0, 8)]),
                   [dar.TokenLayout(ref=[(0, 8)], gen=[]), dar.TokenLayout(ref=[(0, 8)], gen=[(2, 9)])]):
        _, w, _ = check_case(q, k, layout, cfg)
        assert (w[0] == 1).all()


def test_one_query_one_key():
    for lq, lk in ((1, 1), (1, 20), (20, 1)):
        q, k = _qk(1, 2, 1, lq, lk, 24, seed=lq + lk)
        check_case(q, k, dar.TokenLayout(ref=[(0, lk)], gen=[(0, lq)]), dar.DARConfig())


def test_every_key_masked_but_one_and_all_masked():
    q, k = _qk(2, 2, 2, 12, 20, 16)
    layout = dar.TokenLayout(ref=[(0, 10), (10, 20)], gen=[(0, 12)])
    keep = torch.zeros(2, 1, 1, 20, dtype=torch.bool, device=DEVICE)
    keep[0, ..., 13] = True  # row 0: a single key; row 1: none at all
    mass, w, _ = check_case(q, k, layout, dar.DARConfig(num_samples=5), attn_mask=keep)
    assert (w == 1).all()
    assert mass[1].abs().max() == 0 and mass[0, 13].item() == pytest.approx(10.0, rel=1e-5)  # 2 heads x 5 rows


def test_degenerate_group_keeps_one():
    q, k = _qk(1, 2, 2, 16, 24, 16)
    k[:, :, 8:16] = k[:, :, 8:9].clone()  # identical keys: the second image is attended uniformly
    layout = dar.TokenLayout(ref=[(0, 8), (8, 16), (16, 17)], gen=[(0, 16)])
    _, w, mask = check_case(q, k, layout, dar.DARConfig(num_samples=6, normalize="per_image"))
    assert (w[0, 8:17] == 1).all() and mask[0, 8:17].all()
    assert (w[0, :8] != 1).any()


def test_causal_keys_past_lq_are_not_reference():
    q, k = _qk(1, 2, 2, 10, 30, 16)
    layout = dar.TokenLayout(ref=[(0, 30)], gen=[(0, 10)])
    mass, w, _ = check_case(q, k, layout, dar.DARConfig(num_samples=4, sampling="strided"), is_causal=True)
    assert (mass[0, 10:] == 0).all() and (w[0, 10:] == 1).all()


def test_huge_logits():
    q, k = _qk(2, 2, 1, 32, 32, 64, torch.float16)
    layout = dar.TokenLayout(ref=[(0, 32)], gen=[(0, 32)])
    mass, _, _ = check_case(q, k, layout, dar.DARConfig(num_samples=8), scale=1e4 / 8)
    assert torch.isfinite(mass).all()


def test_any_strides():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 20, 4, 48, generator=g).to(DEVICE).transpose(1, 2)[..., ::2]  # (B, L, H, D) storage, D stride 2
    k = torch.randn(2, 18, 3, 40, generator=g).to(DEVICE).transpose(1, 2)[:, 1:3, :, 8:32]  # sliced heads and dims
    assert q.shape == (2, 4, 20, 24) and k.shape == (2, 2, 18, 24) and q.stride(-1) == 2
    check_case(q, k, dar.TokenLayout(ref=[(2, 18)], gen=[(4, 16)]), dar.DARConfig(num_samples=6))


def test_compiles_fullgraph():
    q, k = _qk(1, 2, 2, 16, 16, 16)
    layout = dar.TokenLayout(ref=[(0, 16)], gen=[(0, 16)])
    cfg = dar.DARConfig(num_samples=4, thresholds="quantile")
    call = make_call(q, k, None, layout, cfg, None, None, False)
    pt = call.plan.tensors(DEVICE)

    def weights(q, k, samples, ranges, groups):
        w = torch.ops.dar.key_weights(q, k, samples, ranges, groups, 1, None, False, 0.25, 0.15, 0.7, 0.3, "quantile")
        return w * 2

    eager = weights(q, k, pt.samples, pt.ref_ranges, pt.ref_groups)
    compiled = torch.compile(weights, fullgraph=True, backend="aot_eager")(q, k, pt.samples, pt.ref_ranges,
                                                                         pt.ref_groups)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert (eager / 2 == dar.compute_key_weights(q, k, layout, cfg, backend="reference")).all()


def test_weights_have_zero_gradient():
    q, k = _qk(1, 2, 2, 12, 12, 16)
    q.requires_grad_()
    pt = make_call(q, k, None, dar.TokenLayout(ref=[(0, 12)], gen=[(0, 12)]), dar.DARConfig(num_samples=4),
                   None, None, False).plan.tensors(DEVICE)
    w = scoring.key_weights(q, k, pt.samples, pt.ref_ranges, pt.ref_groups, 1, None, False, 0.25, 0.15, 0.7, 0.3,
                            "minmax")
    (w * torch.arange(12.0, device=DEVICE)).sum().backward()
    assert q.grad is None or (q.grad == 0).all()


def test_bad_inputs_raise():
    q, k = _qk(1, 2, 2, 8, 8, 16)
    pt = make_call(q, k, None, dar.TokenLayout(ref=[(0, 8)], gen=[(0, 8)]), dar.DARConfig(), None, None,
                   False).plan.tensors(DEVICE)
    args = (pt.samples, pt.ref_ranges, pt.ref_groups, 1, None, False, 0.25, 0.15, 0.7, 0.3)
    with pytest.raises(ValueError, match="thresholds"):
        scoring.key_weights(q, k, *args, "median")
    with pytest.raises(TypeError, match="q must be"):
        scoring.key_weights(q.double(), k.double(), *args, "minmax")
    with pytest.raises(TypeError, match="samples must be int32"):
        scoring.key_weights(q, k, pt.samples.long(), *args[1:], "minmax")
    with pytest.raises(ValueError, match="multiple"):
        scoring.key_weights(q[:, :1].repeat(1, 3, 1, 1), k, *args, "minmax")


def test_autotune_pruning_picks_fitting_configs(monkeypatch):
    """The GPU tables (not used by the interpreter): each (arch, head dim, dtype) keeps a fitting, non-empty set."""
    from dar.kernels import scoring_autotune as tuning

    assert len(tuning.configs(tuning.ROW_LSE, True)) == 1
    for table in (tuning.ROW_LSE, tuning.KEY_MASS):
        configs = tuning.configs(table, False)
        keep = tuning.prune(table)
        for arch, smem in (("sm90", 227 * 1024), ("sm80", 163 * 1024), ("other", 99 * 1024)):
            monkeypatch.setattr(tuning, "_arch", lambda device, arch=arch: arch)
            monkeypatch.setattr(tuning, "_shared_memory", lambda index, smem=smem: smem)
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                for bd in (16, 64, 128, 256):
                    q = torch.empty(1, dtype=dtype)
                    kept = keep(configs, {"Q": q}, BLOCK_D=bd)
                    assert kept
                    for c in kept:
                        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
                        assert min(bm, bn) >= 16
                        assert (bm + c.num_stages * bn) * bd * q.element_size() <= smem
                    if dtype != torch.float32:
                        cls = 64 if bd <= 64 else 128 if bd <= 128 else 256
                        assert {tuning._tile(c) for c in kept} <= set(table[arch][cls])
