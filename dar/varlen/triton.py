"""The varlen triton path: the packed scoring kernel (``dar::key_weights_varlen``) and the packed
rebalanced-attention kernel (``dar::rebalanced_attention_varlen``).

Both take ``cu_seqlens`` directly (one launch per stage over every sequence, no padding to the
longest, no host synchronisation) with the plan's per-sequence tensors (sampled queries, reference
ranges and groups, rebalanced query ranges, all relative to each sequence's start).
The packed form of the triton backend (`dar.backends.base.Backend.packed`); ``backend`` is unused.
"""

from __future__ import annotations

import torch

try:
    import triton  # noqa: F401  (the kernel below needs it; without it this path is unavailable)
except ImportError as exc:
    raise ImportError(f"the triton varlen path needs the `triton` package ({exc})") from exc

from ..backends.triton import rebalancing, unsupported_tensors
from ..call import DARCall
from ..kernels.scoring import key_weights_varlen as _key_weights_kernel


def unsupported(call: DARCall, backend=None) -> str | None:
    """Why the triton varlen path cannot run ``call`` (a sentence naming the input), or None."""
    return unsupported_tensors(call.q, call.k, call.v, call.packing.num_seqs, "N")


def key_weights(call: DARCall, backend=None) -> torch.Tensor:
    pt = call.plan.tensors(call.q.device)
    cfg = call.cfg
    with torch.no_grad():  # w is piecewise constant in q and k: outside autograd, as in every backend
        return _key_weights_kernel(call.q, call.k, call.packing.cu_seqlens_q, call.packing.cu_seqlens_k, call.packing.max_seqlen_q,
                                   call.packing.max_seqlen_k, pt.samples, pt.ref_ranges, pt.ref_groups, call.plan.num_groups,
                                   call.mask.is_causal, call.scale, cfg.gamma, cfg.tau_high, cfg.tau_low, cfg.thresholds)


def attention(call: DARCall, weights: torch.Tensor | None, backend=None) -> torch.Tensor:
    weights, gen_ranges = rebalancing(call, weights)
    return torch.ops.dar.rebalanced_attention_varlen(
        call.q, call.k, call.v, call.packing.cu_seqlens_q, call.packing.cu_seqlens_k, call.packing.max_seqlen_q, call.packing.max_seqlen_k,
        weights, gen_ranges, call.mask.is_causal, call.scale, call.cfg.mode)
