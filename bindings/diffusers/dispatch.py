"""The attention backend chosen in diffusers, as the kernel DAR's rebalanced calls run on.

A user who picked an attention backend in diffusers — ``model.set_attention_backend("flash" |
"_native_cudnn" | "sage" | "flex" | ...)``, or the ``attention_backend(...)`` context manager —
keeps it with DAR on: the rebalanced calls go through diffusers' own ``dispatch_attention_fn`` with
that backend, on the transformed inputs of `dar.delegate` (``K' = w ⊙ K``; for ``prob_scale`` the
key bias ``ln w``, or an extra head-dim column on backends that take no additive mask). DAR adds
only its scoring.

This applies when the binding's ``backend`` is ``"auto"`` and a backend was chosen: the processor
passes ``backend=...``, or the registry's active backend is not diffusers' default ``native``.
Otherwise DAR's own ``"auto"`` (measured, `dar.backends.tuner`) runs the calls; an explicit DAR
``backend=`` always wins.

What each backend accepts is read from its implementation in ``diffusers.models.attention_dispatch``
(`_CAPS`); unknown backends are assumed to take no additive mask and head dims in multiples of 8.
A call the backend cannot express runs on DAR's backend instead, with a one-time warning (`dar_attention`).
"""

from __future__ import annotations

import dataclasses

from dar.delegate import AttentionKernel

NATIVE = "native"


@dataclasses.dataclass(frozen=True)
class Caps:
    takes_bias: bool
    head_dim_multiple: int = 8
    max_head_dim: int | None = None
    key_mask_2d: bool = False  # the backend reads a (B, Lk) key-padding mask, not a 4-D one


_SDPA_LIKE = Caps(takes_bias=True)
_FLASH = Caps(takes_bias=False, max_head_dim=256)
_FLASH_VARLEN = Caps(takes_bias=False, max_head_dim=256, key_mask_2d=True)
_SAGE = Caps(takes_bias=False, max_head_dim=128)
_SAGE_VARLEN = Caps(takes_bias=False, max_head_dim=128, key_mask_2d=True)

# Backends whose implementation adds a float attn_mask to the logits (SDPA, cuDNN through SDPA, flex's
# score_mod) take the ln w bias; FlashAttention and SageAttention raise on any attn_mask; the varlen
# variants read attn_mask as a key-padding mask only.
_CAPS = {
    "native": _SDPA_LIKE, "_native_math": _SDPA_LIKE, "_native_efficient": _SDPA_LIKE,
    "_native_cudnn": Caps(takes_bias=True, max_head_dim=256), "flex": Caps(takes_bias=True, head_dim_multiple=1),
    "_native_flash": _FLASH, "flash": _FLASH, "flash_hub": _FLASH, "_flash_3": _FLASH, "_flash_3_hub": _FLASH,
    "flash_4_hub": _FLASH, "aiter_fa2_hub": _FLASH,
    "flash_varlen": _FLASH_VARLEN, "flash_varlen_hub": _FLASH_VARLEN, "_flash_varlen_3": _FLASH_VARLEN,
    "_flash_3_varlen_hub": _FLASH_VARLEN,
    "sage": _SAGE, "sage_hub": _SAGE, "sage_blackwell_hub": _SAGE, "sage_varlen": _SAGE_VARLEN,
    "_sage_qk_int8_pv_fp8_cuda": _SAGE, "_sage_qk_int8_pv_fp8_cuda_sm90": _SAGE,
    "_sage_qk_int8_pv_fp16_cuda": _SAGE, "_sage_qk_int8_pv_fp16_triton": _SAGE,
}
_UNKNOWN = Caps(takes_bias=False)


def _name(backend) -> str:
    return str(getattr(backend, "value", backend))


def chosen_backend(passed):
    """The diffusers backend a dispatch call runs on when the user chose one, else None.

    ``passed``: the call's ``backend=`` argument (set by ``set_attention_backend``).
    """
    if passed is not None:
        return passed
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    except ImportError:  # pragma: no cover - a diffusers without the dispatcher has nothing to route
        return None
    active = getattr(_AttentionBackendRegistry, "_active_backend", None)
    if active is None or _name(active) == NATIVE:
        return None
    return active


def kernel(original, backend) -> AttentionKernel:
    """``original`` (diffusers' dispatch function) pinned to ``backend``, as a DAR delegate kernel.

    The kernel takes SDPA-layout views and hands diffusers ``(B, L, H, D)`` views (no copies).
    """
    name = _name(backend)
    caps = _CAPS.get(name, _UNKNOWN)

    def fn(q, k, v, attn_mask=None, scale=None, is_causal=False):
        if caps.key_mask_2d and attn_mask is not None and attn_mask.shape[1] == 1 and attn_mask.shape[2] == 1:
            attn_mask = attn_mask[:, 0, 0, :]  # the key-padding mask as the varlen backends read it
        out = original(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
                       is_causal=is_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1], backend=backend)
        return out.transpose(1, 2)

    return AttentionKernel(fn, name=f"diffusers backend {name!r}", takes_bias=caps.takes_bias,
                           head_dim_multiple=caps.head_dim_multiple, max_head_dim=caps.max_head_dim,
                           same_head_dims=True)
