"""Packed (varlen) DAR: `dar_attention_varlen` and `compute_key_weights_varlen`.

The conventions are those of ``flash_attn_varlen_func``; the semantics are `dar.dar_attention`
applied to each sequence on its own (docs/semantics.md, "Packed sequences").
"""

from __future__ import annotations

import warnings

import torch

from ..autocast import outside_autocast
from ..backends import BACKENDS
from . import reference as _reference
from . import torch_backend as _torch
from .call import VarlenCall, make_varlen_call

VARLEN_BACKENDS = ("reference", "torch", "triton", "auto")
_warned: set[str] = set()


def _triton():
    """The triton varlen implementation module, or an ImportError saying why it is unavailable."""
    try:
        from . import triton as impl
    except ImportError as exc:
        return exc
    return impl


def triton_unavailable() -> str | None:
    """None when the triton varlen path can be imported here, else why not."""
    impl = _triton()
    return f"the triton varlen kernels cannot be loaded: {impl}" if isinstance(impl, ImportError) else None


def _select(backend, call: VarlenCall):
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, one of {VARLEN_BACKENDS}, got {type(backend).__name__}")
    if backend not in VARLEN_BACKENDS:
        hint = " (flex has no varlen path)" if backend in BACKENDS else ""
        raise ValueError(f"backend must be one of {VARLEN_BACKENDS}{hint}, got {backend!r}")
    if backend == "reference":
        return _reference
    if backend == "torch":
        return _torch
    impl = _triton()
    why = f"the triton varlen kernels cannot be loaded: {impl}" if isinstance(impl, ImportError) else impl.unsupported(call)
    if backend == "triton":
        if why is not None:
            raise ValueError(f"backend='triton' cannot run these inputs: {why}")
        return impl
    if call.q.device.type == "cuda":
        if why is None:
            return impl
        message = f"dar: dar_attention_varlen backend='auto' is using the torch backend on CUDA because {why}"
        if message not in _warned:
            _warned.add(message)
            warnings.warn(message, stacklevel=3)
    return _torch


def _head_group(head_group, seq_group):
    """The head group (validated); a sequence group is refused (packed tokens split across ranks)."""
    from ..parallel import check_group

    if check_group("seq_group", seq_group) is not None:
        raise ValueError("seq_group is not supported by the varlen functions: split the heads (head_group=) or "
                         "use dar.dar_attention(..., seq_group=) on padded tensors")
    return check_group("head_group", head_group)


def _weights(impl, call: VarlenCall, head_group) -> torch.Tensor:
    # With the heads split, the statistics are the torch implementation's, summed over the group.
    return impl.key_weights(call) if head_group is None else _torch.key_weights(call, head_group)


@outside_autocast
def compute_key_weights_varlen(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor,
                               cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, layouts,
                               cfg=None, softmax_scale: float | None = None, causal: bool = False, *,
                               backend: str = "auto", head_group=None, seq_group=None) -> torch.Tensor:
    """DAR key weights of packed sequences: float32 ``(total_k,)``, aligned with ``k``.

    Arguments are those of `dar_attention_varlen` without ``v``. Keys outside every reference
    range, and every key of a sequence with no generated-image queries or no reference keys, get 1.
    """
    head_group = _head_group(head_group, seq_group)
    call = make_varlen_call(q, k, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layouts, cfg,
                            softmax_scale, causal)
    impl = _select(backend, call)
    if not call.plan.active:
        return torch.ones(k.shape[0], dtype=torch.float32, device=q.device)
    return _weights(impl, call, head_group)


@outside_autocast
def dar_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, layouts, cfg=None,
                         softmax_scale: float | None = None, causal: bool = False, *, backend: str = "auto",
                         return_weights: bool = False, head_group=None, seq_group=None):
    """Attention with Dynamic Attention Rebalancing over packed sequences, a drop-in for
    ``flash_attn_varlen_func``.

    Args:
        q: ``(total_q, Hq, D)``; k: ``(total_k, Hk, D)``; v: ``(total_k, Hk, Dv)``; ``Hq % Hk == 0``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(N + 1,)`` prefix sums of the sequence lengths, on q's
            device: sequence ``n`` is ``q[cu_seqlens_q[n]:cu_seqlens_q[n + 1]]`` and likewise for k, v.
        max_seqlen_q, max_seqlen_k: ints, at least the longest sequence (as for flash-attn).
        layouts: a list of N `TokenLayout` (or one for every sequence), each relative to its own
            sequence: ``ref`` key ranges and ``gen`` query ranges.
        cfg: a `DARConfig` (default ``DARConfig()``).
        softmax_scale: default ``1 / sqrt(D)``.
        causal: flash-attn's bottom-right causal rule per sequence: query ``i`` attends key ``j``
            iff ``j <= i + Lk_n - Lq_n`` (SDPA's top-left rule when ``Lq_n == Lk_n``).
        backend: ``"reference"``, ``"torch"``, ``"triton"`` or ``"auto"`` (triton on CUDA when it
            supports the inputs, else torch; never the reference). ``"triton"`` runs the packed
            scoring and attention kernels (`dar.varlen.triton`).
        return_weights: also return the key weights.
        head_group: a ``torch.distributed`` process group over which the heads are split (this rank
            holds a contiguous slice of the query heads with their KV heads, every token); the
            result is the single-process one up to rounding (docs/parallel.md).
        seq_group: not supported for packed sequences (a ValueError); use `dar.dar_attention`.

    Returns:
        ``(total_q, Hq, Dv)`` in q's dtype, or ``(out, w)`` with ``w`` float32 ``(total_k,)``.
    """
    if v is None:
        raise TypeError("v must be a torch.Tensor (use dar.compute_key_weights_varlen for weights alone)")
    if not isinstance(return_weights, bool):
        raise TypeError(f"return_weights must be a bool, got {type(return_weights).__name__}")
    head_group = _head_group(head_group, seq_group)
    call = make_varlen_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layouts, cfg,
                            softmax_scale, causal)
    impl = _select(backend, call)
    w = _weights(impl, call, head_group) if call.plan.active else None
    out = impl.attention(call, w)
    if return_weights:
        if w is None:
            w = torch.ones(k.shape[0], dtype=torch.float32, device=q.device)
        return out, w
    return out


__all__ = ["dar_attention_varlen", "compute_key_weights_varlen", "VARLEN_BACKENDS", "VarlenCall", "triton_unavailable"]
