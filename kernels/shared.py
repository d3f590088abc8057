"""What the host code and the kernels share, importable without triton (torch only).

The kernels import these constants and the K' helper from here, and so do the host-side backends
(`dar.scoring`, `dar.delegate`): one definition each, and no import from kernels/ into host code
or back.
"""

from __future__ import annotations

import torch

# A group whose attention mass spans no more than this (hi - lo) is degenerate: its keys keep
# weight 1 (docs/semantics.md, step 5). The torch scoring and the Triton weights kernel compare
# against the same float.
DEGENERATE_SPAN = 1e-12

# The kernels work in base 2: exp(x) = exp2(x * log2 e).
LOG2E = 1.4426950408889634

# Largest head dim (D and Dv) the kernels take; dtypes they take.
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def scaled_keys(k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``K' = w ⊙ K`` (``w (B, Lk)`` float32) in k's dtype and memory layout.

    The product is formed in float32 (float64 for float64 k) and rounded once to k's dtype, in one
    pass: w itself is never rounded to bf16/fp16 (rounding w first would shift every logit of a key
    coherently). The tensor is transient, the size of k: O(B·Hk·Lk·D).
    """
    wk = w[:, None, :, None]
    if k.dtype in (torch.float32, torch.float64):
        return k * wk.to(k.dtype)
    if torch.is_grad_enabled() and (k.requires_grad or w.requires_grad):
        return (k * wk).to(k.dtype)  # out= does not record autograd; two passes here
    return torch.mul(k, wk, out=torch.empty_like(k))  # computed in float32, cast on the write


__all__ = ["DEGENERATE_SPAN", "LOG2E", "MAX_HEAD_DIM", "SUPPORTED_DTYPES", "scaled_keys"]
