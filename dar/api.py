"""The functional API: `dar_attention` and `compute_key_weights`."""

from __future__ import annotations

import torch

from . import delegate, parallel
from .autocast import outside_autocast
from .backends import select_backend, warn_once
from .call import check_return_weights, make_call, unit_weights, with_weights
from .config import DARConfig
from .layout import TokenLayout


@outside_autocast
def compute_key_weights(q: torch.Tensor, k: torch.Tensor, layout: TokenLayout | list[TokenLayout],
                        cfg: DARConfig | None = None, attn_mask: torch.Tensor | None = None,
                        scale: float | None = None, *, is_causal: bool = False,
                        backend: str = "auto", head_group=None, seq_group=None) -> torch.Tensor:
    """DAR key weights ``w`` of shape ``(B, Lk)``, float32 (docs/semantics.md, steps 1-6).

    Arguments are those of `dar_attention` without ``v``. Keys outside every reference range, and
    every key of a row with no generated-image queries or no reference keys, get weight 1. With
    ``seq_group``, the weights of this rank's keys ``(B, Lk_local)``.
    """
    if head_group is not None or seq_group is not None:
        return parallel.key_weights(q, k, layout, cfg, attn_mask, scale, is_causal, backend, head_group,
                                     seq_group)
    call = make_call(q, k, None, layout, cfg, attn_mask, scale, is_causal)
    if not call.plan.active:
        return unit_weights(q.shape[0], k.shape[2], device=q.device)
    return select_backend(backend, call).key_weights(call)


@outside_autocast
def dar_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  layout: TokenLayout | list[TokenLayout], cfg: DARConfig | None = None,
                  attn_mask: torch.Tensor | None = None, scale: float | None = None, *,
                  is_causal: bool = False, backend: str = "auto", return_weights: bool = False,
                  head_group=None, seq_group=None, attention_fn=None):
    """Attention with Dynamic Attention Rebalancing, a drop-in for SDPA.

    Args:
        q: ``(B, Hq, Lq, D)`` queries; k: ``(B, Hk, Lk, D)``; v: ``(B, Hk, Lk, Dv)``, with
            ``Hq % Hk == 0`` (grouped-query attention). Any strides (a ``(B, L, H, D)`` tensor
            transposed to ``(B, H, L, D)`` is used without a copy by the triton backend).
        layout: one `TokenLayout` for the whole batch, or a list of B of them.
        cfg: a `DARConfig` (default ``DARConfig()``).
        attn_mask: boolean (True = attend) or additive float mask broadcastable to
            ``(B, Hq, Lq, Lk)``, as in SDPA.
        scale: softmax scale, default ``1 / sqrt(D)``.
        is_causal: SDPA's top-left causal mask; cannot be combined with ``attn_mask``.
        backend: ``"reference"``, ``"torch"``, ``"triton"``, ``"flex"``, ``"torch:<SDPA kernel>"``
            (``flash``, ``cudnn``, ``efficient``, ``math``) or ``"auto"``: the ``DAR_BACKEND``
            environment variable if set, else the fastest candidate, measured once per kind of call
            (`dar.backends.tuner`; never the reference).
        return_weights: also return the key weights.
        head_group: a ``torch.distributed`` process group over which the heads are split: this rank
            holds a contiguous slice of the query heads with their KV heads, and every token (the
            layout after Ulysses' all-to-all, or under tensor parallelism). docs/parallel.md.
        seq_group: a process group over which the tokens are split: this rank holds the contiguous
            ``r``-th equal shard of q, k and v, ``layout`` is in global positions and ``attn_mask``
            is a key-padding mask of this rank's keys ``(B or 1, 1, 1, Lk_local)``. Combines with
            ``head_group`` (Ulysses x ring). The result is the single-process one, up to rounding.
        attention_fn: run the attention on this kernel instead of the backend's own: a callable
            ``fn(q, k, v, attn_mask=None, scale=None, is_causal=False)`` with SDPA's layout and
            meaning (GQA included), or a `dar.AttentionKernel` saying what the kernel cannot take
            (no additive mask, head-dim alignment, ...). The backend then only computes the key
            weights (``"auto"``: triton on CUDA when it supports the inputs, else torch). A call the
            kernel cannot express runs on the backend instead, with a one-time warning saying why.

    Returns:
        ``(B, Hq, Lq, Dv)`` in q's dtype, or ``(out, w)`` with ``w`` of shape ``(B, Lk)`` float32
        (this rank's rows and keys under ``seq_group``).
    """
    if v is None:
        raise TypeError("v must be a torch.Tensor (use dar.compute_key_weights for weights alone)")
    check_return_weights(return_weights)
    if head_group is not None or seq_group is not None:
        if attention_fn is not None:
            raise ValueError("attention_fn cannot be combined with head_group / seq_group (the split calls run on "
                             "the backend's own attention)")
        return parallel.attention(q, k, v, layout, cfg, attn_mask, scale, is_causal, backend, return_weights,
                                  head_group, seq_group)
    call = make_call(q, k, v, layout, cfg, attn_mask, scale, is_causal)
    kernel = None if attention_fn is None else delegate.as_kernel(attention_fn)
    impl = select_backend(backend, call, weights_only=kernel is not None)
    w = impl.key_weights(call) if call.plan.active else None
    why = None if kernel is None else delegate.unsupported(call, kernel)
    if kernel is not None and why is None:
        out = delegate.attention(call, w, kernel)
    else:
        if why is not None:
            warn_once(f"dar: attention_fn {kernel.name!r} cannot run this call ({why}); such calls use the "
                      f"{impl.name} backend's attention instead")
        out = impl.attention(call, w)
    return with_weights(out, w, return_weights, (q.shape[0], k.shape[2]))
