"""SDPA as a `dar.delegate` kernel: what the torch backend hands the delegate path to run attention with.

A module of its own so that a rebalanced call's route (backend -> delegate -> kernel) enters each module once:
the delegate calls this kernel back, and it lives apart from the backend that called the delegate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import delegate

# SDPA kernel names (the suffix of "torch:<name>") -> torch.nn.attention.SDPBackend member.
SDP_KERNELS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
               "math": "MATH"}


def _sdpa(sdp: str | None):
    """SDPA as a delegate kernel: GQA on, float masks cast to q's dtype (SDPA requires the match)."""
    if sdp is None:
        chosen = None
    else:
        from torch.nn.attention import SDPBackend

        chosen = [getattr(SDPBackend, SDP_KERNELS[sdp])]

    def sdpa(q, k, v, attn_mask=None, scale=None, is_causal=False):
        if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
            attn_mask = attn_mask.to(q.dtype)
        gqa = q.shape[1] != k.shape[1]
        if chosen is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                                  enable_gqa=gqa)
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(chosen):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                                  enable_gqa=gqa)

    return sdpa


def sdpa_kernel(device_type: str, sdp: str | None = None) -> delegate.AttentionKernel:
    """SDPA (optionally one of its kernels) as a `dar.delegate.AttentionKernel` on ``device_type``.

    ``same_head_dims``: SDPA's flash kernels (CPU and CUDA) need q, k and v to share a head dim, so
    a widened q/k gets a zero-padded v rather than dropping to the math kernel. On CUDA, head dims
    are padded to multiples of 8 (flash / cuDNN alignment) and FlashAttention takes no mask. On CPU,
    where SDPA runs float32 about as fast as bfloat16, low-precision rebalanced attention is computed
    in float32 (``upcast``), so ``K'`` is never rounded to bf16/fp16 there.
    """
    cuda = device_type == "cuda"
    name = "sdpa" if sdp is None else f"sdpa[{sdp}]"
    takes_bias = not (cuda and sdp == "flash")
    return delegate.AttentionKernel(_sdpa(sdp), name=name, takes_bias=takes_bias, upcast=not cuda,
                                    head_dim_multiple=8 if cuda else 1,
                                    max_head_dim=256 if cuda and sdp in ("flash", "cudnn") else None,
                                    same_head_dims=True)
