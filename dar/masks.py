"""`MaskSpec`: the caller's SDPA-style mask / causal flag, validated, with the views DAR needs of it."""

from __future__ import annotations

import dataclasses

import torch

NEG_INF = float("-inf")


def as_bias(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive bias of a mask: a bool mask (True = attend) becomes 0 / -inf, a float one is cast."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, NEG_INF)
    return mask.to(dtype)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """A validated attention mask.

    mask:      None, or a 4-D boolean (True = attend) or floating (additive) tensor broadcastable to
               ``(B, Hq, Lq, Lk)``.
    is_causal: SDPA's top-left causal mask (query ``i`` attends keys ``j <= i``).
    """

    mask: torch.Tensor | None
    is_causal: bool
    batch: int
    lq: int
    lk: int

    @property
    def is_key_only(self) -> bool:
        """True when the mask depends on the key (and batch) only: a key-padding mask or key bias."""
        return self.mask is not None and self.mask.size(1) == 1 and self.mask.size(2) == 1

    def key_bias(self) -> torch.Tensor | None:
        """(B, Lk) float32 additive bias of a key-only mask (-inf = masked); None without a mask."""
        if self.mask is None:
            return None
        assert self.is_key_only
        return as_bias(self.mask[:, 0, 0, :].expand(self.batch, self.lk))

    def key_allowed(self) -> torch.Tensor | None:
        """(B, Lk) bool: keys that at least one query row may attend to; None when every key is."""
        allowed = None
        if self.mask is not None:
            m = self.mask if self.mask.dtype == torch.bool else self.mask != NEG_INF
            dims = [d for d in (1, 2) if m.size(d) > 1]
            if dims:
                m = m.any(dim=dims, keepdim=True)
            allowed = m[:, 0, 0, :].expand(self.batch, self.lk)
        if self.is_causal:
            dev = self.mask.device if self.mask is not None else None
            causal = (torch.arange(self.lk, device=dev) < self.lq).expand(self.batch, self.lk)
            allowed = causal if allowed is None else allowed & causal
        return allowed

    def rows_bias(self, rows: torch.Tensor, num_heads: int) -> torch.Tensor | None:
        """Float32 additive bias ``(B, H', M, Lk)`` for the query rows ``rows (B, M)`` (clamped >= 0).

        H' is 1 or ``num_heads``. Combines the mask and the causal rule; None when neither applies.
        Sizes are ``M x Lk`` with M the number of sampled queries, never ``Lq x Lk``.
        """
        bias = None
        if self.mask is not None:
            m = self.mask
            if m.size(2) > 1:
                b_idx = torch.arange(self.batch, device=m.device)[:, None]
                m = m.expand(self.batch, m.size(1), self.lq, self.lk)[b_idx, :, rows]  # (B, M, H', Lk)
                m = m.permute(0, 2, 1, 3)
            bias = as_bias(m)
        if self.is_causal:
            keys = torch.arange(self.lk, device=rows.device)
            causal = torch.zeros(rows.shape + (self.lk,), dtype=torch.float32, device=rows.device)
            causal = causal.masked_fill(keys > rows[..., None], NEG_INF)[:, None]  # (B, 1, M, Lk)
            bias = causal if bias is None else bias + causal
        return bias


def make_mask_spec(attn_mask, is_causal, q: torch.Tensor, lk: int) -> MaskSpec:
    """Validate an SDPA-style ``attn_mask`` / ``is_causal`` pair against ``q`` and ``Lk``."""
    batch, hq, lq = q.shape[0], q.shape[1], q.shape[2]
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if attn_mask is None:
        return MaskSpec(None, is_causal, batch, lq, lk)
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if is_causal:
        raise ValueError("attn_mask and is_causal=True cannot be combined (as in SDPA); fold the causal rule into attn_mask")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be a bool (True = attend) or floating (additive) tensor, got {attn_mask.dtype}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {q.device}")
    if not 1 <= attn_mask.dim() <= 4:
        raise ValueError(f"attn_mask must have 1 to 4 dims broadcastable to (B, Hq, Lq, Lk), got shape {tuple(attn_mask.shape)}")
    full = (batch, hq, lq, lk)
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    for name, have, want in zip(("B", "Hq", "Lq", "Lk"), shape, full):
        if have not in (1, want):
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (B, Hq, Lq, Lk) = {full}: "
                f"its {name} dim is {have}"
            )
    return MaskSpec(attn_mask.reshape(shape), False, batch, lq, lk)
