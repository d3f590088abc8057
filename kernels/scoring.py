"""DAR scoring in Triton: sampled-query attention mass -> per-key weights (docs/semantics.md, steps 3-6),
for dense batches and for packed (varlen) sequences.

Three launches, none of which writes a logit to memory:

1. ``_row_lse_kernel``, grid (packed-row tiles, batch x KV heads, key splits): for every (batch,
   head, sampled query) the log-sum-exp of its softmax row over the allowed keys, with the
   flash-attention online max. The keys are split into chunks (flash-decoding style) so that the few
   rows (``Hq/Hk * m`` per KV head) still fill the GPU; each split writes its partial result, NaN for
   a row dropped for a non-finite logit (docs/semantics.md, "Non-finite inputs").
2. ``_key_mass_kernel``, grid (key tiles, batch): ``r`` of every key of the tile, summed over every KV
   head and packed row in one software-pipelined loop (K, Q and the partial log-sum-exps of the next
   iteration load while this one computes). The split partials are combined right there (one
   ``(BLOCK_M, SPLITS)`` load per row tile), so nothing runs between the launches. Its epilogue
   writes ``r`` and folds the tile's per-group min and max of ``r`` into ``stats`` with float atomic
   max (exact, so the result does not depend on the order of the programs).
3. ``_weights_kernel``, grid (key tiles, batch): ``r̂ = (r - lo) / (hi - lo)`` and the dual threshold
   for every key of the tile; it writes every weight (1 outside R), so ``w`` needs no initialisation.
   ``thresholds="quantile"`` first takes each group's quantiles of ``r̂`` with device-side torch ops
   (a segmented sort of the packed keys, `_group_quantiles`); no host synchronisation either way.

Work is ``O(Hq · m · Lk · D)`` (m sampled queries), never ``Lq · Lk``. The queries of one KV head's
GQA group are packed into the rows of one tile, so every K tile load serves all of them.

Public entry points, all `torch.library` custom ops traceable by ``torch.compile(fullgraph=True)``:
`key_weights` (``dar::key_weights``, dense ``(B, H, L, D)``), `key_weights_varlen`
(``dar::key_weights_varlen``, packed ``(total, H, D)`` with ``cu_seqlens``) and
`sampled_attention_mass` (``dar::sampled_attention_mass``, stages 1-2); and `key_statistics` /
`key_statistics_varlen` (plain Python: r and w from one run, for inspection).

Verification status: every path here is tested on the CPU with ``TRITON_INTERPRET=1``
(tests/kernels/test_scoring.py, tests/kernels/test_scoring_varlen.py). The compiled kernels are read by
``benchmarks/static_report.py`` (SASS, registers, spills) but have not run on a GPU: the autotuning
tables (scoring_autotune.py; their pruning logic is unit-tested), bf16 ``tl.dot`` without the
interpreter's fp32 upcast, the split heuristic's performance and 64-bit offsets past 2^31 elements are
unmeasured. The first call for a new autotune key benchmarks, so warm the op up before capturing it in
a CUDA graph.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import scoring_autotune as tuning
from .features import INTERPRETED, PIPELINED_KEY_MASS, lazy_autotune
from .shared import DEGENERATE_SPAN, LOG2E, MAX_HEAD_DIM, SUPPORTED_DTYPES

THRESHOLDS = ("minmax", "quantile")
_LOG2E = tl.constexpr(LOG2E)  # log2 e, readable from inside @triton.jit functions


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``; `features.INTERPRETED`)."""
    return INTERPRETED


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _sequence(b, Cu, L, stride_b, stride_l, VARLEN: tl.constexpr):
    """``(offset, length, first)`` of batch row / sequence ``b``: its element offset into the tensor
    (int64), its length and its first row in the flat ``(B * L)`` / ``(total,)`` outputs (int64).

    Dense: row b of a (B, H, L, D) tensor, L rows. Varlen: rows ``[Cu[b], Cu[b + 1])`` of (total, H, D)."""
    if VARLEN:
        start = tl.load(Cu + b)
        end = tl.load(Cu + b + 1)
        return start.to(tl.int64) * stride_l, end - start, start.to(tl.int64)
    else:
        return b.to(tl.int64) * stride_b, L, b.to(tl.int64) * L


@triton.jit
def _sampled_queries(Q_b, Samples, b, hk, start_r, M, lq_b, stride_qh, stride_ql, stride_qd, stride_sb,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``start_r ..`` of KV head ``hk``'s packed (query head, sample) axis: their q tile and query index.

    Packed row ``r`` is sample ``r % M`` of query head ``hk * GROUP + r // M``: the GROUP query heads that
    share one KV head (GQA) sit in one tile and reuse its K loads. Padding samples (-1) are invalid.
    """
    rows = start_r + tl.arange(0, BLOCK_M)
    in_pack = rows < GROUP * M
    qi = tl.load(Samples + b * stride_sb + rows % M, mask=in_pack, other=-1)
    valid = in_pack & (qi >= 0) & (qi < lq_b)
    head = hk * GROUP + rows // M
    offs_d = tl.arange(0, BLOCK_D)
    # 64-bit offsets: head and row strides can multiply past 2^31 on long sequences.
    q_ptrs = (Q_b + head.to(tl.int64)[:, None] * stride_qh + qi.to(tl.int64)[:, None] * stride_ql
              + offs_d[None, :] * stride_qd)
    # The head dim is padded to a power of two; the padding lanes load 0 and add nothing to q.k.
    q = tl.load(q_ptrs, mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    return q, qi, valid


@triton.jit
def _load_keys(K_head, start_n, lk_b, stride_kl, stride_kd,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """K^T tile (BLOCK_D, BLOCK_N) of keys ``start_n ..``; out-of-range keys and padded dims load 0."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_ptrs = K_head + offs_n.to(tl.int64)[None, :] * stride_kl + offs_d[:, None] * stride_kd
    return tl.load(k_ptrs, mask=(offs_n[None, :] < lk_b) & (offs_d[:, None] < HEAD_DIM), other=0.0)


@triton.jit
def _sampled_logits(q, qi, valid, kt, KeyBias_b, start_n, lk_b, diag, qk_scale,
                    BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) logits of the sampled rows against the key tile at ``start_n``, in log2 units;
    -inf where a key is not allowed (out of range, masked by a -inf key bias, or past the causal diagonal
    ``j <= i + diag``) or the row is not ``valid``. A NaN or +inf logit of an allowed key stays: stage 1
    sees it as a NaN sum (docs/semantics.md, "Non-finite inputs")."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if UPCAST:  # the interpreter's bf16 tl.dot multiplies raw bit patterns (triton #11584)
        q = q.to(tl.float32)
        kt = kt.to(tl.float32)
    # qk_scale = scale * log2(e): the softmax is evaluated with exp2, as in the flash-attention tutorial.
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
    allowed = valid[:, None] & (offs_n[None, :] < lk_b)
    if HAS_BIAS:
        bias = tl.load(KeyBias_b + offs_n, mask=offs_n < lk_b, other=0.0)
        allowed = allowed & (bias != float("-inf"))[None, :]
        s = s + bias[None, :] * _LOG2E
    if IS_CAUSAL:
        allowed = allowed & (offs_n[None, :] <= qi[:, None] + diag)
    return tl.where(allowed, s, float("-inf"))


@triton.jit
def _reference_groups(KeyBias_b, RefRanges_b, RefGroups_b, offs_n, lq_b, lk_b, diag, R, stride_rr,
                      HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """(BLOCK_N,) int32 group of each key in R, -1 for keys outside R (no range, padded out by a -inf
    bias, past ``Lk``, or beyond every query's causal reach ``j < Lq + diag``)."""
    gid = tl.full(offs_n.shape, -1, tl.int32)
    for r in range(0, R):  # R = reference ranges of the batch (a handful); padding is (0, 0), group -1
        lo = tl.load(RefRanges_b + r * stride_rr)
        hi = tl.load(RefRanges_b + r * stride_rr + 1)
        grp = tl.load(RefGroups_b + r)
        gid = tl.where((offs_n >= lo) & (offs_n < hi) & (grp >= 0), grp, gid)
    ok = offs_n < lk_b
    if HAS_BIAS:
        ok = ok & (tl.load(KeyBias_b + offs_n, mask=ok, other=float("-inf")) != float("-inf"))
    if IS_CAUSAL:
        ok = ok & (offs_n < lq_b + diag)
    return tl.where(ok, gid, -1)


@triton.jit
def _combined_lse(LsePart_h, rows, valid, SPLITS, SPLITS_P2: tl.constexpr):
    """(BLOCK_M,) log2-sum-exp2 of each row from its SPLITS partials; +inf for a row that has no mass
    (no allowed key, a padding sample, or dropped: a NaN partial), so that ``exp2(s - lse)`` is 0."""
    offs_s = tl.arange(0, SPLITS_P2)
    part = tl.load(LsePart_h + rows.to(tl.int64)[:, None] * SPLITS + offs_s[None, :],
                   mask=valid[:, None] & (offs_s[None, :] < SPLITS), other=float("-inf"))
    dropped = tl.max((part != part).to(tl.int32), 1) > 0
    part = tl.where(part != part, float("-inf"), part)
    top = tl.max(part, 1)
    top = tl.where(top == float("-inf"), 0.0, top)  # all -inf: no inf - inf below
    total = tl.sum(tl.exp2(part - top[:, None]), 1)
    lse = top + tl.log2(tl.where(total > 0, total, 1.0))
    # (valid == 0, not ~valid: the interpreter before Triton 3.4 cannot invert a boolean block)
    return tl.where(dropped | (total == 0) | (valid == 0), float("inf"), lse)


# ----------------------------------------------------------------------------------------------
# Stage 1: row statistics of the sampled queries
# ----------------------------------------------------------------------------------------------

@triton.jit
def _row_lse_kernel(Q, K, CuQ, CuK, Samples, KeyBias, LsePart,
                    stride_qb, stride_qh, stride_ql, stride_qd,
                    stride_kb, stride_kh, stride_kl, stride_kd,
                    stride_sb, stride_biasb,
                    H_KV, Lq, Lk, M, SPLITS, qk_scale, LK_BUCKET,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """grid (packed-row tiles, B * Hk, SPLITS): ``LsePart[b, h, j, split] = log2 Σ_k exp2(s_hjk)`` over the
    split's chunk of keys (-inf where the chunk holds no allowed key, NaN for a dropped row).

    Lq / Lk are the sizes of a dense batch, or the longest sequence of a packed one.
    """
    start_r = tl.program_id(0) * BLOCK_M
    b = tl.program_id(1) // H_KV
    hk = tl.program_id(1) % H_KV
    split = tl.program_id(2)
    q_off, lq_b, _ = _sequence(b, CuQ, Lq, stride_qb, stride_ql, VARLEN)
    k_off, lk_b, _ = _sequence(b, CuK, Lk, stride_kb, stride_kl, VARLEN)
    if VARLEN:
        diag = lk_b - lq_b  # flash-attn's bottom-right causal rule
    else:
        diag = 0  # SDPA's top-left rule
    q, qi, valid = _sampled_queries(Q + q_off, Samples, b, hk, start_r, M, lq_b, stride_qh, stride_ql,
                                    stride_qd, stride_sb, GROUP, HEAD_DIM, BLOCK_M, BLOCK_D)
    K_head = K + k_off + hk.to(tl.int64) * stride_kh
    KeyBias_b = KeyBias + b.to(tl.int64) * stride_biasb
    chunk = tl.cdiv(tl.cdiv(Lk, SPLITS), BLOCK_N) * BLOCK_N  # whole tiles per split
    begin = split * chunk
    end = tl.minimum(lk_b, begin + chunk)
    if IS_CAUSAL:  # no row of this tile sees a key past its largest query index
        end = tl.minimum(end, tl.max(tl.where(valid, qi, -1), 0) + diag + 1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(begin, end, BLOCK_N):
        kt = _load_keys(K_head, start_n, lk_b, stride_kl, stride_kd, HEAD_DIM, BLOCK_N, BLOCK_D)
        s = _sampled_logits(q, qi, valid, kt, KeyBias_b, start_n, lk_b, diag, qk_scale,
                            BLOCK_N, HAS_BIAS, IS_CAUSAL, UPCAST, DOT_PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only masked keys keeps m = -inf; shift by 0 there so that
        # exp2(-inf - -inf) = NaN never appears (its terms are exp2(-inf) = 0).
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_shift) + tl.sum(tl.exp2(s - m_shift[:, None]), 1)
        m_i = m_new
    # A NaN or +inf logit on an allowed key makes l NaN (exp2(NaN) or exp2(inf - inf)), whether max()
    # propagates NaN (the interpreter) or ignores it (GPU fmax): that row is dropped, marked NaN.
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    lse = tl.where(l_i != l_i, float("nan"), lse)
    rows = start_r + tl.arange(0, BLOCK_M)
    # LsePart is (B, Hq, M, SPLITS) contiguous: KV head hk's packed rows are one contiguous run.
    row_base = (b.to(tl.int64) * H_KV + hk) * (GROUP * M)
    tl.store(LsePart + (row_base + rows) * SPLITS + split, lse, mask=rows < GROUP * M)


# ----------------------------------------------------------------------------------------------
# Stage 2: attention mass of every reference key, and each group's min / max
# ----------------------------------------------------------------------------------------------

@triton.jit
def _key_mass_kernel(Q, K, CuQ, CuK, Samples, KeyBias, LsePart, RefRanges, RefGroups, Mass, KeyGroup, Stats,
                     stride_qb, stride_qh, stride_ql, stride_qd,
                     stride_kb, stride_kh, stride_kl, stride_kd,
                     stride_sb, stride_biasb, stride_rb, stride_rr, stride_gb,
                     H_KV, Lq, Lk, M, R, G, SPLITS, qk_scale, ROWS_BUCKET,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
                     WRITE_GROUPS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     SPLITS_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """grid (key tiles, B): ``Mass[k] = Σ_h Σ_j exp2(s_hjk - lse_hj)`` for keys k in R (0 elsewhere), and
    ``Stats[b, g] = (max r, max -r)`` over group g's keys in R via atomic max (initialised to -inf).
    ``KeyGroup[k] = b * G + g`` (-1 outside R) when WRITE_GROUPS (the quantile path)."""
    start_n = tl.program_id(0) * BLOCK_N
    b = tl.program_id(1)
    q_off, lq_b, _q_first = _sequence(b, CuQ, Lq, stride_qb, stride_ql, VARLEN)
    k_off, lk_b, first = _sequence(b, CuK, Lk, stride_kb, stride_kl, VARLEN)
    if VARLEN:
        diag = lk_b - lq_b
    else:
        diag = 0
    if start_n < lk_b:  # a packed batch's grid covers its longest sequence
        offs_n = start_n + tl.arange(0, BLOCK_N)
        KeyBias_b = KeyBias + b.to(tl.int64) * stride_biasb
        gid = _reference_groups(KeyBias_b, RefRanges + b * stride_rb, RefGroups + b * stride_gb, offs_n,
                                lq_b, lk_b, diag, R, stride_rr, HAS_BIAS, IS_CAUSAL)
        in_ref = gid >= 0
        # A key tile with no reference key skips the loop: the cost follows |R|, not Lk.
        row_tiles = tl.cdiv(GROUP * M, BLOCK_M)
        n_iter = tl.where(tl.max(in_ref.to(tl.int32), 0) > 0, H_KV * row_tiles, 0)
        Q_b = Q + q_off
        mass = tl.zeros([BLOCK_N], tl.float32)
        # One flat loop over (KV head, row tile), so the pipeliner prefetches the next K tile, Q tile
        # and partial lse while this iteration's dot runs.
        for it in tl.range(0, n_iter):
            hk = it // row_tiles
            start_r = (it % row_tiles) * BLOCK_M
            kt = _load_keys(K + k_off + hk.to(tl.int64) * stride_kh, start_n, lk_b, stride_kl, stride_kd,
                            HEAD_DIM, BLOCK_N, BLOCK_D)
            q, qi, valid = _sampled_queries(Q_b, Samples, b, hk, start_r, M, lq_b, stride_qh, stride_ql,
                                            stride_qd, stride_sb, GROUP, HEAD_DIM, BLOCK_M, BLOCK_D)
            rows = start_r + tl.arange(0, BLOCK_M)
            lse = _combined_lse(LsePart + (b.to(tl.int64) * H_KV + hk) * (GROUP * M * SPLITS), rows, valid,
                                SPLITS, SPLITS_P2)
            # Rows without mass (lse = +inf: dropped, padding, nothing allowed) are masked out whole, so
            # a dropped row's NaN / +inf logits never reach exp2.
            s = _sampled_logits(q, qi, valid & (lse < float("inf")), kt, KeyBias_b, start_n, lk_b, diag, qk_scale,
                                BLOCK_N, HAS_BIAS, IS_CAUSAL, UPCAST, DOT_PRECISION)
            mass += tl.sum(tl.exp2(s - lse[:, None]), 0)
        mass = tl.where(in_ref, mass, 0.0)
        in_seq = offs_n < lk_b
        tl.store(Mass + first + offs_n, mass, mask=in_seq)
        if WRITE_GROUPS:
            tl.store(KeyGroup + first + offs_n, tl.where(in_ref, b * G + gid, -1), mask=in_seq)
        # Epilogue: this tile's share of each group's span. Float max is exact, so the atomics give
        # the same lo / hi whatever order the programs run in.
        for g in range(0, G):
            member = gid == g
            has = tl.max(member.to(tl.int32), 0) > 0
            stat = Stats + (b * G + g) * 2
            tl.atomic_max(stat, tl.max(tl.where(member, mass, float("-inf")), 0), mask=has)
            tl.atomic_max(stat + 1, tl.max(tl.where(member, -mass, float("-inf")), 0), mask=has)


# Autotuning: tables per GPU generation in scoring_autotune.py; one config under the interpreter. The
# autotuners are built at the first launch (`features.lazy_autotune`).
_row_lse_kernel = lazy_autotune(_row_lse_kernel, tuning.configs(tuning.ROW_LSE, INTERPRETED),
                                ["HEAD_DIM", "LK_BUCKET", "GROUP"], tuning.prune(tuning.ROW_LSE))
_KEY_MASS_STAGES = None if PIPELINED_KEY_MASS else 2
_key_mass_kernel = lazy_autotune(_key_mass_kernel, tuning.configs(tuning.KEY_MASS, INTERPRETED, _KEY_MASS_STAGES),
                                 ["HEAD_DIM", "ROWS_BUCKET", "GROUP"], tuning.prune(tuning.KEY_MASS, _KEY_MASS_STAGES))


# ----------------------------------------------------------------------------------------------
# Stage 3: normalisation and thresholds, every key tile in parallel
# ----------------------------------------------------------------------------------------------

@triton.jit
def _weights_kernel(Mass, CuQ, CuK, KeyBias, RefRanges, RefGroups, Stats, ThreshHi, ThreshLo, W,
                    stride_biasb, stride_rb, stride_rr, stride_gb,
                    Lq, Lk, R, G, boost, damp, tau_high, tau_low, degenerate_span,
                    HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
                    QUANTILE: tl.constexpr, BLOCK: tl.constexpr):
    """grid (key tiles, B): ``W[k]`` for every key of the tile.

    For key k of group g in R: ``r̂ = (r - lo) / (hi - lo)``, ``w = boost`` if r̂ >= t_hi, else ``damp``
    if r̂ <= t_lo, else 1, unless the group is degenerate (``hi - lo <= degenerate_span``, or empty).
    Every other key: 1. Thresholds are the taus ("minmax") or ThreshHi/ThreshLo[b, g] ("quantile").
    ``boost`` / ``damp`` are float32(1 ± gamma), rounded once on the host as the spec says.
    """
    start_n = tl.program_id(0) * BLOCK
    b = tl.program_id(1)
    _, lq_b, _ = _sequence(b, CuQ, Lq, 0, 0, VARLEN)
    _, lk_b, first = _sequence(b, CuK, Lk, 0, 0, VARLEN)
    if VARLEN:
        diag = lk_b - lq_b
    else:
        diag = 0
    if start_n < lk_b:
        offs = start_n + tl.arange(0, BLOCK)
        in_seq = offs < lk_b
        gid = _reference_groups(KeyBias + b.to(tl.int64) * stride_biasb, RefRanges + b * stride_rb,
                                RefGroups + b * stride_gb, offs, lq_b, lk_b, diag, R, stride_rr,
                                HAS_BIAS, IS_CAUSAL)
        x = tl.load(Mass + first + offs, mask=in_seq & (gid >= 0), other=0.0)
        w = tl.full([BLOCK], 1.0, tl.float32)
        for g in range(0, G):
            hi = tl.load(Stats + (b * G + g) * 2)
            lo = -tl.load(Stats + (b * G + g) * 2 + 1)
            span = hi - lo  # -inf for an empty group: skipped like a degenerate one
            ok = span > degenerate_span
            if QUANTILE:
                t_hi = tl.load(ThreshHi + b * G + g)
                t_lo = tl.load(ThreshLo + b * G + g)
            else:
                t_hi = tau_high
                t_lo = tau_low
            # Correctly rounded division, bit-identical to torch's, so the quantile thresholds (computed
            # by torch from the same r̂) select exactly the keys they were taken from.
            rhat = tl.div_rn(x - lo, tl.where(ok, span, 1.0))
            wg = tl.where(rhat >= t_hi, boost, tl.where(rhat <= t_lo, damp, 1.0))
            # Group g's keys, none when it is degenerate (written as a compare: the interpreter cannot
            # AND a block with a scalar bool).
            w = tl.where(gid == tl.where(ok, g, -2), wg, w)
        tl.store(W + first + offs, w, mask=in_seq)


# ----------------------------------------------------------------------------------------------
# Host side: validation, launches, custom ops
# ----------------------------------------------------------------------------------------------

def _check_plan(samples, ref_ranges, ref_groups, batch: int, device, what: str) -> None:
    for name, t, shape in (("samples", samples, (batch, None)), ("ref_ranges", ref_ranges, (batch, None, 2)),
                           ("ref_groups", ref_groups, (batch, None))):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        if t.dim() != len(shape) or any(w is not None and s != w for s, w in zip(t.shape, shape)):
            raise ValueError(f"{name} must have shape {tuple(what if w is None and i == 0 else '*' if w is None else w for i, w in enumerate(shape))}"
                             f", got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}")
    if ref_groups.shape[1] != ref_ranges.shape[1]:
        raise ValueError(f"ref_groups {tuple(ref_groups.shape)} and ref_ranges {tuple(ref_ranges.shape)} "
                         "must list the same number of ranges")


def _check_common(q, k, hq, hk, d, scale, thresholds) -> None:
    for name, t in (("q", q), ("k", k)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32 for the triton scoring kernels, got {t.dtype}")
    if k.dtype != q.dtype:
        raise TypeError(f"k has dtype {k.dtype} but q has {q.dtype}; they must match")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"the number of query heads Hq={hq} must be a multiple of the number of key heads Hk={hk}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D must be in 1..{MAX_HEAD_DIM} for the triton scoring kernels, got {d}")
    if k.device != q.device:
        raise ValueError(f"k is on {k.device} but q is on {q.device}")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"the triton scoring kernels need CUDA tensors (q is on {q.device}); "
                         "set TRITON_INTERPRET=1 to run them on the CPU")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    if thresholds is not None and thresholds not in THRESHOLDS:
        raise ValueError(f"thresholds must be one of {THRESHOLDS}, got {thresholds!r}")


def _check_inputs(q, k, samples, ref_ranges, ref_groups, key_bias, scale, thresholds=None):
    """The dense ops' arguments (metadata only: no host synchronisation)."""
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, L, D), got shape {tuple(t.shape)}")
    b, hq, lq, d = q.shape
    _, hk, lk, _ = k.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in batch or head dim")
    _check_common(q, k, hq, hk, d, scale, thresholds)
    if min(b, lq, lk) == 0:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must not have zero-sized dims")
    _check_plan(samples, ref_ranges, ref_groups, b, q.device, "B")
    if key_bias is not None:
        if key_bias.dtype != torch.float32 or tuple(key_bias.shape) != (b, lk):
            raise ValueError(f"key_bias must be None or a (B, Lk) = ({b}, {lk}) float32 tensor, "
                             f"got {key_bias.dtype} {tuple(key_bias.shape)}")
        if key_bias.device != q.device:
            raise ValueError(f"key_bias is on {key_bias.device} but q is on {q.device}")


def _check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, samples, ref_ranges, ref_groups,
                  scale, thresholds=None):
    """The varlen ops' arguments (metadata only: the cu_seqlens values are never read on the host)."""
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total, H, D) like flash_attn_varlen_func, got shape {tuple(t.shape)}")
    _, hq, d = q.shape
    _, hk, dk = k.shape
    if dk != d:
        raise ValueError(f"q and k head dims differ: {d} vs {dk}")
    _check_common(q, k, hq, hk, d, scale, thresholds)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 2:
            raise ValueError(f"{name} must be an int32 tensor of shape (N + 1,) with N >= 1, "
                             f"got {cu.dtype} {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k {tuple(cu_seqlens_k.shape)} "
                         "must describe the same number of sequences")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    _check_plan(samples, ref_ranges, ref_groups, cu_seqlens_q.shape[0] - 1, q.device, "N")


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
        return max(1, min(3, triton.cdiv(lk, 16)))
    # Aim at two programs per SM, with chunks of at least 1024 keys so each program streams a while.
    return max(1, min(triton.cdiv(2 * _sm_count(device), programs), triton.cdiv(lk, 1024)))


def _group_quantiles(rhat: torch.Tensor, key_group: torch.Tensor, use: torch.Tensor, num: int,
                     taus: tuple[float, ...]) -> list[torch.Tensor]:
    """torch.quantile's linear rule per group, on packed keys: ``rhat``, ``key_group`` (global group id,
    -1 outside R) and ``use`` (key counted) are flat; returns one ``(num,)`` float32 tensor per tau.

    A segmented sort (by r̂, then stably by group) instead of a ``(groups, Lk)`` padded one, so a packed
    batch is never padded to its longest sequence. Device ops only: no host synchronisation.
    """
    n_keys = rhat.numel()
    key = torch.where(use, key_group.long(), torch.full_like(key_group, num, dtype=torch.long))
    values = torch.where(use, rhat, torch.full_like(rhat, float("inf")))
    by_value = torch.sort(values, stable=True).indices
    by_group = torch.sort(key[by_value], stable=True).indices
    ordered = values[by_value][by_group]
    counts = torch.zeros(num + 1, dtype=torch.long, device=rhat.device).scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num]
    starts = torch.cumsum(counts, 0) - counts
    out = []
    for tau in taus:
        pos = tau * (counts - 1).clamp(min=0).to(rhat.dtype)  # as dar.scoring.group_quantile computes it
        lo, hi = pos.floor(), pos.ceil()
        v_lo = ordered[(starts + lo.long()).clamp(max=n_keys - 1)]
        v_hi = ordered[(starts + hi.long()).clamp(max=n_keys - 1)]
        out.append(torch.lerp(v_lo, v_hi, pos - lo).contiguous())
    return out


def kernel_arguments(q, k, cu_q, cu_k, lq: int, lk: int, strides_q, strides_k, samples, ref_ranges, ref_groups,
                     num_groups: int, key_bias, is_causal: bool, scale: float, varlen: bool, splits: int,
                     buffers: dict, weights=None) -> list[tuple[dict, dict]]:
    """Runtime arguments and constexprs (all but the tuned BLOCK_M / BLOCK_N) of the three stages, in
    order; shared by the ops and ``benchmarks/static_report.py``, which passes ``meta`` tensors.

    ``buffers``: ``lse_part`` (B, Hq, M, splits), ``mass`` and ``key_group`` (flat keys), ``stats``
    (B, G, 2), ``t_hi`` / ``t_lo`` (B * G,) and ``w`` (flat keys). ``weights``: None or ``(gamma,
    tau_high, tau_low, thresholds)``; stage 3's entry is None without it.
    """
    nb = samples.shape[0]
    hq, hk, d = q.shape[1], k.shape[1], q.shape[-1]  # (B, H, L, D) or (total, H, D)
    group, m, r = hq // hk, samples.shape[1], ref_ranges.shape[1]
    g = max(int(num_groups), 1)
    upcast, precision = _dot_mode(q.dtype)
    has_bias = key_bias is not None
    bias = _key_bias_rows(key_bias, q.device)
    cu_q = cu_q if varlen else samples  # dummies when dense: never read
    cu_k = cu_k if varlen else samples
    quantile = weights is not None and weights[3] == "quantile"
    names = ("stride_qb", "stride_qh", "stride_ql", "stride_qd", "stride_kb", "stride_kh", "stride_kl", "stride_kd")
    common_args = dict(Q=q, K=k, CuQ=cu_q, CuK=cu_k, Samples=samples, KeyBias=bias,
                       **dict(zip(names, (*strides_q, *strides_k))), stride_sb=samples.stride(0),
                       stride_biasb=bias.stride(0), H_KV=hk, Lq=lq, Lk=lk, M=m, SPLITS=splits,
                       qk_scale=float(scale) * LOG2E)
    common = dict(GROUP=group, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), HAS_BIAS=has_bias,
                  IS_CAUSAL=bool(is_causal), VARLEN=varlen, UPCAST=upcast, DOT_PRECISION=precision)
    stage1 = (dict(common_args, LsePart=buffers["lse_part"], LK_BUCKET=_pow2_bucket(lk, 1 << 16)), common)
    stage2 = (dict(common_args, LsePart=buffers["lse_part"], RefRanges=ref_ranges, RefGroups=ref_groups,
                   Mass=buffers["mass"], KeyGroup=buffers["key_group"], Stats=buffers["stats"],
                   stride_rb=ref_ranges.stride(0), stride_rr=ref_ranges.stride(1), stride_gb=ref_groups.stride(0),
                   R=r, G=g, ROWS_BUCKET=_pow2_bucket(group * m, 1024)),
              dict(common, WRITE_GROUPS=quantile, SPLITS_P2=triton.next_power_of_2(splits)))
    stage3 = None
    if weights is not None:
        gamma, tau_high, tau_low, _ = weights
        # float32(1 +- gamma) rounded once from the double, as docs/semantics.md says.
        boost, damp = (float(torch.tensor(1.0 + gamma, dtype=torch.float32)),
                       float(torch.tensor(1.0 - gamma, dtype=torch.float32)))
        stage3 = (dict(Mass=buffers["mass"], CuQ=cu_q, CuK=cu_k, KeyBias=bias, RefRanges=ref_ranges,
                       RefGroups=ref_groups, Stats=buffers["stats"], ThreshHi=buffers["t_hi"],
                       ThreshLo=buffers["t_lo"], W=buffers["w"], stride_biasb=bias.stride(0),
                       stride_rb=ref_ranges.stride(0), stride_rr=ref_ranges.stride(1), stride_gb=ref_groups.stride(0),
                       Lq=lq, Lk=lk, R=r, G=g, boost=boost, damp=damp, tau_high=float(tau_high),
                       tau_low=float(tau_low), degenerate_span=DEGENERATE_SPAN),
                  dict(HAS_BIAS=has_bias, IS_CAUSAL=bool(is_causal), VARLEN=varlen, QUANTILE=quantile,
                       BLOCK=WEIGHTS_BLOCK if not interpreting() else 64))
    return [stage1, stage2, stage3]


# Stage 3's key tile: it does a few flops per key, so one wide tile per program.
WEIGHTS_BLOCK = 1024


def _run(q, k, cu_q, cu_k, lq: int, lk: int, strides_q, strides_k, samples, ref_ranges, ref_groups,
         num_groups: int, key_bias, is_causal: bool, scale: float, weights, varlen: bool):
    """Stages 1-3. ``strides_*`` = (batch, head, row, dim) element strides (batch 0 when packed);
    ``weights`` = None (stages 1-2 only) or ``(gamma, tau_high, tau_low, thresholds)``. Returns
    ``(r, w)`` flat over the keys ((B * Lk,) or (total_k,)), w None without ``weights``."""
    nb = samples.shape[0]
    hq, hk = q.shape[1], k.shape[1]
    group, m = hq // hk, samples.shape[1]
    g = max(int(num_groups), 1)
    n_keys = k.shape[0] if varlen else nb * lk
    dev = q.device
    samples, ref_ranges, ref_groups = samples.contiguous(), ref_ranges.contiguous(), ref_groups.contiguous()
    mass = torch.empty(n_keys, dtype=torch.float32, device=dev)
    if lk == 0 or m == 0 or lq == 0:  # nothing to score (empty packed batch, or no sample anywhere)
        mass.zero_()
        return mass, (None if weights is None else torch.ones_like(mass))
    splits = _key_splits(lk, triton.cdiv(group * m, 64) * nb * hk, dev)
    quantile = weights is not None and weights[3] == "quantile"
    stats = torch.full((nb, g, 2), float("-inf"), dtype=torch.float32, device=dev)
    buffers = dict(lse_part=torch.empty((nb, hq, m, splits), dtype=torch.float32, device=dev), mass=mass,
                   key_group=torch.empty(n_keys if quantile else 1, dtype=torch.int32, device=dev), stats=stats,
                   t_hi=stats, t_lo=stats, w=torch.empty_like(mass))  # thresholds: "quantile" only, set below
    s1, s2, s3 = kernel_arguments(q, k, cu_q, cu_k, lq, lk, strides_q, strides_k, samples, ref_ranges, ref_groups,
                                  num_groups, key_bias, is_causal, scale, varlen, splits, buffers, weights)
    _row_lse_kernel[lambda meta: (triton.cdiv(group * m, meta["BLOCK_M"]), nb * hk, splits)](**s1[0], **s1[1])
    _key_mass_kernel[lambda meta: (triton.cdiv(lk, meta["BLOCK_N"]), nb)](**s2[0], **s2[1])
    if weights is None:
        return mass, None
    if quantile:
        key_group = buffers["key_group"]
        hi, lo = stats[..., 0].reshape(-1), -stats[..., 1].reshape(-1)
        span = hi - lo
        ok = span > DEGENERATE_SPAN
        kg = key_group.long().clamp(min=0)
        use = (key_group >= 0) & ok[kg]
        # The same float32 r̂ the kernel computes (x - lo) / span, so thresholds match it bit for bit.
        rhat = (mass - lo[kg]) / torch.where(ok, span, torch.ones_like(span))[kg]
        s3[0]["ThreshHi"], s3[0]["ThreshLo"] = _group_quantiles(rhat, key_group, use, nb * g,
                                                                (float(weights[1]), float(weights[2])))
    _weights_kernel[(triton.cdiv(lk, s3[1]["BLOCK"]), nb)](**s3[0], **s3[1])
    return mass, buffers["w"]


def _dense(q, k, samples, ref_ranges, ref_groups, num_groups, key_bias, is_causal, scale, weights):
    b, lk = q.shape[0], k.shape[2]
    mass, w = _run(q, k, None, None, q.shape[2], lk, q.stride(), k.stride(), samples, ref_ranges, ref_groups,
                   num_groups, key_bias, is_causal, scale, weights, varlen=False)
    return mass.view(b, lk), (None if w is None else w.view(b, lk))


def _packed(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, samples, ref_ranges, ref_groups,
            num_groups, causal, scale, weights):
    strides_q = (0, q.stride(1), q.stride(0), q.stride(2))
    strides_k = (0, k.stride(1), k.stride(0), k.stride(2))
    return _run(q, k, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), strides_q, strides_k,
                samples, ref_ranges, ref_groups, num_groups, None, causal, scale, weights, varlen=True)


# ------------------------------- dense ops ------------------------------------------------------

@torch.library.custom_op("dar::sampled_attention_mass", mutates_args=())
def sampled_attention_mass(q: torch.Tensor, k: torch.Tensor, samples: torch.Tensor, ref_ranges: torch.Tensor,
                           ref_groups: torch.Tensor, key_bias: Optional[torch.Tensor], is_causal: bool,
                           scale: float) -> torch.Tensor:
    """(B, Lk) float32 ``r_k = Σ_h Σ_{i in S} softmax_i(k)`` for keys k in R, 0 elsewhere (stages 1-2).

    Arguments as for `key_weights`. Forward only (no autograd formula is registered).
    """
    _check_inputs(q, k, samples, ref_ranges, ref_groups, key_bias, scale)
    return _dense(q, k, samples, ref_ranges, ref_groups, max(ref_ranges.shape[1], 1), key_bias, is_causal, scale,
                  None)[0]


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
    return _dense(q, k, samples, ref_ranges, ref_groups, num_groups, key_bias, is_causal, scale,
                  (gamma, tau_high, tau_low, thresholds))


@torch.library.custom_op("dar::key_weights", mutates_args=())
def key_weights(q: torch.Tensor, k: torch.Tensor, samples: torch.Tensor, ref_ranges: torch.Tensor,
                ref_groups: torch.Tensor, num_groups: int, key_bias: Optional[torch.Tensor], is_causal: bool,
                scale: float, gamma: float, tau_high: float, tau_low: float, thresholds: str) -> torch.Tensor:
    """DAR key weights ``w (B, Lk)`` float32 (docs/semantics.md steps 3-6) from the plan tensors.

    q (B, Hq, Lq, D), k (B, Hk, Lk, D): fp16/bf16/fp32, any strides, Hq % Hk == 0.
    samples (B, M) int32 sampled query indices (-1 = padding); ref_ranges (B, R, 2) int32 half-open
    key ranges ((0, 0) = padding); ref_groups (B, R) int32 group of each range (-1 = padding) with
    ``num_groups`` groups -- the `dar.plan.PlanTensors` fields. key_bias: None or (B, Lk) float32
    additive per-key bias, -inf = padded key (not in R). is_causal: SDPA's top-left causal mask. The
    rest are the `DARConfig` fields of the same names. Keys outside R, and rows with no samples or no
    ranges, get weight 1.
    """
    return key_statistics(q, k, samples, ref_ranges, ref_groups, num_groups, key_bias, is_causal, scale, gamma,
                          tau_high, tau_low, thresholds)[1]


@key_weights.register_fake
def _(q, k, samples, ref_ranges, ref_groups, num_groups, key_bias, is_causal, scale, gamma, tau_high, tau_low,
      thresholds):
    _check_inputs(q, k, samples, ref_ranges, ref_groups, key_bias, scale, thresholds)
    return q.new_empty((q.shape[0], k.shape[2]), dtype=torch.float32)


# ------------------------------- varlen ops -----------------------------------------------------

def key_statistics_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, samples,
                          ref_ranges, ref_groups, num_groups: int, causal: bool, scale: float, gamma: float,
                          tau_high: float, tau_low: float, thresholds: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, w)``, both (total_k,) float32, from one run (arguments as for `key_weights_varlen`).

    A plain function, not an op: for inspection (the recorder) and tests, which want the mass too.
    """
    _check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, samples, ref_ranges, ref_groups,
                  scale, thresholds)
    return _packed(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, samples, ref_ranges, ref_groups,
                   num_groups, causal, scale, (gamma, tau_high, tau_low, thresholds))


@torch.library.custom_op("dar::key_weights_varlen", mutates_args=())
def key_weights_varlen(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                       max_seqlen_q: int, max_seqlen_k: int, samples: torch.Tensor, ref_ranges: torch.Tensor,
                       ref_groups: torch.Tensor, num_groups: int, causal: bool, scale: float, gamma: float,
                       tau_high: float, tau_low: float, thresholds: str) -> torch.Tensor:
    """DAR key weights of packed (varlen) sequences: ``w (total_k,)`` float32, aligned with ``k``'s rows.

    Exactly `key_weights` applied to each sequence on its own (docs/semantics.md steps 3-6), in one
    launch per stage over all sequences: no padding to the longest sequence, no per-sequence loop, no
    host synchronisation (the ``cu_seqlens`` values are read on the device only).

    q (total_q, Hq, D), k (total_k, Hk, D): fp16/bf16/fp32, any strides, Hq % Hk == 0, as
    ``flash_attn_varlen_func`` takes them. cu_seqlens_q / cu_seqlens_k: int32 (N + 1,) cumulative
    sequence lengths; sequence n owns query rows ``[cu_seqlens_q[n], cu_seqlens_q[n + 1])`` and key rows
    ``[cu_seqlens_k[n], cu_seqlens_k[n + 1])``. max_seqlen_q / max_seqlen_k: upper bounds on the
    sequence lengths (they size the grids; a larger bound only launches idle programs).
    samples (N, M) int32: each sequence's sampled query indices, relative to its first query row
    (-1 = padding; an index past the sequence's length is ignored). ref_ranges (N, R, 2) int32:
    half-open reference key ranges relative to the sequence's first key row ((0, 0) = padding; keys past
    the sequence's length are outside R). ref_groups (N, R) int32: group of each range (-1 = padding),
    ``num_groups`` groups per sequence. These are the `dar.plan.PlanTensors` fields of a plan made with
    ``Lq = max_seqlen_q``, ``Lk = max_seqlen_k``. causal: flash-attn's bottom-right rule, query i of a
    sequence with Lq_n queries and Lk_n keys sees key j iff ``j <= i + Lk_n - Lq_n``; keys no query
    sees are outside R. The rest are the `DARConfig` fields of the same names. Keys outside R, and
    sequences with no samples or no ranges, get weight 1. There is no mask argument (flash-attn's
    varlen call has none). Forward only; the gradient with respect to q and k is zero.
    """
    return key_statistics_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, samples, ref_ranges,
                                 ref_groups, num_groups, causal, scale, gamma, tau_high, tau_low, thresholds)[1]


@key_weights_varlen.register_fake
def _(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, samples, ref_ranges, ref_groups, num_groups,
      causal, scale, gamma, tau_high, tau_low, thresholds):
    _check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, samples, ref_ranges, ref_groups,
                  scale, thresholds)
    return q.new_empty((k.shape[0],), dtype=torch.float32)


def _no_gradient(n):
    def backward(ctx, grad_w):
        # w is piecewise constant in q and k (thresholds of r̂): its gradient is zero almost everywhere.
        return (None,) * n
    return backward


key_weights.register_autograd(_no_gradient(13))
key_weights_varlen.register_autograd(_no_gradient(16))


__all__ = ["key_weights", "key_weights_varlen", "key_statistics", "key_statistics_varlen", "sampled_attention_mass",
           "interpreting", "THRESHOLDS", "SUPPORTED_DTYPES", "MAX_HEAD_DIM"]
