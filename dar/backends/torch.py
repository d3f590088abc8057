"""The torch backend: sampled-query scoring in plain torch, attention through SDPA.

Runs on any device and supports autograd. Never builds an ``Lq x Lk`` tensor: scoring touches
``m x Lk`` logits, and the rebalanced attention goes through `dar.delegate` with SDPA as the kernel
(``K' = w ⊙ K`` for key_scale, the key bias ``ln w`` for prob_scale), so SDPA's fused kernels run it.

``TorchBackend(sdp)`` restricts SDPA to one of its kernels (``torch.nn.attention.sdpa_kernel``):
``"torch:flash"``, ``"torch:cudnn"``, ``"torch:efficient"``, ``"torch:math"``; plain ``"torch"``
lets SDPA choose. The restricted ones are what ``backend="auto"`` measures on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import delegate, scoring
from ..call import DARCall
from .base import Backend

# SDPA kernel names (the suffix of "torch:<name>") -> torch.nn.attention.SDPBackend member.
SDP_KERNELS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
               "math": "MATH"}
_CUDA_ONLY = ("cudnn", "efficient")


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


class TorchBackend(Backend):
    def __init__(self, sdp: str | None = None):
        if sdp is not None and sdp not in SDP_KERNELS:
            raise ValueError(f"SDPA kernel must be one of {sorted(SDP_KERNELS)}, got {sdp!r}")
        self.sdp = sdp
        self.name = "torch" if sdp is None else f"torch:{sdp}"
        # Built up front: torch.compile then only reads a dict (no cache wrapper to trace).
        self._kernels = {dev: sdpa_kernel(dev, sdp) for dev in ("cpu", "cuda")}

    def kernel(self, call: DARCall) -> delegate.AttentionKernel:
        dev = call.q.device.type
        found = self._kernels.get(dev)
        return found if found is not None else sdpa_kernel(dev, self.sdp)

    def device_refusal(self, call) -> str | None:
        """Why the SDPA kernel cannot run on q's device (a dense or packed call), or None."""
        if self.sdp in _CUDA_ONLY and call.q.device.type != "cuda":
            return f"SDPA's {self.sdp} kernel runs on CUDA only, and q is on {call.q.device}"
        return None

    def unsupported(self, call: DARCall) -> str | None:
        dev = call.q.device.type
        why = self.device_refusal(call)
        if why is not None or call.v is None:
            return why
        if self.sdp == "flash" and dev == "cuda" and call.mask.mask is not None:
            return "SDPA's CUDA flash kernel takes no attn_mask"
        return delegate.unsupported(call, self.kernel(call))

    def key_weights(self, call: DARCall) -> torch.Tensor:
        return scoring.key_weights(call)

    def attention(self, call: DARCall, weights: torch.Tensor | None) -> torch.Tensor:
        return delegate.attention(call, weights, self.kernel(call))
