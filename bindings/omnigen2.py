"""OmniGen2 (VectorSpaceLab/OmniGen2): the token layout of its transformer's joint sequence.

OmniGen2's ``OmniGen2Transformer2DModel`` is a diffusers ``ModelMixin`` whose attention modules use
one of two processors of ``omnigen2.models.attention_processor``:

- ``OmniGen2AttnProcessorFlash2Varlen`` unpads each row by its key mask and calls
  ``flash_attn_varlen_func`` (a name imported into that module) on the packed rows, one sequence per
  batch row, ``causal=False``, K/V heads already repeated to the query heads;
- ``OmniGen2AttnProcessor`` (used when flash-attn does not import) calls
  ``F.scaled_dot_product_attention`` on ``(B, H, L, D)`` with a ``(B, 1, 1, L)`` key-padding mask.

`dar.enable` reaches both through the diffusers binding's interception sites (`flash_attn_varlen_func`
and ``F``), with the layout derived here from the forward's own arguments. Nothing of OmniGen2 is
imported: the transformer is recognised by class name.

Per batch row the main ``layers`` attend over ``[text, reference 1, ..., reference n, target]``
(padding at the end of the row): the text length is the row's ``text_attention_mask`` sum, reference
``j`` of size ``(H_j, W_j)`` latents has ``(H_j / p) * (W_j / p)`` tokens and the target ``(h / p) *
(w / p)``, ``p`` the patch size. The refiner stages (``context_refiner``, ``noise_refiner``,
``ref_image_refiner``) attend within one segment; their calls have other lengths and run unchanged.
"""

from __future__ import annotations

import weakref

import torch

from dar.layout import TokenLayout

from .runtime.outcomes import NO_REFERENCES, Derived, NoLayout

CLASS_NAME = "OmniGen2Transformer2DModel"


def is_transformer(model) -> bool:
    """True for OmniGen2's transformer (or a subclass), recognised by class name."""
    return any(cls.__name__ == CLASS_NAME for cls in type(model).__mro__)


def is_pipeline(target) -> bool:
    """True for a pipeline (an object with a ``components`` dict) whose ``transformer`` is OmniGen2's."""
    components = getattr(target, "components", None)
    return isinstance(components, dict) and is_transformer(components.get("transformer"))


def _grid(img, p: int, where: str) -> tuple[int, int]:
    if not isinstance(img, torch.Tensor) or img.dim() != 3:
        raise ValueError(f"{where} must be a (C, H, W) latent tensor, got "
                         f"{type(img).__name__ if not isinstance(img, torch.Tensor) else tuple(img.shape)}")
    return int(img.shape[1]) // p, int(img.shape[2]) // p


def _caption_lengths(mask: torch.Tensor, memo: dict) -> list[int]:
    """Per-row text lengths (the mask's row sums), read on the host once per mask tensor and version.

    The pipeline builds each text mask once per generation and passes it at every step, so later
    steps reuse the value without a device synchronisation.
    """
    cache = memo.setdefault("omnigen2_caption_lengths", {})
    key = (id(mask), mask._version, tuple(mask.shape))
    hit = cache.get(key)
    if hit is not None and hit[0]() is mask:
        return hit[1]
    lens = [int(x) for x in mask.sum(dim=1).tolist()]
    if len(cache) >= 16:
        cache.clear()
    cache[key] = (weakref.ref(mask), lens)
    return lens


def layouts(model, kw: dict, memo: dict):
    """The `Derived` layouts of one OmniGen2 forward (or a `NoLayout` saying why there are none)."""
    hs, mask, refs = kw.get("hidden_states"), kw.get("text_attention_mask"), kw.get("ref_image_hidden_states")
    if hs is None or mask is None:
        return NoLayout("the forward received no hidden_states or text_attention_mask; pass layout_fn=")
    p = int(model.config.patch_size)
    imgs = list(hs)
    batch = len(imgs)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != batch:
        raise ValueError(f"OmniGen2 layout: text_attention_mask must be (B, L) with B = {batch} rows; "
                         f"pass layout_fn= for other inputs")
    if refs is not None and len(refs) != batch:
        raise ValueError(f"OmniGen2 layout: ref_image_hidden_states has {len(refs)} rows but the batch has {batch}; "
                         f"pass layout_fn= for other inputs")
    caps = _caption_lengths(mask, memo)
    rows, seq_lens, ref_lens = [], [], []
    for b, img in enumerate(imgs):
        h, w = _grid(img, p, f"hidden_states[{b}]")
        grids = [_grid(r, p, f"ref_image_hidden_states[{b}][{j}]") for j, r in enumerate(refs[b] or ())] \
            if refs is not None else []
        start, ranges = caps[b], []
        for gh, gw in grids:
            ranges.append((start, start + gh * gw))
            ref_lens.append(gh * gw)
            start += gh * gw
        end = start + h * w
        rows.append(TokenLayout(ref=ranges, gen=[(start, end)], image_shapes=grids or None))
        seq_lens.append(end)
    if not ref_lens:
        return NoLayout(NO_REFERENCES)
    seq_len = max(seq_lens)
    joint = (seq_len, seq_len)
    # Calls of the refiner stages: text (padded to the mask's width in the SDPA processor, to the
    # longest caption in the flash one), the target alone, one reference image alone.
    img_max = max((int(i.shape[1]) // p) * (int(i.shape[2]) // p) for i in imgs)
    segments: dict[tuple[int, int], list[str]] = {}
    for length, why in ((int(mask.shape[1]), "context refiner (text only)"), (max(caps), "context refiner (text only)"),
                        (img_max, "noise refiner (target tokens only)"),
                        (max(ref_lens), "reference-image refiner (one reference image)")):
        names = segments.setdefault((length, length), [])
        if why not in names:
            names.append(why)
    passes = tuple((shape, " or ".join(why)) for shape, why in segments.items() if shape != joint)
    return Derived(((joint, tuple(rows)),), passes)
