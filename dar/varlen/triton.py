"""The varlen triton path: the packed scoring kernel (``dar::key_weights_varlen``) and the packed
rebalanced-attention kernel (``dar::rebalanced_attention_varlen``).

Both take ``cu_seqlens`` directly (one launch per stage over every sequence, no padding to the
longest, no host synchronisation) with the plan's per-sequence tensors (sampled queries, reference
ranges and groups, rebalanced query ranges, all relative to each sequence's start).
"""

from __future__ import annotations

import torch

try:
    import triton  # noqa: F401  (the kernel below needs it; without it this path is unavailable)
except ImportError as exc:
    raise ImportError(f"the triton varlen path needs the `triton` package ({exc})") from exc

from ..kernels import attention as _attention
from ..kernels.scoring import key_weights_varlen as _key_weights_kernel
from .call import VarlenCall

# Sequences x query heads is the grid's second axis, which CUDA caps at 65535.
_MAX_GRID_Y = 65535


def unsupported(call: VarlenCall) -> str | None:
    """Why the triton varlen path cannot run ``call`` (a sentence naming the input), or None."""
    q, k, v = call.q, call.k, call.v
    dev = q.device.type
    if dev != "cuda" and not (_attention.INTERPRETED and dev == "cpu"):
        return f"q is on {q.device}; the triton kernels run on CUDA devices (or on the CPU under TRITON_INTERPRET=1)"
    if q.dtype not in _attention.SUPPORTED_DTYPES:
        return f"q has dtype {q.dtype}; the triton kernels take float16, bfloat16 or float32"
    dv = v.shape[-1] if v is not None else q.shape[-1]
    if max(q.shape[-1], dv) > _attention.MAX_HEAD_DIM:
        return (f"the head dim (D={q.shape[-1]}, Dv={dv}) exceeds {_attention.MAX_HEAD_DIM}, "
                "the largest the triton kernels support")
    if v is not None and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "q, k or v requires grad and the triton attention kernel is forward-only"
    if call.num_seqs * q.shape[1] > _MAX_GRID_Y:
        return f"N * Hq = {call.num_seqs * q.shape[1]} exceeds {_MAX_GRID_Y}, the kernel grid's limit"
    if dev == "cuda" and q.dtype == torch.bfloat16 and torch.cuda.get_device_capability(q.device) < (8, 0):
        return "bfloat16 needs a GPU of compute capability 8.0 or newer"
    return None


def key_weights(call: VarlenCall) -> torch.Tensor:
    pt = call.plan.tensors(call.q.device)
    cfg = call.cfg
    with torch.no_grad():  # w is piecewise constant in q and k: outside autograd, as in every backend
        return _key_weights_kernel(call.q, call.k, call.cu_seqlens_q, call.cu_seqlens_k, call.max_seqlen_q,
                                   call.max_seqlen_k, pt.samples, pt.ref_ranges, pt.ref_groups, call.plan.num_groups,
                                   call.causal, call.scale, cfg.gamma, cfg.tau_high, cfg.tau_low, cfg.thresholds)


def attention(call: VarlenCall, weights: torch.Tensor | None) -> torch.Tensor:
    gen_ranges = None
    if weights is None or not call.plan.active:
        weights = None  # plain attention: gamma = 0, or no sequence has both queries and references
    else:
        gen_ranges = call.plan.tensors(call.q.device).gen_ranges
        weights = weights.float()
    return torch.ops.dar.rebalanced_attention_varlen(
        call.q, call.k, call.v, call.cu_seqlens_q, call.cu_seqlens_k, call.max_seqlen_q, call.max_seqlen_k,
        weights, gen_ranges, call.causal, call.scale, call.cfg.mode)
