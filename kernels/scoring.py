"""DAR scoring in Triton: sampled-query attention mass -> per-key weights (docs/semantics.md, steps 3-6).

Three stages, none of which writes a logit to memory:

1. ``_row_lse_kernel``: for every (batch, head, sampled query) the log-sum-exp of its softmax row
   over the allowed keys, with the flash-attention online max; the keys are split into chunks for
   occupancy and the partial results merged (``_combine_splits``). Output ``lse (B, Hq, M)``.
2. ``_key_mass_kernel``: for every tile of keys, recompute the sampled logits and add up
   ``exp(s - lse)`` over heads and samples: ``r (B, Lk)``, zero outside the reference keys R.
3. ``_group_weights_kernel``: per (batch, group) min/max of r over the group's keys in R, the
   degenerate check, ``r̂ = (r - lo) / (hi - lo)`` and the dual threshold -> ``w (B, Lk)``.
   ``thresholds="quantile"`` first runs ``_group_span_kernel`` and takes the quantiles of r̂ with
   device-side torch ops (`dar.scoring.group_quantile`); no host synchronisation either way.

Work is ``O(Hq · m · Lk · D)`` (m sampled queries), never ``Lq · Lk``. The queries of one KV head's
GQA group are packed into the rows of one tile, so every K tile is loaded once per KV head.

Public entry points: the `torch.library` custom ops `key_weights` (``dar::key_weights``) and
`sampled_attention_mass` (``dar::sampled_attention_mass``), traceable by ``torch.compile(fullgraph=True)``,
and `key_statistics` (plain Python: r and w from one run, for inspection).

Verification status: every path here is tested on the CPU with ``TRITON_INTERPRET=1``
(tests/test_triton_scoring.py). Not yet run on a GPU: the compiled kernels themselves (layouts,
``tl.dot`` tiling, the ``ieee`` fp32 dot), the autotuning tables (scoring_autotune.py; their pruning
logic is unit-tested), bf16 ``tl.dot`` without the interpreter's fp32 upcast, the stage-1 split
heuristic's performance, and 64-bit offsets on tensors over 2^31 elements. The first call for a new
autotune key benchmarks, so warm the op up before capturing it in a CUDA graph.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from dar.scoring import DEGENERATE_SPAN, group_quantile

from . import scoring_autotune as tuning

THRESHOLDS = ("minmax", "quantile")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret)


# Autotuning: tables per GPU generation in scoring_autotune.py; one config under the interpreter.
_ROW_LSE_CONFIGS = tuning.configs(tuning.ROW_LSE, interpreting())
_KEY_MASS_CONFIGS = tuning.configs(tuning.KEY_MASS, interpreting())


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _sampled_queries(Q, Samples, b, hk, start_r, M, stride_qb, stride_qh, stride_ql, stride_qd, stride_sb,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``start_r ..`` of KV head ``hk``'s packed (query head, sample) axis: their q tile and query index.

    Packed row ``r`` is sample ``r % M`` of query head ``hk * GROUP + r // M``: the GROUP query heads that
    share one KV head (GQA) sit in one tile and reuse its K loads. Padding samples (-1) are invalid.
    """
    rows = start_r + tl.arange(0, BLOCK_M)
    in_pack = rows < GROUP * M
    qi = tl.load(Samples + b * stride_sb + rows % M, mask=in_pack, other=-1)
    valid = in_pack & (qi >= 0)
    head = hk * GROUP + rows // M
    offs_d = tl.arange(0, BLOCK_D)
    # 64-bit offsets: batch, head and row strides can multiply past 2^31 on long sequences.
    q_ptrs = (Q + b.to(tl.int64) * stride_qb + head.to(tl.int64)[:, None] * stride_qh
              + qi.to(tl.int64)[:, None] * stride_ql + offs_d[None, :] * stride_qd)
    # The head dim is padded to a power of two; the padding lanes load 0 and add nothing to q.k.
    q = tl.load(q_ptrs, mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    return q, qi, valid


@triton.jit
def _load_keys(K_head, start_n, Lk, stride_kl, stride_kd,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """K^T tile (BLOCK_D, BLOCK_N) of keys ``start_n ..``; out-of-range keys and padded dims load 0."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_ptrs = K_head + offs_n.to(tl.int64)[None, :] * stride_kl + offs_d[:, None] * stride_kd
    return tl.load(k_ptrs, mask=(offs_n[None, :] < Lk) & (offs_d[:, None] < HEAD_DIM), other=0.0)


@triton.jit
def _sampled_logits(q, qi, valid, kt, KeyBias_b, start_n, Lk, qk_scale,
                    BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``(s, bad)``: (BLOCK_M, BLOCK_N) logits of the sampled rows against the key tile at ``start_n``, in
    log2 units, -inf where a key is not allowed (out of range, masked by a -inf key bias, or after the
    query if causal) or the logit is not finite; and (BLOCK_M,) whether a row has a non-finite logit on
    an allowed key (such a row contributes no mass: docs/semantics.md, non-finite inputs)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if UPCAST:  # the interpreter's bf16 tl.dot multiplies raw bit patterns (triton #11584)
        q = q.to(tl.float32)
        kt = kt.to(tl.float32)
    # qk_scale = scale * log2(e): the softmax is evaluated with exp2, as in the flash-attention tutorial.
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    allowed = valid[:, None] & (offs_n[None, :] < Lk)
    if HAS_BIAS:
        bias = tl.load(KeyBias_b + offs_n, mask=offs_n < Lk, other=0.0)
        allowed = allowed & (bias != float("-inf"))[None, :]
        s = s + bias[None, :] * 1.4426950408889634
    if IS_CAUSAL:  # SDPA's top-left rule: query i sees keys j <= i
        allowed = allowed & (offs_n[None, :] <= qi[:, None])
    finite = tl.abs(s) < float("inf")  # False for NaN and +-inf
    bad = tl.max((allowed & ~finite).to(tl.int32), 1) > 0
    return tl.where(allowed & finite, s, float("-inf")), bad


@triton.jit
def _key_allowed(KeyBias_b, offs_n, Lq, Lk, HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Keys some query row may attend to: not padded out by the bias, and (causal) ``j < Lq``."""
    ok = offs_n < Lk
    if HAS_BIAS:
        ok = ok & (tl.load(KeyBias_b + offs_n, mask=ok, other=float("-inf")) != float("-inf"))
    if IS_CAUSAL:
        ok = ok & (offs_n < Lq)
    return ok


# ----------------------------------------------------------------------------------------------
# Stage 1: row statistics of the sampled queries
# ----------------------------------------------------------------------------------------------

@triton.autotune(configs=_ROW_LSE_CONFIGS, key=["HEAD_DIM", "LK_BUCKET", "GROUP"],
                 prune_configs_by={"early_config_prune": tuning.prune(tuning.ROW_LSE)})
@triton.jit
def _row_lse_kernel(Q, K, Samples, KeyBias, LsePart,
                    stride_qb, stride_qh, stride_ql, stride_qd,
                    stride_kb, stride_kh, stride_kl, stride_kd,
                    stride_sb, stride_biasb,
                    H_KV, Lq, Lk, M, SPLITS, qk_scale, LK_BUCKET,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """grid (packed-row tiles, B * Hk, SPLITS): ``LsePart[b, h, j, split] = log2 Σ_k exp2(s_hjk)`` over the
    split's chunk of keys (-inf where the chunk holds no allowed key).

    With only Hq/Hk * m rows per KV head there are too few row tiles to fill a GPU, so the keys are
    split into SPLITS chunks (flash-decoding style) and the partial log-sum-exps combined afterwards.
    """
    start_r = tl.program_id(0) * BLOCK_M
    b = tl.program_id(1) // H_KV
    hk = tl.program_id(1) % H_KV
    split = tl.program_id(2)
    q, qi, valid = _sampled_queries(Q, Samples, b, hk, start_r, M, stride_qb, stride_qh, stride_ql, stride_qd,
                                    stride_sb, GROUP, HEAD_DIM, BLOCK_M, BLOCK_D)
    K_head = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    KeyBias_b = KeyBias + b.to(tl.int64) * stride_biasb
    chunk = tl.cdiv(tl.cdiv(Lk, SPLITS), BLOCK_N) * BLOCK_N  # whole tiles per split
    begin = split * chunk
    end = tl.minimum(Lk, begin + chunk)
    if IS_CAUSAL:  # no row of this tile sees a key past its largest query index
        end = tl.minimum(end, tl.max(qi, 0) + 1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    bad_i = tl.zeros([BLOCK_M], tl.int1)
    for start_n in range(begin, end, BLOCK_N):
        kt = _load_keys(K_head, start_n, Lk, stride_kl, stride_kd, HEAD_DIM, BLOCK_N, BLOCK_D)
        s, bad = _sampled_logits(q, qi, valid, kt, KeyBias_b, start_n, Lk, qk_scale,
                                 BLOCK_N, HAS_BIAS, IS_CAUSAL, UPCAST, DOT_PRECISION)
        bad_i = bad_i | bad
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only masked keys keeps m = -inf; shift by 0 there so that
        # exp2(-inf - -inf) = NaN never appears (its terms are exp2(-inf) = 0).
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_shift) + tl.sum(tl.exp2(s - m_shift[:, None]), 1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    lse = tl.where(bad_i, float("nan"), lse)  # NaN marks a dropped row for _combine_splits
    rows = start_r + tl.arange(0, BLOCK_M)
    # LsePart is (B, Hq, M, SPLITS) contiguous: KV head hk's packed rows are one contiguous run.
    row_base = (b.to(tl.int64) * H_KV + hk) * (GROUP * M)
    tl.store(LsePart + (row_base + rows) * SPLITS + split, lse, mask=rows < GROUP * M)


# ----------------------------------------------------------------------------------------------
# Stage 2: attention mass of every reference key
# ----------------------------------------------------------------------------------------------

@triton.autotune(configs=_KEY_MASS_CONFIGS, key=["HEAD_DIM", "ROWS_BUCKET", "GROUP"],
                 prune_configs_by={"early_config_prune": tuning.prune(tuning.KEY_MASS)})
@triton.jit
def _key_mass_kernel(Q, K, Samples, KeyBias, Lse, RefRanges, RefGroups, Mass,
                     stride_qb, stride_qh, stride_ql, stride_qd,
                     stride_kb, stride_kh, stride_kl, stride_kd,
                     stride_sb, stride_biasb, stride_rb, stride_rr, stride_gb,
                     H_KV, Lq, Lk, M, R, qk_scale, ROWS_BUCKET,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """grid (key tiles, B): ``Mass[b, k] = Σ_h Σ_j exp2(s_hjk - Lse[b, h, j])`` for keys k in R, else 0."""
    start_n = tl.program_id(0) * BLOCK_N
    b = tl.program_id(1)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    KeyBias_b = KeyBias + b.to(tl.int64) * stride_biasb
    in_ref = tl.zeros([BLOCK_N], tl.int1)
    for r in range(0, R):  # R = reference ranges of the batch (a handful); padding is (0, 0)
        lo = tl.load(RefRanges + b * stride_rb + r * stride_rr)
        hi = tl.load(RefRanges + b * stride_rb + r * stride_rr + 1)
        grp = tl.load(RefGroups + b * stride_gb + r)
        in_ref = in_ref | ((offs_n >= lo) & (offs_n < hi) & (grp >= 0))
    in_ref = in_ref & _key_allowed(KeyBias_b, offs_n, Lq, Lk, HAS_BIAS, IS_CAUSAL)
    # A key tile with no reference key skips the whole head loop: the cost follows |R|, not Lk.
    n_heads = tl.where(tl.max(in_ref.to(tl.int32), 0) > 0, H_KV, 0)
    mass = tl.zeros([BLOCK_N], tl.float32)
    for hk in range(0, n_heads):
        K_head = K + b.to(tl.int64) * stride_kb + tl.cast(hk, tl.int64) * stride_kh
        kt = _load_keys(K_head, start_n, Lk, stride_kl, stride_kd, HEAD_DIM, BLOCK_N, BLOCK_D)  # once per head
        lse_head = Lse + (b.to(tl.int64) * H_KV + hk) * (GROUP * M)
        for start_r in range(0, GROUP * M, BLOCK_M):
            q, qi, valid = _sampled_queries(Q, Samples, b, hk, start_r, M, stride_qb, stride_qh, stride_ql,
                                            stride_qd, stride_sb, GROUP, HEAD_DIM, BLOCK_M, BLOCK_D)
            rows = start_r + tl.arange(0, BLOCK_M)
            lse = tl.load(lse_head + rows, mask=valid, other=float("inf"))
            # A row with no allowed key (lse = -inf) has zero mass: +inf makes every exp2 vanish.
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
            s, _ = _sampled_logits(q, qi, valid, kt, KeyBias_b, start_n, Lk, qk_scale,
                                   BLOCK_N, HAS_BIAS, IS_CAUSAL, UPCAST, DOT_PRECISION)
            mass += tl.sum(tl.exp2(s - lse[:, None]), 0)
    tl.store(Mass + b.to(tl.int64) * Lk + offs_n, tl.where(in_ref, mass, 0.0), mask=offs_n < Lk)


# ----------------------------------------------------------------------------------------------
# Stage 3: per-group normalisation and thresholds
# ----------------------------------------------------------------------------------------------

@triton.jit
def _group_span(Mass_b, KeyBias_b, RefRanges_b, RefGroups_b, g, Lq, Lk, R, stride_rr,
                HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK: tl.constexpr):
    """(lo, hi): min and max of r over group g's keys in R; (+inf, -inf) for an empty group."""
    lo = tl.full([BLOCK], float("inf"), tl.float32)
    hi = tl.full([BLOCK], float("-inf"), tl.float32)
    for r in range(0, R):
        start = tl.load(RefRanges_b + r * stride_rr)
        end = tl.load(RefRanges_b + r * stride_rr + 1)
        end = tl.where(tl.load(RefGroups_b + r) == g, end, start)  # other groups' ranges: empty loop
        for n in range(start, end, BLOCK):
            offs = n + tl.arange(0, BLOCK)
            member = (offs < end) & _key_allowed(KeyBias_b, offs, Lq, Lk, HAS_BIAS, IS_CAUSAL)
            x = tl.load(Mass_b + offs, mask=member, other=0.0)
            lo = tl.minimum(lo, tl.where(member, x, float("inf")))
            hi = tl.maximum(hi, tl.where(member, x, float("-inf")))
    return tl.min(lo, 0), tl.max(hi, 0)


@triton.jit
def _group_span_kernel(Mass, KeyBias, RefRanges, RefGroups, Lo, Hi, stride_biasb, stride_rb, stride_rr, stride_gb,
                       Lq, Lk, R, G, HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK: tl.constexpr):
    """grid (B, G): ``Lo[b, g], Hi[b, g]`` = the group's min and max mass (used by "quantile")."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    lo, hi = _group_span(Mass + b.to(tl.int64) * Lk, KeyBias + b.to(tl.int64) * stride_biasb,
                         RefRanges + b * stride_rb, RefGroups + b * stride_gb, g, Lq, Lk, R, stride_rr,
                         HAS_BIAS, IS_CAUSAL, BLOCK)
    tl.store(Lo + b * G + g, lo)
    tl.store(Hi + b * G + g, hi)


@triton.jit
def _group_weights_kernel(Mass, KeyBias, RefRanges, RefGroups, ThreshHi, ThreshLo, W,
                          stride_biasb, stride_rb, stride_rr, stride_gb,
                          Lq, Lk, R, G, gamma, tau_high, tau_low, degenerate_span,
                          HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr, QUANTILE: tl.constexpr,
                          BLOCK: tl.constexpr):
    """grid (B, G): ``W[b, k]`` for group g's keys in R (W starts at 1, so every other key keeps 1).

    r̂ = (r - lo) / (hi - lo); w = 1 + gamma if r̂ >= t_hi, else 1 - gamma if r̂ <= t_lo, else 1. The
    thresholds are the taus ("minmax") or the per-group quantiles of r̂ in ThreshHi/ThreshLo ("quantile").
    """
    b = tl.program_id(0)
    g = tl.program_id(1)
    Mass_b = Mass + b.to(tl.int64) * Lk
    KeyBias_b = KeyBias + b.to(tl.int64) * stride_biasb
    RefRanges_b = RefRanges + b * stride_rb
    RefGroups_b = RefGroups + b * stride_gb
    # Pass 1: the group's span (rescanning r is cheaper than another launch for "minmax").
    lo, hi = _group_span(Mass_b, KeyBias_b, RefRanges_b, RefGroups_b, g, Lq, Lk, R, stride_rr,
                         HAS_BIAS, IS_CAUSAL, BLOCK)
    span = hi - lo
    # A degenerate group (every key equally attended, or a single key) keeps weight 1: write nothing.
    # An empty group has span = -inf and is skipped the same way.
    ok = span > degenerate_span
    if QUANTILE:
        t_hi = tl.load(ThreshHi + b * G + g)
        t_lo = tl.load(ThreshLo + b * G + g)
    else:
        t_hi = tau_high
        t_lo = tau_low
    # Pass 2: weights.
    for r in range(0, R):
        start = tl.load(RefRanges_b + r * stride_rr)
        end = tl.load(RefRanges_b + r * stride_rr + 1)
        end = tl.where((tl.load(RefGroups_b + r) == g) & ok, end, start)
        for n in range(start, end, BLOCK):
            offs = n + tl.arange(0, BLOCK)
            member = (offs < end) & _key_allowed(KeyBias_b, offs, Lq, Lk, HAS_BIAS, IS_CAUSAL)
            x = tl.load(Mass_b + offs, mask=member, other=0.0)
            # Correctly rounded division, bit-identical to torch's, so the quantile thresholds (computed
            # by torch from the same r̂) select exactly the keys they were taken from.
            rhat = tl.div_rn(x - lo, span)
            w = tl.where(rhat >= t_hi, 1.0 + gamma, tl.where(rhat <= t_lo, 1.0 - gamma, 1.0))
            tl.store(W + b.to(tl.int64) * Lk + offs, w, mask=member)


# ----------------------------------------------------------------------------------------------
# Host side: validation, launches, custom ops
# ----------------------------------------------------------------------------------------------

def _check_inputs(q, k, samples, ref_ranges, ref_groups, key_bias, scale, thresholds=None):
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, L, D), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32 for the triton scoring kernels, got {t.dtype}")
    b, hq, lq, d = q.shape
    _, hk, lk, _ = k.shape
    if k.dtype != q.dtype:
        raise TypeError(f"k has dtype {k.dtype} but q has {q.dtype}; they must match")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in batch or head dim")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"the number of query heads Hq={hq} must be a multiple of the number of key heads Hk={hk}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D must be in 1..{MAX_HEAD_DIM} for the triton scoring kernels, got {d}")
    if min(b, lq, lk) == 0:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must not have zero-sized dims")
    for name, t, shape in (("samples", samples, (b, None)), ("ref_ranges", ref_ranges, (b, None, 2)),
                           ("ref_groups", ref_groups, (b, None))):
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        if t.dim() != len(shape) or any(w is not None and s != w for s, w in zip(t.shape, shape)):
            raise ValueError(f"{name} must have shape {tuple('*' if w is None else w for w in shape)}, "
                             f"got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if ref_groups.shape[1] != ref_ranges.shape[1]:
        raise ValueError(f"ref_groups {tuple(ref_groups.shape)} and ref_ranges {tuple(ref_ranges.shape)} "
                         "must list the same number of ranges")
    if key_bias is not None:
        if key_bias.dtype != torch.float32 or tuple(key_bias.shape) != (b, lk):
            raise ValueError(f"key_bias must be None or a (B, Lk) = ({b}, {lk}) float32 tensor, "
                             f"got {key_bias.dtype} {tuple(key_bias.shape)}")
        if key_bias.device != q.device:
            raise ValueError(f"key_bias is on {key_bias.device} but q is on {q.device}")
    if k.device != q.device:
        raise ValueError(f"k is on {k.device} but q is on {q.device}")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"the triton scoring kernels need CUDA tensors (q is on {q.device}); "
                         "set TRITON_INTERPRET=1 to run them on the CPU")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    if thresholds is not None and thresholds not in THRESHOLDS:
        raise ValueError(f"thresholds must be one of {THRESHOLDS}, got {thresholds!r}")


def _dot_mode(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, DOT_PRECISION) of the q.k dot for inputs of ``dtype``.

    bf16 operands are upcast to fp32 under the interpreter only (its bf16 tl.dot is wrong). Every fp32
    dot asks for exact fp32 ("ieee", not tf32): w thresholds r̂, which must agree with the float32 reference.
    """
    upcast = interpreting() and dtype == torch.bfloat16
    return upcast, ("ieee" if upcast or dtype == torch.float32 else "tf32")


def _key_bias_rows(key_bias, device) -> torch.Tensor:
    """The bias with unit key stride (a broadcast (1, Lk) row keeps its 0 batch stride); a dummy when None."""
    if key_bias is None:
        return torch.empty((1, 1), dtype=torch.float32, device=device)  # never read: HAS_BIAS=False
    return key_bias if key_bias.stride(1) == 1 else key_bias.contiguous()


def _pow2_bucket(n: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), cap)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count  # cached by torch: no sync


def _key_splits(lk: int, programs: int, device: torch.device) -> int:
    """How many key chunks stage 1 splits each row tile's keys into (see `_row_lse_kernel`)."""
    if interpreting():  # small test sizes: up to 3 chunks of 16 keys, so the combine path is exercised
        return min(3, triton.cdiv(lk, 16))
    # Aim at two programs per SM, with chunks of at least 1024 keys so each program streams a while.
    return max(1, min(triton.cdiv(2 * _sm_count(device), programs), triton.cdiv(lk, 1024)))


def _combine_splits(lse_part: torch.Tensor) -> torch.Tensor:
    """(B, Hq, M, S) partial log2-sum-exp2 -> (B, Hq, M): ``log2 Σ_s 2^part_s``, -inf if every part is
    -inf or any part is NaN (a row dropped for a non-finite logit: no mass either way)."""
    dropped = torch.isnan(lse_part).any(dim=-1)
    lse_part = torch.where(torch.isnan(lse_part), torch.full_like(lse_part, float("-inf")), lse_part)
    top = lse_part.amax(dim=-1, keepdim=True)
    top = torch.where(top == float("-inf"), torch.zeros_like(top), top)  # all-masked rows: no inf - inf
    lse = (top + torch.log2(torch.exp2(lse_part - top).sum(dim=-1, keepdim=True)))[..., 0]
    return torch.where(dropped, torch.full_like(lse, float("-inf")), lse).contiguous()


def _mass(q, k, samples, ref_ranges, ref_groups, key_bias, is_causal, scale) -> torch.Tensor:
    """Stages 1 and 2: r (B, Lk) float32."""
    b, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    group, m, r = hq // hk, samples.shape[1], ref_ranges.shape[1]
    upcast, precision = _dot_mode(q.dtype)
    has_bias = key_bias is not None
    bias = _key_bias_rows(key_bias, q.device)
    common = dict(GROUP=group, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), HAS_BIAS=has_bias,
                  IS_CAUSAL=bool(is_causal), UPCAST=upcast, DOT_PRECISION=precision)
    qk_scale = float(scale) * LOG2E
    splits = _key_splits(lk, triton.cdiv(group * m, 64) * b * hk, q.device)
    lse_part = torch.empty((b, hq, m, splits), dtype=torch.float32, device=q.device)
    grid1 = lambda meta: (triton.cdiv(group * m, meta["BLOCK_M"]), b * hk, splits)
    _row_lse_kernel[grid1](q, k, samples, bias, lse_part, *q.stride(), *k.stride(), samples.stride(0),
                           bias.stride(0), hk, lq, lk, m, splits, qk_scale, _pow2_bucket(lk, 1 << 16), **common)
    lse = _combine_splits(lse_part)
    mass = torch.empty((b, lk), dtype=torch.float32, device=q.device)
    grid2 = lambda meta: (triton.cdiv(lk, meta["BLOCK_N"]), b)
    _key_mass_kernel[grid2](q, k, samples, bias, lse, ref_ranges, ref_groups, mass, *q.stride(), *k.stride(),
                            samples.stride(0), bias.stride(0), ref_ranges.stride(0), ref_ranges.stride(1),
                            ref_groups.stride(0), hk, lq, lk, m, r, qk_scale, _pow2_bucket(group * m, 1024),
                            **common)
    return mass


def _group_members(ref_ranges, ref_groups, key_bias, is_causal, lq, lk, num_groups) -> torch.Tensor:
    """(B, G, Lk) bool: key k belongs to group g and is in R (the quantile path only; G is a handful)."""
    keys = torch.arange(lk, device=ref_ranges.device, dtype=torch.int32)
    inside = (keys >= ref_ranges[..., 0:1]) & (keys < ref_ranges[..., 1:2])  # (B, R, Lk)
    gids = torch.arange(num_groups, device=ref_ranges.device, dtype=torch.int32)
    member = (inside[:, None] & (ref_groups[:, None, :, None] == gids[None, :, None, None])).any(dim=2)
    if key_bias is not None:
        member = member & (key_bias != float("-inf"))[:, None, :]
    if is_causal:
        member = member & (keys < lq)
    return member


def _weights(mass, ref_ranges, ref_groups, num_groups, key_bias, is_causal, lq, gamma, tau_high, tau_low,
             thresholds) -> torch.Tensor:
    """Stage 3: w (B, Lk) float32 from the mass."""
    b, lk = mass.shape
    g, r = max(int(num_groups), 1), ref_ranges.shape[1]
    has_bias = key_bias is not None
    bias = _key_bias_rows(key_bias, mass.device)
    block = 64 if interpreting() else 1024
    geometry = (bias.stride(0), ref_ranges.stride(0), ref_ranges.stride(1), ref_groups.stride(0), lq, lk, r, g)
    quantile = thresholds == "quantile"
    t_hi = t_lo = mass  # unused by "minmax"
    if quantile:
        lo = torch.empty((b, g), dtype=torch.float32, device=mass.device)
        hi = torch.empty_like(lo)
        _group_span_kernel[(b, g)](mass, bias, ref_ranges, ref_groups, lo, hi, *geometry,
                                   HAS_BIAS=has_bias, IS_CAUSAL=bool(is_causal), BLOCK=block)
        span = hi - lo
        ok = span > DEGENERATE_SPAN
        # The same float32 r̂ the kernel computes (x - lo) / span, so thresholds match it bit for bit.
        rhat = (mass[:, None, :] - lo[..., None]) / torch.where(ok, span, torch.ones_like(span))[..., None]
        use = _group_members(ref_ranges, ref_groups, key_bias, is_causal, lq, lk, g) & ok[..., None]
        t_hi = group_quantile(rhat, use, tau_high).contiguous()
        t_lo = group_quantile(rhat, use, tau_low).contiguous()
    w = torch.ones((b, lk), dtype=torch.float32, device=mass.device)
    _group_weights_kernel[(b, g)](mass, bias, ref_ranges, ref_groups, t_hi, t_lo, w, *geometry,
                                  float(gamma), float(tau_high), float(tau_low), DEGENERATE_SPAN,
                                  HAS_BIAS=has_bias, IS_CAUSAL=bool(is_causal), QUANTILE=quantile, BLOCK=block)
    return w


def _plan_contiguous(samples, ref_ranges, ref_groups):
    # The plan tensors are tiny and already contiguous; the kernels assume unit inner strides.
    return samples.contiguous(), ref_ranges.contiguous(), ref_groups.contiguous()


@torch.library.custom_op("dar::sampled_attention_mass", mutates_args=())
def sampled_attention_mass(q: torch.Tensor, k: torch.Tensor, samples: torch.Tensor, ref_ranges: torch.Tensor,
                           ref_groups: torch.Tensor, key_bias: Optional[torch.Tensor], is_causal: bool,
                           scale: float) -> torch.Tensor:
    """(B, Lk) float32 ``r_k = Σ_h Σ_{i in S} softmax_i(k)`` for keys k in R, 0 elsewhere (stages 1-2).

    Arguments as for `key_weights`. Forward only (no autograd formula is registered).
    """
    _check_inputs(q, k, samples, ref_ranges, ref_groups, key_bias, scale)
    samples, ref_ranges, ref_groups = _plan_contiguous(samples, ref_ranges, ref_groups)
    return _mass(q, k, samples, ref_ranges, ref_groups, key_bias, is_causal, scale)


@sampled_attention_mass.register_fake
def _(q, k, samples, ref_ranges, ref_groups, key_bias, is_causal, scale):
    _check_inputs(q, k, samples, ref_ranges, ref_groups, key_bias, scale)
    return q.new_empty((q.shape[0], k.shape[2]), dtype=torch.float32)


def key_statistics(q, k, samples, ref_ranges, ref_groups, num_groups: int, key_bias, is_causal: bool, scale: float,
                   gamma: float, tau_high: float, tau_low: float, thresholds: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, w)``, both (B, Lk) float32, from one run of the three stages (arguments as for `key_weights`).

    A plain function, not an op: for inspection (the recorder) and tests, which want the mass too.
    """
    _check_inputs(q, k, samples, ref_ranges, ref_groups, key_bias, scale, thresholds)
    samples, ref_ranges, ref_groups = _plan_contiguous(samples, ref_ranges, ref_groups)
    mass = _mass(q, k, samples, ref_ranges, ref_groups, key_bias, is_causal, scale)
    w = _weights(mass, ref_ranges, ref_groups, num_groups, key_bias, is_causal, q.shape[2], gamma, tau_high,
                 tau_low, thresholds)
    return mass, w


@torch.library.custom_op("dar::key_weights", mutates_args=())
def key_weights(q: torch.Tensor, k: torch.Tensor, samples: torch.Tensor, ref_ranges: torch.Tensor,
                ref_groups: torch.Tensor, num_groups: int, key_bias: Optional[torch.Tensor], is_causal: bool,
                scale: float, gamma: float, tau_high: float, tau_low: float, thresholds: str) -> torch.Tensor:
    """DAR key weights ``w (B, Lk)`` float32 (docs/semantics.md steps 3-6) from the plan tensors.

    q (B, Hq, Lq, D), k (B, Hk, Lk, D): fp16/bf16/fp32, any strides, Hq % Hk == 0.
    samples (B, M) int32 sampled query indices (-1 = padding); ref_ranges (B, R, 2) int32 half-open
    key ranges ((0, 0) = padding); ref_groups (B, R) int32 group of each range (-1 = padding) with
    ``num_groups`` groups -- the `dar.plan.PlanTensors` fields. key_bias: None or (B, Lk) float32
    additive per-key bias, -inf = padded key (not in R). is_causal: top-left causal mask. The rest
    are the `DARConfig` fields of the same names. Keys outside R, and rows with no samples or no
    ranges, get weight 1.
    """
    return key_statistics(q, k, samples, ref_ranges, ref_groups, num_groups, key_bias, is_causal, scale, gamma,
                          tau_high, tau_low, thresholds)[1]


@key_weights.register_fake
def _(q, k, samples, ref_ranges, ref_groups, num_groups, key_bias, is_causal, scale, gamma, tau_high, tau_low,
      thresholds):
    _check_inputs(q, k, samples, ref_ranges, ref_groups, key_bias, scale, thresholds)
    return q.new_empty((q.shape[0], k.shape[2]), dtype=torch.float32)


def _no_gradient(ctx, grad_w):
    # w is piecewise constant in q and k (thresholds of r̂): its gradient is zero almost everywhere.
    return (None,) * 13


key_weights.register_autograd(_no_gradient)


__all__ = ["key_weights", "key_statistics", "sampled_attention_mass", "interpreting", "THRESHOLDS", "SUPPORTED_DTYPES", "MAX_HEAD_DIM"]
