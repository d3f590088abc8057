"""The flex backend: DAR through PyTorch FlexAttention.

Key weights come from the torch scoring path (`dar.scoring`); the rebalanced attention is one
``flex_attention`` call whose ``score_mod`` reads the weights:

- ``key_scale``:  ``score * w[b, kv]`` on rebalanced query rows (``score`` is already ``scale * q.k``),
- ``prob_scale``: ``score + ln w[b, kv]`` on rebalanced query rows,

plus the additive part of a key-only float mask. Key-padding masks and ``is_causal`` become a
`BlockMask` built directly from per-block counts, so no ``Lq x Lk`` mask is ever materialised by
this module. Masks that vary over query rows or heads are not supported (use ``backend="torch"``).

On CUDA the call goes through ``torch.compile(flex_attention)``, which generates a fused kernel.
Elsewhere FlexAttention runs its eager implementation, which materialises the scores inside
PyTorch: correct, but only meant for testing.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch

from ..call import DARCall
from .. import scoring
from .base import FLEX_CANNOT_RUN, Backend

try:  # FlexAttention appeared in torch 2.5; the registry turns ImportError into "unavailable".
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError as exc:  # pragma: no cover - depends on the installed torch
    raise ImportError(f"the flex backend needs torch.nn.attention.flex_attention (torch >= 2.5): {exc}") from exc

if "seq_lengths" not in inspect.signature(BlockMask.from_kv_blocks).parameters:
    # torch 2.5's BlockMask covers whole blocks only, so a block mask could not express Lq, Lk that are not
    # multiples of 128; the backend is unavailable there (and says so) rather than wrong.
    raise ImportError(f"the flex backend needs a FlexAttention whose BlockMask.from_kv_blocks takes seq_lengths, "
                      f"which torch {torch.__version__} lacks (torch 2.14 and 2.15 are tested)")

BLOCK = 128  # FlexAttention's default sparse block size.

# Block states of a (query block, key block) tile.
_EMPTY, _PARTIAL, _FULL = 0, 1, 2


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    # One compiled entry point; dynamo specialises it per shape and dtype and turns
    # dimensions dynamic after the first recompile, as it does for any compiled function.
    return torch.compile(flex_attention)


def _run_flex(q, k, v, score_mod, block_mask, scale: float) -> torch.Tensor:
    kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if torch.compiler.is_compiling():
        # Inside a caller's torch.compile region dynamo traces flex_attention itself.
        return flex_attention(q, k, v, **kwargs)
    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, **kwargs)
    with warnings.catch_warnings():
        # The eager path is intended here (CPU tests); torch's "call it compiled" advice is noise.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, **kwargs)


def _block_mask_from_states(states: torch.Tensor, mask_mod, lq: int, lk: int) -> BlockMask:
    """A BlockMask from per-tile states ``(B, nQ, nK)`` (empty / partial / full), no dense mask."""
    partial = states == _PARTIAL
    full = states == _FULL

    def listing(sel: torch.Tensor):
        num = sel.sum(dim=-1, dtype=torch.int32)
        # Selected key blocks first, in ascending order (stable sort on "not selected").
        idx = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num[:, None], idx[:, None]  # add the (broadcast) head dim

    kv_num, kv_idx = listing(partial)
    full_num, full_idx = listing(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(lq, lk))


def _key_padding_block_mask(keep: torch.Tensor, lq: int, lk: int) -> BlockMask:
    """Block mask of a per-key mask ``keep (B, Lk)`` bool, the same for every query row."""
    b = keep.shape[0]
    nq, nk = -(-lq // BLOCK), -(-lk // BLOCK)
    padded = torch.zeros(b, nk * BLOCK, dtype=torch.bool, device=keep.device)
    padded[:, :lk] = keep
    tiles = padded.view(b, nk, BLOCK)
    # Padding past Lk counts as "allowed" for the full test: flex bounds-checks the tail itself.
    tail_ok = torch.arange(nk * BLOCK, device=keep.device).view(nk, BLOCK) >= lk
    all_ok = (tiles | tail_ok).all(dim=-1)
    any_ok = tiles.any(dim=-1)
    state = torch.where(all_ok, _FULL, torch.where(any_ok, _PARTIAL, _EMPTY)).to(torch.int8)
    states = state[:, None, :].expand(b, nq, nk)

    def mask_mod(bi, h, q_idx, kv_idx):
        return padded[bi, kv_idx]

    return _block_mask_from_states(states, mask_mod, lq, lk)


def _causal_block_mask(batch: int, lq: int, lk: int, device) -> BlockMask:
    """Top-left causal (key j allowed for query i when j <= i), as SDPA's ``is_causal``."""
    nq, nk = -(-lq // BLOCK), -(-lk // BLOCK)
    qb = torch.arange(nq, device=device)[:, None]
    kb = torch.arange(nk, device=device)[None, :]
    # Key block j is full for query block i when its last key <= the block's first query.
    state = torch.where(kb < qb, _FULL, torch.where(kb == qb, _PARTIAL, _EMPTY)).to(torch.int8)
    states = state[None].expand(batch, nq, nk)

    def mask_mod(bi, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    return _block_mask_from_states(states, mask_mod, lq, lk)


def _score_mod(call: DARCall, weights: torch.Tensor | None):
    """The score_mod for a call, or None when scores pass through unchanged."""
    mask = call.mask
    bias = None
    if mask.mask is not None and mask.mask.dtype != torch.bool:
        kb = mask.key_bias()  # (B, Lk) float32, -inf where masked (the block mask drops those)
        # Only -inf is the block mask's business; NaN and +inf biases reach the scores (docs/semantics.md).
        bias = torch.where(kb == float("-inf"), torch.zeros_like(kb), kb)
    if weights is None:
        if bias is None:
            return None

        def plain(score, b, h, q_idx, kv_idx):
            return score + bias[b, kv_idx]

        return plain

    plan = call.plan
    all_rows = all(r == ((0, plan.lq),) for r in plan.gen_ranges)
    rows = None if all_rows else plan.tensors(call.q.device).rebalanced_rows(plan.lq)  # (B, Lq) bool
    if call.cfg.mode == "key_scale":
        factor = weights.float()

        def rebalance(score, b, h, q_idx, kv_idx):
            return score * factor[b, kv_idx]
    else:
        # ln w in the scores' precision: float64 inputs get a float64 log (a float32 one is off by ~1e-8).
        log_w = torch.log(weights.to(torch.float64 if call.q.dtype == torch.float64 else torch.float32))

        def rebalance(score, b, h, q_idx, kv_idx):
            return score + log_w[b, kv_idx]

    def score_mod(score, b, h, q_idx, kv_idx):
        out = rebalance(score, b, h, q_idx, kv_idx)
        if rows is not None:
            out = torch.where(rows[b, q_idx], out, score)
        if bias is not None:
            out = out + bias[b, kv_idx]
        return out

    return score_mod


def _block_mask(call: DARCall) -> BlockMask | None:
    mask = call.mask
    b, lq, lk = mask.batch, mask.lq, mask.lk
    if mask.is_causal:
        return _causal_block_mask(b, lq, lk, call.q.device)
    if mask.mask is None:
        return None
    return _key_padding_block_mask(mask.key_allowed(), lq, lk)


class FlexBackend(Backend):
    name = "flex"
    masks = "key"  # the block mask and score_mod read a (B, Lk) key bias and the causal rule
    cannot_run = FLEX_CANNOT_RUN

    def unsupported(self, call: DARCall) -> str | None:
        why = self.mask_refusal(call)
        if why is not None:
            return why
        q = call.q
        if q.device.type == "cuda" and q.dtype == torch.float64:
            return "float64 inputs on CUDA are not supported by the flex backend (use backend='torch')"
        # Key weights alone run in torch (no gradient: w is piecewise constant); only the attention is flex's.
        needs_grad = call.v is not None and torch.is_grad_enabled() and any(
            t.requires_grad for t in (call.q, call.k, call.v))
        if q.device.type != "cuda" and needs_grad:
            return f"FlexAttention has no backward pass on {q.device.type}; inputs require grad"
        if q.device.type not in ("cuda", "cpu"):
            return f"the flex backend runs on CUDA and CPU, not {q.device.type}"
        return None

    def key_weights(self, call: DARCall) -> torch.Tensor:
        return scoring.key_weights(call)  # scoring is m x Lk work; the attention is what flex fuses

    def attention(self, call: DARCall, weights: torch.Tensor | None) -> torch.Tensor:
        if not call.plan.active:
            weights = None
        q, k, v = call.q, call.k, call.v
        if not torch.is_grad_enabled():
            # FlexAttention refuses CPU inputs that require grad even under no_grad (it has no CPU
            # backward); no graph is recorded here anyway.
            q, k, v = q.detach(), k.detach(), v.detach()
        out = _run_flex(q, k, v, _score_mod(call, weights), _block_mask(call), call.scale)
        return out.to(call.q.dtype)
