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

from .. import delegate, scoring
from ..call import DARCall
from .base import Backend
from .sdpa import SDP_KERNELS, sdpa_kernel

_CUDA_ONLY = ("cudnn", "efficient")  # the SDPA kernels that only run on CUDA


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
