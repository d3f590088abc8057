"""The triton backend: DAR in two fused Triton kernels (docs/kernels.md).

``key_weights`` runs the sampled-query scoring kernel (``dar::key_weights``), ``attention`` the
rebalanced flash-attention kernel (``dar::rebalanced_attention``). Both take the plan as small
int32 device tensors and the mask as a ``(B, Lk)`` key bias, so nothing here synchronises with
the device and nothing ``Lq x Lk`` is built. The attention kernel is forward-only: attention calls
that need gradients are refused (``"auto"`` then uses the torch backend).
"""

from __future__ import annotations

import torch

try:
    import triton  # noqa: F401  (the kernels below need it; without it this backend is unavailable)
except ImportError as exc:  # re-raised as a plain ImportError: dar.backends records it as "unavailable"
    raise ImportError(f"the triton backend needs the `triton` package ({exc})") from exc

from ..call import DARCall
from ..kernels import attention as _attention
from ..kernels.scoring import key_weights as _key_weights_kernel
from .base import Backend

# Batch rows (or sequences) x query heads is the grid's second axis, which CUDA caps at 65535.
_MAX_GRID_Y = 65535


def unsupported_tensors(q, k, v, grid_rows: int, rows_name: str, mask_why: str | None = None) -> str | None:
    """Why the triton kernels, dense or packed (`dar.varlen.triton`), cannot take ``q``, ``k``, ``v``
    (``v`` None for the weights alone): a sentence naming the input, or None.

    ``grid_rows``: batch rows (or sequences) of the call, named ``rows_name`` ("B", "N") in the message;
    times the query heads it is the grid's second axis. ``mask_why``: the caller's reason to refuse its
    mask, if any, reported after the device, dtype and head-dim checks.
    """
    dev = q.device.type
    if dev != "cuda" and not (_attention.INTERPRETED and dev == "cpu"):
        return (f"q is on {q.device}; the triton kernels run on CUDA devices "
                "(or on the CPU under TRITON_INTERPRET=1)")
    if q.dtype not in _attention.SUPPORTED_DTYPES:
        return f"q has dtype {q.dtype}; the triton kernels take float16, bfloat16 or float32"
    dv = v.shape[-1] if v is not None else q.shape[-1]
    if max(q.shape[-1], dv) > _attention.MAX_HEAD_DIM:
        return (f"the head dim (D={q.shape[-1]}, Dv={dv}) exceeds {_attention.MAX_HEAD_DIM}, "
                "the largest the triton kernels support")
    if mask_why is not None:
        return mask_why
    # Key weights alone have a (zero) gradient; the attention kernel has no backward.
    if v is not None and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "q, k or v requires grad and the triton attention kernel is forward-only"
    if grid_rows * q.shape[1] > _MAX_GRID_Y:  # q.shape[1] is Hq for (B, Hq, L, D) and (total, Hq, D) alike
        return f"{rows_name} * Hq = {grid_rows * q.shape[1]} exceeds {_MAX_GRID_Y}, the kernel grid's limit"
    if dev == "cuda" and q.dtype == torch.bfloat16 and torch.cuda.get_device_capability(q.device) < (8, 0):
        return "bfloat16 needs a GPU of compute capability 8.0 or newer"
    return None


def rebalancing(call, weights: torch.Tensor | None):
    """``(weights, gen_ranges)`` for the attention kernels (dense or packed call): float32 weights and the
    plan's rebalanced query ranges, or ``(None, None)`` for plain attention (gamma = 0, or no row or
    sequence has both generated queries and references)."""
    if weights is None or not call.plan.active:
        return None, None
    return weights.float(), call.plan.tensors(call.q.device).gen_ranges


class TritonBackend(Backend):
    name = "triton"
    masks = "key"  # the kernels take a (B, Lk) key bias and is_causal (checked in unsupported below)

    def unsupported(self, call: DARCall) -> str | None:
        mask_why = None
        if call.mask.mask is not None and not call.mask.is_key_only:
            mask_why = (f"attn_mask of shape {tuple(call.mask.mask.shape)} is not a key-only mask; the triton "
                        "kernels take key-padding masks / key biases of shape (B or 1, 1, 1, Lk) and is_causal")
        return unsupported_tensors(call.q, call.k, call.v, call.q.shape[0], "B", mask_why)

    def key_weights(self, call: DARCall) -> torch.Tensor:
        pt = call.plan.tensors(call.q.device)
        cfg = call.cfg
        # w is piecewise constant in q and k: like the other backends, return it outside autograd.
        with torch.no_grad():
            return _key_weights_kernel(call.q, call.k, pt.samples, pt.ref_ranges, pt.ref_groups,
                                       call.plan.num_groups, call.mask.key_bias(), call.mask.is_causal,
                                       call.scale, cfg.gamma, cfg.tau_high, cfg.tau_low, cfg.thresholds)

    def attention(self, call: DARCall, weights: torch.Tensor | None) -> torch.Tensor:
        weights, gen_ranges = rebalancing(call, weights)
        return torch.ops.dar.rebalanced_attention(
            call.q, call.k, call.v, weights, gen_ranges, call.mask.key_bias(), call.mask.is_causal,
            call.scale, call.cfg.mode,
        )
