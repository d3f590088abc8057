"""A standard Triton flash-attention forward through TMA tensor descriptors: the yardstick of the
static report (``benchmarks/static_report.py``) and of its targets.

Plain softmax attention, no DAR, no masking: q, k, v, o ``(B, H, L, D)`` contiguous, viewed as
``(B * H * L, D)`` row tables that host-side ``TensorDescriptor``s address; ``L`` must be a multiple
of ``BLOCK_M`` and ``BLOCK_N``. One program owns ``BLOCK_M`` query rows of one (batch, head) and
streams the keys in ``BLOCK_N`` tiles with the base-2 online softmax. It is what the rebalanced
kernel's plain loop has to match, written the common way and nothing more.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl


@triton.jit
def flash_forward(desc_q, desc_k, desc_v, desc_o, qk_scale, seq_len,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    row0 = tl.program_id(1) * seq_len  # first row of this (batch, head) in the (B*H*L, D) view
    q = desc_q.load([row0 + pid_m * BLOCK_M, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in tl.range(0, seq_len, BLOCK_N):
        k = desc_k.load([row0 + start, 0])
        qk = tl.dot(q, k.T)
        # The row max is taken on raw scores and scaled once per row; the scale then folds into the
        # exponent's FMA: exp2(qk * c - m).
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = desc_v.load([row0 + start, 0])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    desc_o.store([row0 + pid_m * BLOCK_M, 0], (acc / l_i[:, None]).to(desc_o.dtype))


def attention(q, k, v, scale: float | None = None, block_m: int = 128, block_n: int = 64, num_warps: int = 8,
              num_stages: int = 3):
    """Run the yardstick on a GPU: q, k, v ``(B, H, L, D)`` contiguous fp16/bf16 -> ``(B, H, L, D)``."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    b, h, n, d = q.shape
    if n % block_m or n % block_n:
        raise ValueError(f"L={n} must be a multiple of BLOCK_M={block_m} and BLOCK_N={block_n}")
    out = q.new_empty(q.shape)
    qs, ks, vs, os_ = (t.reshape(b * h * n, d) for t in (q.contiguous(), k.contiguous(), v.contiguous(), out))
    desc = lambda t, rows: TensorDescriptor.from_tensor(t, [rows, d])  # noqa: E731
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    flash_forward[(n // block_m, b * h)](desc(qs, block_m), desc(ks, block_n), desc(vs, block_n), desc(os_, block_m),
                                         scale * 1.4426950408889634, n, HEAD_DIM=d, BLOCK_M=block_m,
                                         BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    return out
