"""Rebalanced flash attention, forward: step 7 of docs/semantics.md as one Triton kernel.

For query row i of head h (key/value head ``h // (Hq / Hk)``) the kernel computes
``out_i = sum_j softmax_j(l_ij) v_j`` over the allowed keys, with the logits

    l_ij = scale * <q_i, k_j> * w_j + bias_j      key_scale,  row i rebalanced
    l_ij = scale * <q_i, k_j> + ln w_j + bias_j    prob_scale, row i rebalanced
    l_ij = scale * <q_i, k_j> + bias_j             every other row (and w = None)

``bias_j`` is the key bias (``-inf`` = padded key); ``is_causal`` adds SDPA's top-left rule
(``-inf`` for ``j > i``; packed sequences use flash-attn's bottom-right rule). A row with no
allowed key outputs 0, as SDPA does.

One program owns a ``BLOCK_M`` tile of query rows of one (batch, head) and streams the keys in
``BLOCK_N`` tiles with the online softmax (running max ``m``, running sum ``l``, fp32 accumulator),
in base 2. The host turns ``w`` into the per-key term the loop needs (``w * scale * log2 e`` for
key_scale; for prob_scale, whose ``e^(l + ln w) = e^l * w`` multiplies the probabilities, ``w``
itself on the TMA path and ``log2 w`` on the pointer path), one ``(BLOCK_N,)`` float32 load per key
tile. The program is specialised once, before its key loop, by what its rows are: all plain rows run
the plain loop (the same code as plain flash attention), all rebalanced rows the weighted loop (on
the TMA path, for key_scale the plain loop over ``K' = w * K``, for prob_scale the plain scores with
``V' = w * V`` and a w-weighted row sum; the host builds K' or V' once per call, rounded to the
input dtype), and only a program straddling the edge of a rebalanced range runs the loop that
selects per row. Key tiles that need masking (the partial last tile, the tiles on the causal
diagonal) are peeled off into the same three loops, masked, after the main ones, so the main loops
carry no mask. On sm90+ K, V and Q arrive through TMA tensor descriptors (``USE_TMA``) where the
installed Triton has host descriptors (3.4+, `features`); older GPUs, older Tritons and the
interpreter load through pointers, one loop with the per-row rule.

Output: ``(B, Hq, Lq, Dv)`` in q's dtype, laid out like q (see `empty_output`).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .autotune import AUTOTUNE_KEY, candidate_configs, prune_for, seq_bucket
from .features import INTERPRETED, TensorDescriptor, interpreter_descriptor_strides_in_elements, lazy_autotune
from .shared import LOG2E, MAX_HEAD_DIM, SUPPORTED_DTYPES, scaled_keys

_LOG2E = tl.constexpr(LOG2E)  # log2 e, readable from inside @triton.jit functions
MODES = ("key_scale", "prob_scale")

# The three loops a program can run (constexpr KIND of `_attend`).
_PLAIN = tl.constexpr(0)  # no row rebalanced (or w = None)
_WEIGHTED = tl.constexpr(1)  # every row rebalanced: one per-key vector for the whole tile
_PER_ROW = tl.constexpr(2)  # some rows rebalanced: select per row


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptrs, row_ok, col_ok, ROW_MASK: tl.constexpr, COL_MASK: tl.constexpr):
    """Load a 2-D tile, masking (with zeros) only the dims that can run past the tensor."""
    if ROW_MASK and COL_MASK:
        x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    elif ROW_MASK:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif COL_MASK:
        x = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _rebalanced_rows(GEN, stride_gb, stride_gg, G, off_b, rows):
    """(BLOCK_M,) bool: which ``rows`` lie in one of batch row ``off_b``'s half-open ranges.

    Padding ranges are (0, 0) and match nothing, so G can be the batch's maximum.
    """
    on = rows < 0
    gen = GEN + off_b.to(tl.int64) * stride_gb
    for g in range(0, G):
        start = tl.load(gen + g * stride_gg)
        end = tl.load(gen + g * stride_gg + 1)
        on = on | ((rows >= start) & (rows < end))
    return on


@triton.jit
def _attend(acc, l_i, m_i, k_src, v_src, lo, hi, KIND: tl.constexpr, MASK: tl.constexpr,
            q, kv_b, kv_h, kv_row, wk_row, bias_row, row_on, diag_rows, seq_k,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_biasn, qk_scale, USE_TMA: tl.constexpr, IS_CAUSAL: tl.constexpr,
            PROB_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, POS_SCALE: tl.constexpr,
            BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_DV: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold the key tiles ``[lo, hi)`` into the online softmax state ``(acc, l_i, m_i)``.

    KIND is the program's kind (_PLAIN, _WEIGHTED, _PER_ROW). MASK: the tiles may cross the sequence's
    end or the causal diagonal, so loads are predicated and logits masked to -inf; only the peeled tail
    runs with MASK. ``k_src`` / ``v_src``: on the TMA path the K and V descriptors, ``kv_row`` being the
    descriptor row of key 0; on the pointer path pointers at key ``lo`` of this head. ``wk_row`` holds
    the host's per-key term (key_scale: ``w * scale * log2 e``, prob_scale: ``w`` on the TMA path,
    ``log2 w`` on the pointer path, see LOG_W). The varying arguments come first (which K and V, which
    tiles, which loop); the kernel names the rest, which are the same at every call. The weighted loop
    (KIND _WEIGHTED, prob_scale) expects ``v_src`` to hold V' = w * V.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    # prob_scale's per-row loop: on the TMA path it multiplies p by the selected w after the
    # exponential (e^(l + ln w) = e^l w, ``wk_row`` holding w); on the pointer path it adds the
    # selected log2 w to the logits (``wk_row`` holding log2 w, -inf for w = 0), which needs fewer
    # registers there (the sm80 D64 table entry spilled with the product).
    LOG_W: tl.constexpr = PROB_SCALE and not USE_TMA
    # Where the logits before any bias are scale * qk (the plain kind, the weighted kind, whose
    # prob_scale w_j multiplies e^(l_ij) through V' = w * V and the row sum, and prob_scale's
    # per-row kind on the TMA path), tiles without bias take the row max on the raw scores and fold
    # the scale into the exponent's FMA, exp2(qk * c - m): one instruction per score fewer than
    # scaling first. Masked tiles do the same on qk with its masked entries set to -inf, which
    # needs c > 0 (-inf * c).
    SCORES_PLAIN: tl.constexpr = KIND != 2 or (PROB_SCALE and USE_TMA)
    FAST: tl.constexpr = (SCORES_PLAIN and not HAS_BIAS) and (POS_SCALE or not MASK)  # no chained `and`: 3.2
    # Logits can be -inf (masked / padded keys, log2 0): a row whose keys so far are all -inf has
    # m = -inf, and subtracting 0 instead keeps exp2(-inf - m) at 0 rather than NaN.
    GUARD: tl.constexpr = (MASK or HAS_BIAS) or LOG_W
    # On the TMA path the masked range is the peeled tail, which without causality is the one
    # partial last tile: its key mask is known before the loop (the pointer path masks every tile),
    # and is kept as an additive 0 / -inf vector rather than as predicates, which ptxas would park
    # in general registers and unpack in the loop. (Keys past seq_k are zeros past the tensor's end,
    # or the next packed sequence's keys: finite either way, so adding -inf masks them.)
    ONE_TILE: tl.constexpr = (USE_TMA and MASK) and not IS_CAUSAL
    if ONE_TILE:
        tail_bias = tl.where(offs_n < seq_k - lo, 0.0, float("-inf"))
    k_tile = k_src
    v_tile = v_src
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        key_ok = cols < seq_k
        if USE_TMA:
            k = k_src.load([kv_b, kv_h, kv_row + start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        else:
            k = _load_tile(k_tile + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                           key_ok, d_ok, MASK, HEAD_DIM != BLOCK_D)
        if DOT_F32:  # interpreter only: see the note on DOT_F32 in the kernel
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if KIND != 0:
            if MASK:
                wk = tl.load(wk_row + cols, mask=key_ok, other=0.0)
            else:
                wk = tl.load(wk_row + cols)

        if MASK:
            allowed = key_ok[None, :]
            if IS_CAUSAL:
                allowed = allowed & (cols[None, :] <= diag_rows[:, None])
        if FAST:
            if ONE_TILE:
                qk = qk + tail_bias[None, :]
            elif MASK:
                qk = tl.where(allowed, qk, float("-inf"))
            if POS_SCALE:
                m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            else:  # max of c * x over x is c * min x when c < 0
                m_new = tl.maximum(m_i, tl.min(qk, 1) * qk_scale)
            if GUARD:
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_ref = m_new
            p = tl.math.exp2(qk * qk_scale - m_ref[:, None])
            alpha = tl.math.exp2(m_i - m_ref)
        else:
            if SCORES_PLAIN:
                s = qk * qk_scale
            elif LOG_W:
                s = qk * qk_scale + tl.where(row_on[:, None], wk[None, :], 0.0)
            else:
                s = qk * tl.where(row_on[:, None], wk[None, :], qk_scale)
            if HAS_BIAS:
                if MASK:
                    bias = tl.load(bias_row + cols * stride_biasn, mask=key_ok, other=float("-inf"))
                else:
                    bias = tl.load(bias_row + cols * stride_biasn)
                s += (bias * _LOG2E)[None, :]
            if ONE_TILE:
                s = s + tail_bias[None, :]
            elif MASK:
                s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if GUARD:
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_ref = m_new
            p = tl.math.exp2(s - m_ref[:, None])
            alpha = tl.math.exp2(m_i - m_ref)
        if KIND == 2:
            if PROB_SCALE and USE_TMA:  # e^(l + ln w) = e^l * w: the row max stays on the unweighted logits
                p = p * tl.where(row_on[:, None], wk[None, :], 1.0)
        if KIND == 1:
            # key_scale's all-rebalanced programs run the plain loop over K' = w * K instead
            tl.static_assert(PROB_SCALE, "the weighted loop is prob_scale's only")
            l_i = l_i * alpha + tl.sum(p * wk[None, :], 1)
        else:
            l_i = l_i * alpha + tl.sum(p, 1)

        # acc = alpha * acc + P V, with P rounded to V's dtype as the tensor cores want.
        if USE_TMA:
            v = v_src.load([kv_b, kv_h, kv_row + start_n, 0]).reshape(BLOCK_N, BLOCK_DV)
        else:
            v = _load_tile(v_tile + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                           key_ok, dv_ok, MASK, HEAD_DIM_V != BLOCK_DV)
        p = p.to(v.dtype)
        if DOT_F32:
            v = v.to(tl.float32)
            p = p.to(tl.float32)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
        if not USE_TMA:
            k_tile += BLOCK_N * stride_kn
            v_tile += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit
def _attend_by_kind(acc, l_i, m_i, lo, hi, none_on, all_on, MASK: tl.constexpr, DESC_K, DESC_V, DESC_KW, DESC_VW,
                    q, kv_b, kv_h, kv_row, wk_row, bias_row, row_on, diag_rows, seq_k, stride_biasn, qk_scale,
                    HAS_W: tl.constexpr, IS_CAUSAL: tl.constexpr, PROB_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                    POS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                    HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """TMA path: the key tiles ``[lo, hi)`` through the loop of the program's kind (``none_on``: no
    row rebalanced, ``all_on``: every row), as three loops in a row of which two get empty ranges.

    key_scale, every row rebalanced: scale * <q, k_j> * w_j = scale * <q, w_j k_j>, so the plain
    loop over the host's K' = w * K (DESC_KW), the row max folding into exp2's FMA. prob_scale:
    e^(l_ij + ln w_j) = e^(l_ij) w_j, so the weighted loop scores as the plain one and takes w_j
    through the host's V' = w * V (DESC_VW) and the row sum: one FMA per score, as plain.
    """
    if HAS_W:
        end_plain = tl.where(none_on, hi, lo)
        end_weighted = tl.where(all_on, hi, lo)
        end_per_row = tl.where(none_on | all_on, lo, hi)
    else:
        end_plain = hi
    acc, l_i, m_i = _attend(acc, l_i, m_i, DESC_K, DESC_V, lo, end_plain, _PLAIN, MASK, q=q, kv_b=kv_b, kv_h=kv_h,
                            kv_row=kv_row, wk_row=wk_row, bias_row=bias_row, row_on=row_on, diag_rows=diag_rows,
                            seq_k=seq_k, stride_kn=0, stride_kd=0, stride_vn=0, stride_vd=0,
                            stride_biasn=stride_biasn, qk_scale=qk_scale, USE_TMA=True, IS_CAUSAL=IS_CAUSAL,
                            PROB_SCALE=PROB_SCALE, HAS_BIAS=HAS_BIAS, POS_SCALE=POS_SCALE, BLOCK_N=BLOCK_N,
                            HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
                            DOT_F32=DOT_F32, DOT_PRECISION=DOT_PRECISION)
    if HAS_W:
        if PROB_SCALE:
            weighted_k = DESC_K
            weighted_v = DESC_VW
        else:
            weighted_k = DESC_KW
            weighted_v = DESC_V
        for kind in tl.static_range(1, 3):  # _WEIGHTED (key_scale: _PLAIN over K'), then _PER_ROW
            if kind == 1:
                k_src = weighted_k
                v_src = weighted_v
                end = end_weighted
            else:
                k_src = DESC_K
                v_src = DESC_V
                end = end_per_row
            acc, l_i, m_i = _attend(acc, l_i, m_i, k_src, v_src, lo, end,
                                    (_WEIGHTED if PROB_SCALE else _PLAIN) if kind == 1 else _PER_ROW, MASK, q=q,
                                    kv_b=kv_b, kv_h=kv_h, kv_row=kv_row, wk_row=wk_row, bias_row=bias_row,
                                    row_on=row_on, diag_rows=diag_rows, seq_k=seq_k, stride_kn=0, stride_kd=0,
                                    stride_vn=0, stride_vd=0, stride_biasn=stride_biasn, qk_scale=qk_scale,
                                    USE_TMA=True, IS_CAUSAL=IS_CAUSAL, PROB_SCALE=PROB_SCALE, HAS_BIAS=HAS_BIAS,
                                    POS_SCALE=POS_SCALE, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V,
                                    BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, DOT_F32=DOT_F32, DOT_PRECISION=DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _rebalanced_attention_fwd(
    Q, K, V, WK, GEN, BIAS, Out, CU_Q, CU_K, DESC_Q, DESC_K, DESC_V, DESC_KW, DESC_VW,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_wb, stride_gb, stride_gg, stride_biasb, stride_biasn,
    Hq, KV_GROUP, Lq, Lk, G, qk_scale,
    LQ_BUCKET, LK_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_W: tl.constexpr, PROB_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    POS_SCALE: tl.constexpr, VARLEN: tl.constexpr, USE_TMA: tl.constexpr, DOT_F32: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr,
):
    # Which tile: axis 0 walks query tiles of one (batch, head), so neighbouring programs share
    # K/V in L2. Causal grids start with the last query tiles, which have the most keys to visit.
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    off_b = pid_bh // Hq  # batch row, or (VARLEN) sequence
    off_h = pid_bh % Hq
    off_hk = off_h // KV_GROUP  # GQA/MQA: index the shared K/V head, never repeat it
    m0 = pid_m * BLOCK_M
    b64 = off_b.to(tl.int64)
    if VARLEN:
        # Packed sequences: sequence b owns rows [cu_q[b], cu_q[b+1]) of q and [cu_k[b], cu_k[b+1])
        # of k/v; the grid covers max_seqlen_q, so programs past this sequence's end stop here. The
        # row offsets go to the base pointers (descriptor rows), and the rest of the kernel sees one
        # (seq_q, seq_k) problem. The descriptors view the packed tensors as (1, H, total, D).
        q_start = tl.load(CU_Q + off_b)
        k_start = tl.load(CU_K + off_b)
        seq_q = tl.load(CU_Q + off_b + 1) - q_start
        seq_k = tl.load(CU_K + off_b + 1) - k_start
        if m0 >= seq_q:
            return
        q_base = Q + q_start.to(tl.int64) * stride_qm
        k_base = K + k_start.to(tl.int64) * stride_kn
        v_base = V + k_start.to(tl.int64) * stride_vn
        o_base = Out + q_start.to(tl.int64) * stride_om
        wk_row = WK + k_start
        desc_b = 0
        q_row = q_start
        kv_row = k_start
        # flash-attn's bottom-right causal rule: row i sees keys j <= i + seq_k - seq_q.
        shift = seq_k - seq_q
    else:
        seq_q = Lq
        seq_k = Lk
        q_base = Q + b64 * stride_qb
        k_base = K + b64 * stride_kb
        v_base = V + b64 * stride_vb
        o_base = Out + b64 * stride_ob
        wk_row = WK + b64 * stride_wb
        desc_b = off_b
        q_row = 0
        kv_row = 0
        shift = 0  # SDPA's top-left causal rule: row i sees keys j <= i

    offs_m = tl.arange(0, BLOCK_M)
    rows = m0 + offs_m
    row_ok = rows < seq_q
    offs_d = tl.arange(0, BLOCK_D)  # head dims are padded to a power of two and masked
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V

    # Base pointers with 64-bit offsets: batch/head/row strides overflow int32 past 2^31 elements.
    k_head = k_base + off_hk.to(tl.int64) * stride_kh
    v_head = v_base + off_hk.to(tl.int64) * stride_vh
    if USE_TMA:
        # Rows past the tensor's end (and head-dim padding) arrive as zeros; rows of the next
        # packed sequence arrive as they are, and are masked like any key past seq_k.
        q = DESC_Q.load([desc_b, off_h, q_row + m0, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
        q_ptrs = (q_base + off_h.to(tl.int64) * stride_qh + m0.to(tl.int64) * stride_qm
                  + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd)
        q = _load_tile(q_ptrs, row_ok, d_ok, True, HEAD_DIM != BLOCK_D)
    # DOT_F32 (set only under TRITON_INTERPRET=1): the CPU interpreter multiplies bf16 dot operands
    # as raw bit patterns (triton #11584), and any bf16 arithmetic there is wrong too, so dot
    # operands are widened to fp32 right after loading. Exact: products of two fp16/bf16 numbers
    # are representable in fp32. DOT_PRECISION is "ieee" for fp32 inputs (true fp32 products, as
    # SDPA gives), else the default "tf32", which fp16/bf16 operands ignore.
    if DOT_F32:
        q = q.to(tl.float32)

    # Key range. Causal: key tiles past the tile's last row's diagonal are masked for every row,
    # so never visited. Tiles before `full` are allowed for every row of the program (inside the
    # sequence and at or below the first row's diagonal); the rest, at most a few, are masked.
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(seq_k, m0 + BLOCK_M + shift), 0)
    else:
        hi = seq_k
    if MASK_KEYS:
        full = (seq_k // BLOCK_N) * BLOCK_N
        if IS_CAUSAL:
            full = tl.minimum(full, (tl.maximum(m0 + shift + 1, 0) // BLOCK_N) * BLOCK_N)
    else:
        full = hi

    bias_row = BIAS + b64 * stride_biasb if HAS_BIAS else BIAS
    o_ptrs = (o_base + off_h.to(tl.int64) * stride_oh + m0.to(tl.int64) * stride_om
              + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    diag_rows = rows + shift
    if HAS_W:
        row_on = _rebalanced_rows(GEN, stride_gb, stride_gg, G, off_b, rows) & row_ok
    else:
        row_on = row_ok
    if USE_TMA:
        # Which rows DAR rebalances decides the loop, once per program. The three kinds run one
        # after the other, and the program's kind gives all its key tiles to one of them (the
        # other two get empty ranges): sequential loops, because ptxas serialised every wgmma
        # (C7515) when each kind had its loop in its own branch. The range ends go through a warp
        # vote so that ptxas knows them to be warp-uniform and keeps the loops' addressing in
        # uniform registers. The tiles needing a mask (the partial last tile, the causal diagonal's)
        # are peeled off into the same three loops, masked, after the main ones: a program whose
        # rows are all plain or all rebalanced runs its tail without the per-row select too.
        if HAS_W:
            n_on = tl.sum(row_on.to(tl.int32), 0)
            none_on = _warp_uniform(n_on == 0, DOT_F32)
            all_on = _warp_uniform(n_on == tl.minimum(seq_q - m0, BLOCK_M), DOT_F32)
        else:
            none_on = True
            all_on = False
        acc, l_i, m_i = _attend_by_kind(acc, l_i, m_i, 0, full, none_on, all_on, False, DESC_K, DESC_V, DESC_KW,
                                        DESC_VW, q=q, kv_b=desc_b, kv_h=off_hk, kv_row=kv_row, wk_row=wk_row,
                                        bias_row=bias_row, row_on=row_on, diag_rows=diag_rows, seq_k=seq_k,
                                        stride_biasn=stride_biasn, qk_scale=qk_scale, HAS_W=HAS_W,
                                        IS_CAUSAL=IS_CAUSAL, PROB_SCALE=PROB_SCALE, HAS_BIAS=HAS_BIAS,
                                        POS_SCALE=POS_SCALE, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM,
                                        HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, DOT_F32=DOT_F32,
                                        DOT_PRECISION=DOT_PRECISION)
        if MASK_KEYS:
            acc, l_i, m_i = _attend_by_kind(acc, l_i, m_i, full, hi, none_on, all_on, True, DESC_K, DESC_V,
                                            DESC_KW, DESC_VW, q=q, kv_b=desc_b, kv_h=off_hk, kv_row=kv_row,
                                            wk_row=wk_row, bias_row=bias_row, row_on=row_on, diag_rows=diag_rows,
                                            seq_k=seq_k, stride_biasn=stride_biasn, qk_scale=qk_scale, HAS_W=HAS_W,
                                            IS_CAUSAL=IS_CAUSAL, PROB_SCALE=PROB_SCALE, HAS_BIAS=HAS_BIAS,
                                            POS_SCALE=POS_SCALE, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM,
                                            HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
                                            DOT_F32=DOT_F32, DOT_PRECISION=DOT_PRECISION)
    else:
        # Pointer path (pre-Hopper GPUs, Tritons without host descriptors, the interpreter): one loop
        # over every key tile, masked throughout when any tile needs it, with the per-row rule when
        # there are weights. On sm80 the specialised loops and the peeled tail ran out of registers.
        acc, l_i, m_i = _attend(acc, l_i, m_i, k_head, v_head, 0, hi, _PER_ROW if HAS_W else _PLAIN, MASK_KEYS,
                                q=q, kv_b=desc_b, kv_h=off_hk, kv_row=kv_row, wk_row=wk_row, bias_row=bias_row,
                                row_on=row_on, diag_rows=diag_rows, seq_k=seq_k, stride_kn=stride_kn,
                                stride_kd=stride_kd, stride_vn=stride_vn, stride_vd=stride_vd,
                                stride_biasn=stride_biasn, qk_scale=qk_scale, USE_TMA=USE_TMA, IS_CAUSAL=IS_CAUSAL,
                                PROB_SCALE=PROB_SCALE, HAS_BIAS=HAS_BIAS, POS_SCALE=POS_SCALE, BLOCK_N=BLOCK_N,
                                HEAD_DIM=HEAD_DIM, HEAD_DIM_V=HEAD_DIM_V, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
                                DOT_F32=DOT_F32, DOT_PRECISION=DOT_PRECISION)

    # Epilogue: normalise; rows that saw no allowed key have l = 0 and acc = 0 and output 0.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])


@triton.jit
def _warp_uniform(flag, INTERPRETED: tl.constexpr):
    """``flag`` (a scalar equal in every thread) through ``vote.sync.any``, whose result ptxas knows
    to be warp-uniform; the interpreter has no inline PTX and needs no such hint."""
    if INTERPRETED:
        return flag
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .pred p, v; setp.ne.s32 p, $1, 0; vote.sync.any.pred v, p, 0xffffffff; selp.s32 $0, 1, 0, v; }",
            "=r,r", [flag.to(tl.int32)], dtype=tl.int32, is_pure=True, pack=1) != 0


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

# Tests set this to run the TMA path under the interpreter (which implements descriptors), so the
# descriptor coordinates are checked on the CPU too. Never set in production code.
_TMA_IN_INTERPRETER = False


def _tma_capable(*tensors: torch.Tensor) -> bool:
    """Whether 4-D TMA descriptors can address these tensors: unit last stride, 16-byte aligned
    base and strides (what cuTensorMapEncodeTiled requires). Without host descriptors (Triton < 3.4)
    never; under an interpreter that checks strides in elements (3.3-3.5), only strides it accepts."""
    if TensorDescriptor is None:
        return False
    # bytes per stride unit the descriptor check counts in
    unit = (lambda t: 1) if interpreter_descriptor_strides_in_elements() else (lambda t: t.element_size())
    for t in tensors:
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((st * unit(t)) % 16 for st in t.stride()[:-1]):
            return False
    return True


def _use_tma(capability: tuple[int, int] | None, *tensors: torch.Tensor) -> bool:
    if capability is None:
        return _TMA_IN_INTERPRETER and _tma_capable(*tensors)
    return capability[0] >= 9 and _tma_capable(*tensors)


def _descriptor(t: torch.Tensor, block_d: int):
    """A (B, H, L, D) descriptor; its block is (1, 1, rows, block_d), the rows being set once the
    autotuner has chosen BLOCK_M / BLOCK_N (`autotune.set_descriptor_blocks`)."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, block_d])


@functools.lru_cache(maxsize=None)
def _tuned_kernel(capability: tuple[int, int] | None):
    """The kernel wrapped in an autotuner whose candidates suit this GPU (None: interpreter)."""
    # MASK_KEYS depends on the tuned BLOCK_N, so it is a heuristic applied after the config is chosen.
    masked = triton.heuristics({"MASK_KEYS": mask_keys})
    return lazy_autotune(masked(_rebalanced_attention_fwd), candidate_configs(capability), AUTOTUNE_KEY,
                         prune_for(capability))


def empty_output(q: torch.Tensor, dv: int) -> torch.Tensor:
    """A ``(B, Hq, Lq, Dv)`` tensor laid out like q: a transposed ``(B, Lq, Hq, Dv)`` buffer when q
    is a transposed ``(B, L, H, D)`` tensor (so a model's ``out.transpose(1, 2).reshape(B, L, H * Dv)``
    costs no copy), else contiguous ``(B, Hq, Lq, Dv)``."""
    b, h, lq, _ = q.shape
    if h > 1 and lq > 1 and q.stride(1) < q.stride(2):
        return q.new_empty(b, lq, h, dv).transpose(1, 2)
    return q.new_empty(b, h, lq, dv)


def _check(q, k, v, w, gen_ranges, key_bias, mode) -> None:
    """Shape/dtype checks on metadata only (no host synchronisation)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, L, D), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    b, hq, _, d = q.shape
    _, hk, lk, _ = k.shape
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[0] != b or k.shape[3] != d or tuple(v.shape[:3]) != (b, hk, lk):
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if hq % hk:
        raise ValueError(f"Hq={hq} must be a multiple of Hk={hk}")
    if max(d, v.shape[3]) > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM} are supported, got D={d}, Dv={v.shape[3]}")
    if (w is None) != (gen_ranges is None):
        raise ValueError("w and gen_ranges must be given together (or both None for plain attention)")
    if w is not None:
        if w.dtype != torch.float32 or tuple(w.shape) != (b, lk):
            raise ValueError(f"w must be float32 of shape (B, Lk) = {(b, lk)}, got {w.dtype} {tuple(w.shape)}")
        if gen_ranges.dtype != torch.int32 or gen_ranges.dim() != 3 or gen_ranges.shape[0] != b or gen_ranges.shape[2] != 2:
            raise ValueError(f"gen_ranges must be int32 of shape (B, G, 2), got {gen_ranges.dtype} {tuple(gen_ranges.shape)}")
    if key_bias is not None and (key_bias.dtype != torch.float32 or tuple(key_bias.shape) != (b, lk)):
        raise ValueError(f"key_bias must be float32 of shape (B, Lk) = {(b, lk)}, got {key_bias.dtype} {tuple(key_bias.shape)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, t in (("k", k), ("v", v), ("w", w), ("gen_ranges", gen_ranges), ("key_bias", key_bias)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


def mask_keys(meta: dict) -> bool:
    """The MASK_KEYS heuristic: key tiles need masking when causal, for packed sequences (whose
    lengths the host does not know), or when Lk is not a multiple of BLOCK_N (known only once the
    autotuner has picked BLOCK_N)."""
    return bool(meta["IS_CAUSAL"]) or bool(meta["VARLEN"]) or meta["Lk"] % meta["BLOCK_N"] != 0


def kernel_arguments(q, k, v, w, gen_ranges, key_bias, is_causal: bool, scale: float, mode: str,
                     out: torch.Tensor, varlen: tuple | None = None,
                     capability: tuple[int, int] | None = None) -> tuple[dict, dict]:
    """The kernel's runtime arguments and constexprs (all but the tuned BLOCK_M, BLOCK_N,
    and MASK_KEYS) for one call; shared by the ops and the static report, which
    passes ``meta`` tensors.

    Dense: the op's 4-D tensors. Packed: ``varlen = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
    max_seqlen_k)`` and (1, H, total, D) views of the packed tensors. ``w`` is turned here into the
    per-key term the kernel's loop uses: ``w * scale * log2 e`` (key_scale), or for prob_scale ``w`` (TMA
    path) or ``log2 w`` (pointer path), one small elementwise op on the device; on the TMA path
    key_scale also gets ``K' = w * K`` (DESC_KW) and prob_scale ``V' = w * V`` (DESC_VW). ``capability``
    (None: interpreter) decides between TMA descriptors and pointers.
    """
    b, hq, lq, d = q.shape
    _, hk, lk, dv = v.shape
    has_w, has_bias = w is not None, key_bias is not None
    dummy = out  # stands in for absent optional tensors; their loads are compiled out
    use_tma = _use_tma(capability, q, k, v)
    cu_q, cu_k, lq, lk = varlen if varlen is not None else (dummy, dummy, lq, lk)
    block_d, block_dv = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))
    # key_scale on the TMA path: K' = w * K for the programs whose rows are all rebalanced (they run
    # the plain loop over it). One extra read and write of k per call, a transient tensor the size
    # of k, laid out like k, the product rounded once to k's dtype (`shared.scaled_keys`).
    kw = scaled_keys(k, w) if use_tma and has_w and mode == "key_scale" else None
    # prob_scale on the TMA path: V' = w * V likewise, for the weighted loop of the programs whose
    # rows are all rebalanced (their p_ij w_j v_j is p_ij v'_j).
    vw = scaled_keys(v, w) if use_tma and has_w and mode == "prob_scale" else None
    if (kw is not None and not _tma_capable(kw)) or (vw is not None and not _tma_capable(vw)):
        use_tma, kw, vw = False, None, None  # k / v strided in a way their dense copy cannot be
    if has_w:
        # prob_scale: the TMA path multiplies p by w (e^(l + ln w) = e^l w), so w goes in as it is;
        # the pointer path adds log2 w (-inf for w = 0) to the logits (see LOG_W in `_attend`).
        if mode == "key_scale":
            wk = (w * (scale * LOG2E)).contiguous()
        else:
            wk = (w if use_tma else torch.log2(w)).contiguous()
    WK, GEN, BIAS = (wk if has_w else dummy), (gen_ranges if has_w else dummy), (key_bias if has_bias else dummy)
    descs = dict(DESC_Q=None, DESC_K=None, DESC_V=None, DESC_KW=None, DESC_VW=None)
    if use_tma:
        descs.update(DESC_Q=_descriptor(q, block_d), DESC_K=_descriptor(k, block_d), DESC_V=_descriptor(v, block_dv),
                     DESC_KW=None if kw is None else _descriptor(kw, block_d),
                     DESC_VW=None if vw is None else _descriptor(vw, block_dv))
    names = ("stride_qb", "stride_qh", "stride_qm", "stride_qd", "stride_kb", "stride_kh", "stride_kn", "stride_kd",
             "stride_vb", "stride_vh", "stride_vn", "stride_vd", "stride_ob", "stride_oh", "stride_om", "stride_od")
    args = dict(Q=q, K=k, V=v, WK=WK, GEN=GEN, BIAS=BIAS, Out=out, CU_Q=cu_q, CU_K=cu_k, **descs,
                **dict(zip(names, (*q.stride(), *k.stride(), *v.stride(), *out.stride()))),
                stride_wb=WK.stride(0) if has_w else 0, stride_gb=GEN.stride(0) if has_w else 0,
                stride_gg=GEN.stride(1) if has_w else 0, stride_biasb=BIAS.stride(0) if has_bias else 0,
                stride_biasn=BIAS.stride(1) if has_bias else 0,
                Hq=hq, KV_GROUP=hq // hk, Lq=lq, Lk=lk, G=gen_ranges.shape[1] if has_w else 0, qk_scale=scale * LOG2E,
                LQ_BUCKET=seq_bucket(lq), LK_BUCKET=seq_bucket(lk))
    const = dict(HEAD_DIM=d, HEAD_DIM_V=dv, BLOCK_D=block_d, BLOCK_DV=block_dv,
                 IS_CAUSAL=is_causal, HAS_W=has_w, PROB_SCALE=mode == "prob_scale", HAS_BIAS=has_bias,
                 POS_SCALE=scale > 0, VARLEN=varlen is not None, USE_TMA=use_tma, DOT_F32=INTERPRETED,
                 DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    return args, const


def _capability(device: torch.device) -> tuple[int, int] | None:
    return None if INTERPRETED else torch.cuda.get_device_capability(device)


def _launch(args: dict, const: dict, device: torch.device, num_q_tiles_of, programs_y: int) -> None:
    kernel = _tuned_kernel(_capability(device))
    grid = lambda meta: (num_q_tiles_of(meta["BLOCK_M"]), programs_y)  # noqa: E731
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](**args, **const)


@torch.library.custom_op("dar::rebalanced_attention", mutates_args=())
def rebalanced_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: Optional[torch.Tensor],
                         gen_ranges: Optional[torch.Tensor], key_bias: Optional[torch.Tensor],
                         is_causal: bool, scale: float, mode: str) -> torch.Tensor:
    """Flash attention with DAR's key weights; see the module docstring for the exact logits.

    q (B, Hq, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv): any strides, fp16/bf16/fp32.
    w (B, Lk) float32 and gen_ranges (B, G, 2) int32 (half-open rebalanced query ranges, (0, 0)
    padding), both None for plain attention; w >= 0 (prob_scale: a key with w = 0 gets probability
    0, and a row whose every allowed key has w = 0 outputs 0, like a row with no allowed key; DAR's
    weights are never 0). key_bias (B, Lk) float32 additive, -inf = padded key.
    Returns (B, Hq, Lq, Dv) in q's dtype, laid out like q (`empty_output`).
    """
    _check(q, k, v, w, gen_ranges, key_bias, mode)
    b, hq, lq, d = q.shape
    out = empty_output(q, v.shape[3])
    if out.numel() == 0:
        return out
    if w is not None:
        gen_ranges = gen_ranges.contiguous()
    args, const = kernel_arguments(q, k, v, w, gen_ranges, key_bias, is_causal, scale, mode, out,
                                   capability=_capability(q.device))
    _launch(args, const, q.device, lambda block_m: triton.cdiv(lq, block_m), b * hq)
    return out


@rebalanced_attention.register_fake
def _(q, k, v, w, gen_ranges, key_bias, is_causal, scale, mode):
    _check(q, k, v, w, gen_ranges, key_bias, mode)
    return empty_output(q, v.shape[-1])


# --------------------------------------------------------------------------------------------
# Packed sequences (flash-attn's varlen convention)
# --------------------------------------------------------------------------------------------


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, w, gen_ranges, mode) -> None:
    """Metadata checks of the packed op (shapes, dtypes, devices; nothing that reads device memory)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total, H, D), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    _, hq, d = q.shape
    total_k, hk, _ = k.shape
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[2] != d or tuple(v.shape[:2]) != (total_k, hk):
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if hk == 0 or hq % hk:
        raise ValueError(f"Hq={hq} must be a multiple of Hk={hk}")
    if max(d, v.shape[2]) > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM} are supported, got D={d}, Dv={v.shape[2]}")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if t.dtype != torch.int32 or t.dim() != 1 or t.shape[0] < 1:
            raise ValueError(f"{name} must be int32 of shape (N + 1,), got {t.dtype} {tuple(t.shape)}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k {tuple(cu_seqlens_k.shape)} "
                         "must describe the same number of sequences")
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be an int >= 0, got {n!r}")
    if (w is None) != (gen_ranges is None):
        raise ValueError("w and gen_ranges must be given together (or both None for plain attention)")
    n_seq = cu_seqlens_q.shape[0] - 1
    if w is not None:
        if w.dtype != torch.float32 or tuple(w.shape) != (total_k,):
            raise ValueError(f"w must be float32 of shape (total_k,) = {(total_k,)}, got {w.dtype} {tuple(w.shape)}")
        if (gen_ranges.dtype != torch.int32 or gen_ranges.dim() != 3 or gen_ranges.shape[0] != n_seq
                or gen_ranges.shape[2] != 2):
            raise ValueError(f"gen_ranges must be int32 of shape (N, G, 2) = ({n_seq}, G, 2), got "
                             f"{gen_ranges.dtype} {tuple(gen_ranges.shape)}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for name, t in (("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k), ("w", w),
                    ("gen_ranges", gen_ranges)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


@torch.library.custom_op("dar::rebalanced_attention_varlen", mutates_args=())
def rebalanced_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                w: Optional[torch.Tensor], gen_ranges: Optional[torch.Tensor], is_causal: bool,
                                scale: float, mode: str) -> torch.Tensor:
    """Rebalanced attention over packed sequences, flash-attn's varlen convention
    (``torch.ops.dar.rebalanced_attention_varlen``).

    Sequence ``s`` (of ``N``) owns rows ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` of ``q`` and rows
    ``cu_seqlens_k[s]:cu_seqlens_k[s+1]`` of ``k`` / ``v``; its queries attend only its own keys.

    Args:
        q: ``(total_q, Hq, D)``; k: ``(total_k, Hk, D)``; v: ``(total_k, Hk, Dv)``: float16, bfloat16
            or float32, any strides, ``Hq % Hk == 0`` (query head ``h`` reads key head ``h // (Hq/Hk)``),
            head dims up to 256.
        cu_seqlens_q, cu_seqlens_k: int32 ``(N + 1,)`` on q's device: 0, then the running totals of
            the sequence lengths (non-decreasing, last entry ``total_q`` / ``total_k``).
        max_seqlen_q, max_seqlen_k: Python ints >= every sequence's query / key length. The grid
            covers ``max_seqlen_q`` query rows per sequence; rows of a sequence longer than that are
            not computed (the output there is undefined), as in flash-attn.
        w: float32 ``(total_k,)``, the key weights aligned with ``k``, or None for plain attention.
        gen_ranges: int32 ``(N, G, 2)``, per sequence the half-open query ranges DAR rebalances, in
            that sequence's own row coordinates (0 = its first query); ``(0, 0)`` pads; None iff
            ``w`` is None.
        is_causal: flash-attn's bottom-right rule: row ``i`` of a sequence with ``Lq`` queries and
            ``Lk`` keys attends key ``j`` iff ``j <= i + Lk - Lq`` (the top-left rule of the dense
            op when ``Lq == Lk``). A row with no allowed key outputs 0.
        scale: softmax scale; mode: ``"key_scale"`` or ``"prob_scale"`` (logits as in the module
            docstring, per sequence).

    Returns ``(total_q, Hq, Dv)`` in q's dtype, contiguous. Sequence ``s``'s rows equal the dense op
    on that sequence alone. One launch for every sequence: no padding to the longest, no host
    synchronisation (the cu_seqlens contents are read on the device and not validated).
    """
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, w, gen_ranges, mode)
    total_q, hq, _ = q.shape
    out = q.new_empty(total_q, hq, v.shape[2])
    n_seq = cu_seqlens_q.shape[0] - 1
    if out.numel() == 0 or n_seq == 0 or max_seqlen_q == 0:
        return out
    if w is not None:
        gen_ranges = gen_ranges.contiguous()
    as4 = lambda t: t.unsqueeze(0).transpose(1, 2)  # noqa: E731  (total, H, D) -> (1, H, total, D) view
    args, const = kernel_arguments(as4(q), as4(k), as4(v), None if w is None else w.unsqueeze(0), gen_ranges, None,
                                   is_causal, scale, mode, as4(out),
                                   varlen=(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
                                   capability=_capability(q.device))
    _launch(args, const, q.device, lambda block_m: triton.cdiv(max_seqlen_q, block_m), n_seq * hq)
    return out


@rebalanced_attention_varlen.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, w, gen_ranges, is_causal, scale, mode):
    _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, w, gen_ranges, mode)
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2])


__all__ = ["INTERPRETED", "MAX_HEAD_DIM", "MODES", "SUPPORTED_DTYPES", "empty_output", "kernel_arguments", "mask_keys",
           "rebalanced_attention", "rebalanced_attention_varlen"]
