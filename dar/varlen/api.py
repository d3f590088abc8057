"""Packed (varlen) DAR: `dar_attention_varlen` and `compute_key_weights_varlen`.

The conventions are those of ``flash_attn_varlen_func``; the semantics are `dar.dar_attention`
applied to each sequence on its own (docs/semantics.md, "Packed sequences"). The backend is chosen
as for dense calls (`dar.backends.select_backend`: one vocabulary, one ``"auto"``); each backend runs
packed calls through its packed implementation, or refuses them with the reason.
"""

from __future__ import annotations

import torch

from ..autocast import outside_autocast
from ..backends import get_backend, names_for, select_backend
from ..call import DARCall, check_return_weights, make_packed_call, unit_weights, with_weights
from ..collectives import all_reduce
from ..parallel import check_group

# The packed call object: `dar.call.DARCall` with its ``packing`` set (one call object for dense and packed
# calls); the name stays for code that annotated with it.
VarlenCall = DARCall

# The backend names that can run packed calls (every name but those declaring they cannot).
VARLEN_BACKENDS = names_for("packed")


def triton_unavailable() -> str | None:
    """None when the triton backend's packed path can be loaded here, else why not."""
    try:
        why = get_backend("triton").cannot_run_kind("packed")
    except ImportError as exc:
        why = str(exc)
    return None if why is None else f"the triton varlen kernels cannot be loaded: {why}"


def _head_group(head_group, seq_group):
    """The head group (validated); a sequence group is refused (packed tokens split across ranks)."""
    if check_group("seq_group", seq_group) is not None:
        raise ValueError("seq_group is not supported by the varlen functions: split the heads (head_group=) or "
                         "use dar.dar_attention(..., seq_group=) on padded tensors")
    return check_group("head_group", head_group)


def _weights(impl, call: DARCall, head_group) -> torch.Tensor:
    # With the heads split, the statistics are the torch implementation's, summed over the group.
    if head_group is None:
        return impl.packed_key_weights(call)
    torch_backend = get_backend("torch")
    return torch_backend.packed.key_weights(call, torch_backend, lambda mass: all_reduce(mass, "sum", head_group))


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
    call = make_packed_call(q, k, None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layouts, cfg,
                            softmax_scale, causal)
    impl = select_backend(backend, call)
    if not call.plan.active:
        return unit_weights(k.shape[0], device=q.device)
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
        backend: a name of `dar.backends.NAMES` that can run packed calls (`VARLEN_BACKENDS`):
            ``"reference"``, ``"torch"``, ``"torch:<SDPA kernel>"``, ``"triton"`` or ``"auto"``
            (``DAR_BACKEND`` if set, else triton on CUDA when it supports the inputs, else torch;
            never the reference). ``"triton"`` runs the packed scoring and attention kernels
            (`dar.varlen.triton`); ``"flex"`` is refused with the reason.
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
    check_return_weights(return_weights)
    head_group = _head_group(head_group, seq_group)
    call = make_packed_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, layouts, cfg,
                            softmax_scale, causal)
    impl = select_backend(backend, call)
    w = _weights(impl, call, head_group) if call.plan.active else None
    out = impl.packed_attention(call, w)
    return with_weights(out, w, return_weights, (k.shape[0],))


__all__ = ["dar_attention_varlen", "compute_key_weights_varlen", "VARLEN_BACKENDS", "VarlenCall", "triton_unavailable"]
