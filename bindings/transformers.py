"""DAR as a transformers attention implementation: ``attn_implementation="dar"``.

```python
from dar.bindings import transformers as dar_tf
dar_tf.register()                                   # adds "dar" to transformers' AttentionInterface
model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="dar")
ref_mask, gen_mask = dar_tf.image_token_masks(input_ids, image_token_id, generated=-1)
with dar.rebalanced(model, cfg, ref_mask=ref_mask, gen_mask=gen_mask):
    out = model.generate(input_ids)
```

How it works (docs/transformers.md has the long form):

- The registered attention function reads the DAR state of the attention module it is called for. `enable`
  puts that state on every submodule of the model's decoder (``model.get_decoder()``, the language backbone),
  so vision encoders and other models are untouched and two models are independent. Without a state, or
  when the current call has no reference key and no generated-image query in its windows, the call is handed
  to transformers' own ``sdpa_attention_forward`` unchanged.
- ``ref_mask`` / ``gen_mask`` are ``(B, L)`` bools over absolute sequence positions. A call sees the new
  queries at absolute positions ``[start, start + Lq)`` and keys whose index is their absolute position
  (DynamicCache, StaticCache, or no cache). ``start`` is the cache length before the call, read by a forward
  pre-hook on the decoder from whichever argument is a ``Cache`` (transformers calls it ``past_key_values``
  up to 5.23 and ``cache`` from 5.24, by keyword or positionally). A call whose position cannot be told
  raises; it is never guessed. Ranges are clipped to those windows and handed to `dar.dar_attention` as one
  `TokenLayout` per batch row, together with transformers' 4-D mask (causal + padding).
- The masks are turned into ranges once, in `enable` (one host read); per call only small host-side tuples
  are mapped (cached), so attention itself never synchronises with the device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Sequence

import torch

from dar.api import dar_attention
from dar.backends import check_backend
from dar.call import resolve_config
from dar.config import DARConfig
from dar.extras import require
from dar.layout import TokenLayout

ATTN_NAME = "dar"
_STATE_ATTR = "_dar_state"
_HOOKS_ATTR = "_dar_hooks"

Ranges = tuple[tuple[int, int], ...]


# --------------------------------------------------------------------------------------------- registration

def register() -> None:
    """Add ``"dar"`` to transformers' ``AttentionInterface`` (and its mask interface). Idempotent.

    The mask interface entry is transformers' ``sdpa_mask``, so models hand the "dar" function exactly the
    4-D boolean mask (or ``None`` + ``is_causal``) they hand the "sdpa" function.
    """
    require("transformers", "transformers", "dar.bindings.transformers.register()")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, dar_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, AttentionMaskInterface._global_mapping["sdpa"])


def is_registered() -> bool:
    """True when transformers has a ``"dar"`` attention implementation (this module's, or a wrapper of it)."""
    from transformers import AttentionInterface

    return ATTN_NAME in AttentionInterface._global_mapping


# --------------------------------------------------------------------------------------------- masks helper

class ImageTokenMasks(NamedTuple):
    """``(ref_mask, gen_mask)``, both ``(B, L)`` bool; pass them as ``ref_mask=`` / ``gen_mask=``."""

    ref_mask: torch.Tensor
    gen_mask: torch.Tensor


def _runs(row: torch.Tensor) -> Ranges:
    """Half-open ``(start, end)`` runs of True in a 1-D bool tensor (host tensor)."""
    x = row.to(torch.int8)
    zero = torch.zeros(1, dtype=torch.int8)
    d = torch.diff(x, prepend=zero, append=zero)
    starts = (d == 1).nonzero().flatten().tolist()
    ends = (d == -1).nonzero().flatten().tolist()
    return tuple(zip(starts, ends))


def _as_id_list(image_token_id) -> list[int]:
    if isinstance(image_token_id, torch.Tensor):
        image_token_id = image_token_id.flatten().tolist()
    if isinstance(image_token_id, bool):
        raise TypeError("image_token_id must be an int or a sequence of ints, got bool")
    if isinstance(image_token_id, int):
        return [image_token_id]
    if isinstance(image_token_id, (str, bytes)) or not isinstance(image_token_id, (Sequence, set, frozenset, range)):
        raise TypeError(f"image_token_id must be an int or a sequence of ints, got {type(image_token_id).__name__}")
    ids = list(image_token_id)
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise TypeError(f"image_token_id must be an int or a non-empty sequence of ints, got {image_token_id!r}")
    return ids


def image_token_masks(input_ids: torch.Tensor, image_token_id, *, generated: int | Sequence[int] = (),
                      num_generated: int = 0) -> ImageTokenMasks:
    """``ref_mask`` / ``gen_mask`` from the image placeholder tokens of ``input_ids``.

    Each maximal run of image tokens in a row is one image; images are counted per row from 0 in sequence
    order (negative indices count from the end, as in Python).

    Args:
        input_ids: ``(B, L)`` or ``(L,)`` integer tensor (left padding is fine: pads are not image tokens).
        image_token_id: the placeholder token id, or a sequence / tensor of ids (e.g. a range of visual-token
            ids). Two images must be separated by at least one other token to count as two.
        generated: index (or indices) of the image run(s) that are the generated image in every row; those
            positions go to ``gen_mask``, every other image run to ``ref_mask``. Default: none.
        num_generated: that many positions *after* the input are generated-image tokens (autoregressive image
            generation, e.g. Janus: the image is decoded token by token after the prompt). The masks then have
            length ``L + num_generated``.

    Returns:
        `ImageTokenMasks` ``(ref_mask, gen_mask)``, ``(B, L + num_generated)`` bool on ``input_ids.device``.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer torch.Tensor, got "
                        f"{input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (B, L) or (L,), got {tuple(input_ids.shape)}")
    if isinstance(num_generated, bool) or not isinstance(num_generated, int) or num_generated < 0:
        raise ValueError(f"num_generated must be an int >= 0, got {num_generated!r}")
    gen_idx = [generated] if isinstance(generated, int) and not isinstance(generated, bool) else generated
    if isinstance(gen_idx, (str, bytes)) or not isinstance(gen_idx, Sequence) or any(
            isinstance(i, bool) or not isinstance(i, int) for i in gen_idx):
        raise TypeError(f"generated must be an int or a sequence of ints (image indices), got {generated!r}")
    ids = torch.tensor(_as_id_list(image_token_id), dtype=input_ids.dtype, device=input_ids.device)
    is_image = torch.isin(input_ids, ids).cpu()
    b, length = is_image.shape
    ref = torch.zeros(b, length + num_generated, dtype=torch.bool)
    gen = torch.zeros_like(ref)
    gen[:, length:] = True
    for row in range(b):
        runs = _runs(is_image[row])
        chosen = set()
        for i in gen_idx:
            if not -len(runs) <= i < len(runs):
                raise ValueError(f"generated={generated!r}: row {row} of input_ids has {len(runs)} image run(s), "
                                 f"so image index {i} does not exist")
            chosen.add(i % len(runs))
        for j, (s, e) in enumerate(runs):
            (gen if j in chosen else ref)[row, s:e] = True
    return ImageTokenMasks(ref.to(input_ids.device), gen.to(input_ids.device))


# --------------------------------------------------------------------------------------------- state

def _check_mask(name: str, mask) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a (B, L) bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = image token), got dtype {mask.dtype}")
    if mask.dim() == 1:
        mask = mask[None]
    if mask.dim() != 2 or mask.shape[1] == 0:
        raise ValueError(f"{name} must have shape (B, L) or (L,) with L > 0, got {tuple(mask.shape)}")
    return mask


def _decoder_of(model):
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    return dec if isinstance(dec, torch.nn.Module) else model


@dataclasses.dataclass(eq=False)
class DARState:
    """The DAR settings of one enabled model, read by every attention call of its decoder.

    ref / gen: absolute ``(start, end)`` ranges per mask row (one row broadcasts over the batch).
    start:     absolute position of the current forward's first query, set by the decoder's forward
               pre-hook from the cache it receives (None between forwards: then a call must hold the whole
               sequence, Lq == Lk, or it raises).
    exact:     True when the keys end with the new queries (no cache or DynamicCache), False for a
               StaticCache, whose key tensor has empty slots after them.
    """

    config: DARConfig
    backend: str
    ref: tuple[Ranges, ...]
    gen: tuple[Ranges, ...]
    length: int
    start: int | None = None
    exact: bool = True

    @property
    def rows(self) -> int:
        return len(self.ref)

    def layouts(self, batch: int, start: int, lq: int, lk: int):
        """Per-row TokenLayouts for a call's windows, or None when no row has both ref keys and gen queries."""
        if self.rows != 1 and self.rows != batch:
            raise ValueError(
                f"dar: ref_mask/gen_mask have {self.rows} rows but the attention call has batch size {batch}; "
                f"pass masks with 1 row (shared) or one row per batch entry (e.g. after num_return_sequences, "
                f"beam search or classifier-free guidance doubling, repeat the masks the same way)")
        # Eager calls reuse cached layouts; torch.compile traces the plain function (host constants only).
        build = _window_layouts if torch.compiler.is_compiling() else _cached_window_layouts
        return build(self.ref, self.gen, start, lq, lk)


def _window_layouts(ref, gen, start: int, lq: int, lk: int):
    # Keys: index == absolute position, usable up to the last query (later static-cache slots are empty).
    key_end = min(lk, start + lq)
    q_end = start + lq
    layouts, active = [], False
    for r, g in zip(ref, gen):
        rr = tuple((s, min(e, key_end)) for s, e in r if s < key_end)
        gg = tuple((max(s, start) - start, min(e, q_end) - start) for s, e in g if s < q_end and e > start)
        active |= bool(rr) and bool(gg)
        layouts.append(TokenLayout(ref=rr, gen=gg))
    if not active:
        return None
    if len(layouts) == 1:
        return layouts[0]  # one layout broadcasts over the batch
    return tuple(layouts)


_cached_window_layouts = functools.lru_cache(maxsize=1024)(_window_layouts)


# --------------------------------------------------------------------------------------------- cache window

def _cache_start(cache) -> tuple[int, bool]:
    """``(positions already in cache, keys end with the queries)``; raise for caches DAR cannot map."""
    from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

    if cache is None:
        return 0, True
    if not isinstance(cache, Cache):
        raise TypeError(f"dar: the cache must be a transformers Cache (DynamicCache or StaticCache) under DAR, "
                        f"got {type(cache).__name__}")
    start, exact = None, True
    for i, layer in enumerate(cache.layers):
        if type(layer) not in (DynamicLayer, StaticLayer):
            raise ValueError(
                f"dar: cache layer {i} is a {type(layer).__name__}; DAR needs key index == absolute position, "
                f"which holds for DynamicCache / StaticCache full-attention layers only (no sliding-window, "
                f"quantized, offloaded or linear-attention layers)")
        exact &= type(layer) is DynamicLayer
        if layer.is_initialized or type(layer) is DynamicLayer:
            n = layer.get_seq_length()
            # StaticLayer keeps its length on the device: one read per forward, not per attention call.
            n = int(n) if isinstance(n, torch.Tensor) else n
            if start is None:
                start = n
            elif n != start:
                raise ValueError(f"dar: cache layers hold different lengths ({start} and {n}); DAR cannot map "
                                 f"absolute positions onto them")
    return start or 0, exact


def _find_cache(args: tuple, kwargs: dict):
    """The cache a decoder forward received, found by type rather than by argument name.

    transformers has passed it as ``past_key_values`` (5.0 - 5.23) and as ``cache`` (5.24 on, where
    ``past_key_values`` is a deprecated alias), by keyword or positionally. Looking for the one argument
    that is a ``Cache`` works for every spelling; a non-Cache value under either known name (a legacy
    tuple cache) is refused rather than ignored, since ignoring it would mis-position the queries.
    """
    from transformers.cache_utils import Cache

    found = [a for a in (*args, *kwargs.values()) if isinstance(a, Cache)]
    if len({id(c) for c in found}) > 1:
        raise ValueError(f"dar: the decoder received {len(found)} different caches; DAR cannot tell which one holds "
                         f"this forward's keys")
    if found:
        return found[0]
    for name in ("cache", "past_key_values"):
        value = kwargs.get(name)
        if value is not None:
            raise TypeError(f"dar: {name} must be a transformers Cache (DynamicCache or StaticCache) under DAR, "
                            f"got {type(value).__name__}")
    return None


def _pre_forward(state: DARState):
    def hook(module, args, kwargs):
        state.start, state.exact = _cache_start(_find_cache(args, kwargs))
    return hook


def _post_forward(state: DARState):
    def hook(module, args, kwargs, output):
        state.start, state.exact = None, True
    return hook


# --------------------------------------------------------------------------------------------- enable / disable

def enable(model, config: DARConfig | None = None, *, ref_mask: torch.Tensor | None = None,
           gen_mask: torch.Tensor | None = None, backend: str = "auto") -> DARState:
    """Turn DAR on for a transformers model loaded with ``attn_implementation="dar"``.

    Args:
        model: a ``transformers.PreTrainedModel`` whose decoder (``model.get_decoder()``) uses "dar".
        config: a `dar.DARConfig` (default ``DARConfig()``).
        ref_mask: ``(B, L)`` (or ``(L,)``) bool, True on reference-image token positions; each contiguous run
            is one reference image. Absolute positions (including left padding); positions ``>= L`` are
            neither reference nor generated.
        gen_mask: same shape, True on positions whose queries are generated-image tokens.
        backend: `dar.dar_attention` backend (``"auto"``: the fastest one that supports the inputs).

    Returns:
        The `DARState` now attached to the decoder's modules (replacing an earlier one).
    """
    import transformers

    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"model must be a transformers.PreTrainedModel, got {type(model).__name__}")
    missing = [name for name, mask in (("ref_mask", ref_mask), ("gen_mask", gen_mask)) if mask is None]
    if missing:
        # A language model's sequence does not say which tokens are images: the caller does.
        raise TypeError(f"dar.enable on a transformers model ({type(model).__name__}) needs "
                        f"{' and '.join(m + '=' for m in missing)}: (B, L) bool masks of the reference-image and "
                        f"generated-image token positions; "
                        f"dar.bindings.transformers.image_token_masks(input_ids, image_token_id, generated=...) "
                        f"builds both from the input ids")
    config = resolve_config(config, "config")
    check_backend(backend, "dense")
    if not is_registered():
        raise RuntimeError("dar: the 'dar' attention implementation is not registered; call "
                           "dar.bindings.transformers.register() before loading the model with attn_implementation='dar'")
    decoder = _decoder_of(model)
    impl = getattr(decoder.config, "_attn_implementation", None)
    if impl != ATTN_NAME:
        raise ValueError(
            f"dar: the model's decoder ({type(decoder).__name__}) uses attn_implementation={impl!r}; DAR needs 'dar': "
            f"call dar.bindings.transformers.register(), then load with attn_implementation='dar' or call "
            f"model.set_attn_implementation('dar')")
    ref_mask = _check_mask("ref_mask", ref_mask)
    gen_mask = _check_mask("gen_mask", gen_mask)
    if ref_mask.shape != gen_mask.shape:
        raise ValueError(f"ref_mask and gen_mask must have the same shape, got {tuple(ref_mask.shape)} "
                         f"and {tuple(gen_mask.shape)}")
    ref_cpu, gen_cpu = ref_mask.cpu(), gen_mask.cpu()  # the one host read: masks -> ranges
    state = DARState(config=config, backend=backend,
                     ref=tuple(_runs(r) for r in ref_cpu), gen=tuple(_runs(g) for g in gen_cpu),
                     length=ref_mask.shape[1])
    disable(model)
    for mod in decoder.modules():
        object.__setattr__(mod, _STATE_ATTR, state)
    hooks = (decoder.register_forward_pre_hook(_pre_forward(state), with_kwargs=True),
             decoder.register_forward_hook(_post_forward(state), with_kwargs=True))
    # Kept on the decoder, the unit DAR acts on: enabling a model and its inner model replace each other.
    object.__setattr__(decoder, _HOOKS_ATTR, hooks)
    return state


def disable(model) -> None:
    """Turn DAR off: remove the state and hooks `enable` added (no-op when DAR is not on)."""
    decoder = _decoder_of(model)
    hooks = decoder.__dict__.pop(_HOOKS_ATTR, None)
    if hooks is None:
        return
    for h in hooks:
        h.remove()
    for mod in decoder.modules():
        mod.__dict__.pop(_STATE_ATTR, None)


def active_state(model) -> DARState | None:
    """The `DARState` of an enabled model, else None."""
    return _decoder_of(model).__dict__.get(_STATE_ATTR)


# --------------------------------------------------------------------------------------------- attention

def _sdpa_forward():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _check_call(module, dropout, kwargs) -> None:
    """Inputs the DAR path cannot honour: raise rather than compute something else."""
    if dropout:
        raise ValueError(
            f"dar: attention dropout={dropout} is not supported under DAR (DAR is an inference method); call "
            f"model.eval() or set the config's attention_dropout to 0")
    for name in ("position_bias", "softcap", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise ValueError(f"dar: the attention argument {name!r} is not supported under DAR")
    if kwargs.get("cache") is not None:
        raise ValueError("dar: paged attention caches (continuous batching) are not supported under DAR")


def _finite_mask(mask: torch.Tensor) -> torch.Tensor:
    """An additive float mask with -inf where transformers put its dtype's minimum.

    DAR excludes a reference key from normalisation only when it is masked out (-inf) for every query;
    a large finite negative would count it as attendable.
    """
    floor = torch.finfo(mask.dtype).min / 2
    return mask.masked_fill(mask <= floor, -math.inf)


def dar_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs):
    """The ``"dar"`` entry of ``AttentionInterface``: same signature and output as transformers' sdpa one.

    ``query`` ``(B, Hq, Lq, D)``, ``key`` / ``value`` ``(B, Hk, Lk, D)`` (cache included); returns
    ``((B, Lq, Hq, Dv) output, None)``.
    """
    state = module.__dict__.get(_STATE_ATTR)
    if state is None:
        return _sdpa_forward()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                               is_causal=is_causal, **kwargs)
    b, _, lq, _ = query.shape
    lk = key.shape[2]
    start = state.start
    if start is None:
        # No decoder forward is in progress (a layer called directly): without the cache length the queries'
        # positions are known only when the call holds the whole sequence.
        if lq != lk:
            raise ValueError(f"dar: cannot tell where this call's {lq} queries sit among its {lk} keys: the attention "
                             f"was not reached through the forward of the decoder DAR was enabled on "
                             f"({type(module).__name__}), which is where DAR reads the cache length")
        start = 0
    if start < 0 or start + lq > lk or (state.exact and start + lq != lk):
        raise ValueError(f"dar: the queries' absolute positions [{start}, {start + lq}) do not fit the {lk} keys of "
                         f"this attention call; DAR needs key index == absolute position")
    layouts = state.layouts(b, start, lq, lk)
    if layouts is None:  # nothing to rebalance in these windows: exactly transformers' sdpa
        return _sdpa_forward()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                               is_causal=is_causal, **kwargs)
    _check_call(module, dropout, kwargs)
    causal = False
    if attention_mask is None:
        # transformers drops the mask when SDPA's is_causal flag expresses it (single query: no mask at all).
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True)) and lq > 1
        if causal and lk > lq:
            if start != 0:
                raise ValueError("dar: got no attention mask for a causal multi-query call with cached keys")
            # Prefill into an empty static cache: only the first Lq key slots hold tokens (top-left causal).
            key, value = key[:, :, :lq], value[:, :, :lq]
    elif attention_mask.dtype != torch.bool:
        attention_mask = _finite_mask(attention_mask)
    out = dar_attention(query, key, value, layouts, state.config, attn_mask=attention_mask, scale=scaling,
                        is_causal=causal, backend=state.backend)
    return out.transpose(1, 2).contiguous(), None


__all__ = ["ATTN_NAME", "DARState", "ImageTokenMasks", "active_state", "dar_attention_forward", "disable", "enable",
           "image_token_masks", "is_registered", "register"]
