"""DAR for BAGEL (ByteDance-Seed/Bagel): `enable` / `disable` on its ``Bagel`` model.

```python
handle = dar.enable(model, dar.DARConfig(gamma=0.15))   # the Bagel model, or an inferencer holding it
...build the context (references, prompt) and generate as usual...
dar.disable(model)
```

How BAGEL attends (``modeling/bagel/qwen2_navit.py``, ``modeling/bagel/bagel.py``): the language
model keeps a ``NaiveCache`` of packed keys per layer. ``forward_cache_update_vae`` and
``forward_cache_update_vit`` append a reference image's VAE and ViT tokens (each between two marker
tokens) to every sequence's cached keys; ``forward_cache_update_text`` appends prompt tokens.
A denoising step (``_forward_flow``) runs the language model with ``mode="gen"`` and
``update_past_key_values=False``: its queries are the generated image's VAE tokens plus two
markers, its keys the cached ones followed by those; every attention layer calls
``flash_attn_varlen_func`` (imported by name into ``qwen2_navit``) with ``causal=False``.

What `enable` installs (nothing of BAGEL is imported or copied; the model is recognised by class):

- the varlen interceptor on ``qwen2_navit.flash_attn_varlen_func`` (shared with OmniGen2's site);
- wrappers (instance attributes; `disable` puts back exactly what the instance held before) around ``forward_cache_update_vae`` /
  ``forward_cache_update_vit``, which note where each reference image's tokens land in the cache:
  ``packed_indexes[packed_{vae,vit}_token_indexes]`` relative to each sequence's start. The positions
  are stored on the cache object itself (attribute ``_dar_reference_keys``) because BAGEL copies
  caches with ``deepcopy`` for its CFG branches, and a copy must keep them;
- forward hooks on the language model's decoder: a cache write marks a cache that was empty as
  tracked; a denoising forward gets per sequence ``ref`` = the tracked reference keys and ``gen`` =
  the VAE query tokens (``packed_vae_token_indexes``);
- wrappers around ``generate_image`` (resets the step counter) and ``_forward_flow`` (one step per
  call: the conditional and CFG passes of a step share its index).

A denoising call whose cache was written before `enable` (reference positions unknown) raises a
ValueError naming ``layout_fn``; a cache without references (the image-free CFG branch) runs
unchanged, said once.
"""

from __future__ import annotations

import functools
import inspect
import threading
import weakref

import torch

from dar.layout import TokenLayout
from dar.varlen import VARLEN_BACKENDS

from .diffusers import intercept
from .diffusers.handle import check_options
from .runtime import context
from .runtime.outcomes import NO_REFERENCES, Derived, NoLayout
from .runtime.state import DARHandle, ModelState, Settings, call_kwargs, user_layout_fn
from .runtime.steps import StepClock, StepFilter

CLASS_NAME = "Bagel"
CACHE_ATTR = "_dar_reference_keys"
UNKNOWN = "unknown"  # a cache that held keys before DAR saw it write
_ABSENT = object()  # no instance attribute of that name before enable
LAYOUT_FN_HELP = ("pass layout_fn=callable(module, call_kwargs) -> list of TokenLayout (one per packed "
                  "sequence, ranges relative to the sequence) for the language model's forwards")

_states: "weakref.WeakKeyDictionary[torch.nn.Module, BagelState]" = weakref.WeakKeyDictionary()
_lock = threading.RLock()


def is_bagel(target) -> bool:
    """True for BAGEL's ``Bagel`` model, or an object (e.g. ``InterleaveInferencer``) whose ``model`` is one."""
    return _model_of(target) is not None


def _model_of(target):
    for obj in (target, getattr(target, "model", None)):
        if isinstance(obj, torch.nn.Module) and any(c.__name__ == CLASS_NAME for c in type(obj).__mro__) \
                and hasattr(obj, "language_model") and callable(getattr(obj, "forward_cache_update_vae", None)):
            return obj
    return None


def _host_list(t) -> list[int]:
    return [int(x) for x in (t.tolist() if isinstance(t, torch.Tensor) else t)]


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """Sorted positions -> maximal half-open runs of consecutive values."""
    out = []
    for p in positions:
        if out and out[-1][1] == p:
            out[-1] = (out[-1][0], p + 1)
        else:
            out.append((p, p + 1))
    return out


def _per_sequence(positions: list[int], starts: list[int], ends: list[int]) -> list[list[int]]:
    """Global packed positions -> per sequence, relative to the sequence start."""
    out = [[] for _ in starts]
    n = 0
    for p in sorted(positions):
        while n < len(ends) and p >= ends[n]:
            n += 1
        if n == len(ends) or p < starts[n]:
            raise ValueError(f"BAGEL layout: packed position {p} lies in no sequence; {LAYOUT_FN_HELP}")
        out[n].append(p - starts[n])
    return out


def _image_update(kind: str, bound: dict, side: int | None) -> tuple:
    """Per sequence, the ``(range, (h, w) or None)`` of the reference image one cache update writes."""
    kv = _host_list(bound["key_values_lens"])
    q = _host_list(bound["packed_seqlens"])
    starts, ends, at = [], [], 0
    for a, b in zip(kv, q):  # the merged keys of a sequence: its cached keys, then its new tokens
        starts.append(at)
        at += a + b
        ends.append(at)
    packed = _host_list(bound["packed_indexes"])
    tokens = _host_list(bound[f"packed_{kind}_token_indexes"])
    per_seq = _per_sequence([packed[i] for i in tokens], starts, ends)
    if kind == "vae":
        shapes = [tuple(int(x) for x in hw) for hw in bound["patchified_vae_latent_shapes"]]
    else:  # ViT position ids are row * side + col over each image's tokens
        pos = _host_list(bound["packed_vit_position_ids"])
        lens = _host_list(bound["vit_token_seqlens"])
        shapes, at = [], 0
        for n in lens:
            top = max(pos[at:at + n]) if n and side else None
            shapes.append((top // side + 1, top % side + 1) if top is not None else None)
            at += n
    out = []
    for n, rel in enumerate(per_seq):
        runs = _runs(rel)
        hw = shapes[n] if n < len(shapes) else None
        out.append(tuple((r, hw if hw is not None and hw[0] * hw[1] == r[1] - r[0] else None) for r in runs))
    return tuple(out)


class BagelState(ModelState):
    """DAR's hooks, sites, wrappers and settings for one ``Bagel`` model."""

    def __init__(self, model, clock: StepClock):
        super().__init__(model, clock)
        self.wrapped: list[tuple] = []  # (name, our wrapper, what the instance held before, live flag)
        self.pending = None  # reference keys noted by a cache-update wrapper, for the decoder's write hook

    def install(self, bagel) -> None:
        decoder = bagel.language_model.model
        attn = [(name, mod) for name, mod in decoder.named_modules()
                if "flash_attn_varlen_func" in getattr(getattr(type(mod), "forward_inference", None), "__code__",
                                                       type("", (), {"co_names": ()})).co_names]
        if not attn:
            raise TypeError(f"dar.enable: {type(bagel).__name__}'s language model has no attention module calling "
                            f"flash_attn_varlen_func; this BAGEL version is not supported ({LAYOUT_FN_HELP})")
        try:
            namespace = type(attn[0][1]).forward_inference.__globals__
            self.sites.append(intercept.acquire(namespace, "flash_attn_varlen_func", intercept.VARLEN))
            for index, (name, mod) in enumerate(attn):
                context.hook_layer(self, index, name, mod)
            self.hooks.append(decoder.register_forward_pre_hook(self._cache_write, with_kwargs=True))
            self.hooks.append(decoder.register_forward_pre_hook(self._forward_enter, with_kwargs=True))
            self.hooks.append(decoder.register_forward_hook(self._forward_exit, with_kwargs=True, always_call=True))
            side = getattr(bagel, "vit_max_num_patch_per_side", None)
            self._wrap(bagel, "forward_cache_update_vae", functools.partial(self._image_write, "vae", None))
            self._wrap(bagel, "forward_cache_update_vit", functools.partial(self._image_write, "vit", side))
            self._wrap(bagel, "generate_image", self._generation)
            self._wrap(bagel, "_forward_flow", self._step)
        except BaseException:
            self.remove()
            raise

    def _wrap(self, bagel, name: str, around) -> None:
        # What the instance itself held before (a wrapper the user set, or nothing: the class's
        # method), so that `remove` puts exactly that back.
        before = vars(bagel).get(name, _ABSENT)
        original = getattr(bagel, name)
        sig = inspect.signature(original)
        live = [True]

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            if not live[0]:  # removed, but still called through a wrapper set on top of it after enable
                return original(*args, **kwargs)
            return around(original, sig, *args, **kwargs)

        wrapper._dar_wrapper = True
        setattr(bagel, name, wrapper)
        self.wrapped.append((name, wrapper, before, live))

    def remove(self) -> None:
        bagel = self.model_ref()
        for name, wrapper, before, live in reversed(self.wrapped):
            live[0] = False
            # A wrapper someone set on top of ours after enable stays; ours then passes calls through.
            if bagel is not None and vars(bagel).get(name) is wrapper:
                if before is _ABSENT:
                    delattr(bagel, name)
                else:
                    setattr(bagel, name, before)
        self.wrapped.clear()
        self.pending = None
        super().remove()

    # -- wrappers ------------------------------------------------------------------------------------
    def _image_write(self, kind, side, original, sig, *args, **kwargs):
        bound = sig.bind(*args, **kwargs).arguments
        self.pending = (bound.get("past_key_values"), _image_update(kind, bound, side))
        try:
            return original(*args, **kwargs)
        finally:
            self.pending = None

    def _generation(self, original, sig, *args, **kwargs):
        self.clock.reset()
        return original(*args, **kwargs)

    def _step(self, original, sig, *args, **kwargs):
        try:
            return original(*args, **kwargs)
        finally:
            self.clock.advance()

    # -- decoder hooks -------------------------------------------------------------------------------
    def _cache_write(self, module, args, kwargs):
        """Track every cache write (context tokens) so a later denoising call knows its references."""
        kw = call_kwargs(module, args, kwargs)
        cache = kw.get("past_key_values")
        if cache is None or not kw.get("update_past_key_values", True):
            return None
        n = int(kw["query_lens"].shape[0]) if isinstance(kw.get("query_lens"), torch.Tensor) else None
        refs = getattr(cache, CACHE_ATTR, None)
        if refs is None:
            empty = getattr(cache, "seq_lens", None) == 0
            refs = tuple(() for _ in range(n)) if empty and n is not None else UNKNOWN
        if refs != UNKNOWN and n is not None and len(refs) != n:
            refs = UNKNOWN
        pending = self.pending
        if pending is not None and pending[0] is cache and refs != UNKNOWN:
            refs = tuple(old + new for old, new in zip(refs, pending[1]))
            self.pending = None
        setattr(cache, CACHE_ATTR, refs)
        return None


def _memo_host(memo: dict, key: str, t) -> list[int]:
    """Host values of an index tensor, read once per (tensor, version): BAGEL passes the same tensors
    at every denoising step, so only the first step synchronises."""
    if not isinstance(t, torch.Tensor):
        return _host_list(t)
    tag = (id(t), t._version, tuple(t.shape))
    hit = memo.get(key)
    if hit is not None and hit[0] == tag and hit[1]() is t:
        return hit[2]
    vals = _host_list(t)
    memo[key] = (tag, weakref.ref(t), vals)
    return vals


def layouts(module, kw: dict, memo: dict):
    """The `Derived` layouts of one language-model forward of BAGEL (a `NoLayout` when none applies)."""
    if kw.get("update_past_key_values", True):
        return NoLayout("a KV-cache write (context tokens, not an image-generation step)", warn=False)
    vae = kw.get("packed_vae_token_indexes")
    if kw.get("mode") != "gen" or vae is None:
        return NoLayout("a language-model forward that generates no image", warn=False)
    cache = kw.get("past_key_values")
    refs = getattr(cache, CACHE_ATTR, None) if cache is not None else ()
    if refs is None and getattr(cache, "seq_lens", 0) == 0:
        refs = ()
    if refs is None or refs == UNKNOWN:
        raise ValueError("dar.enable(Bagel): the KV cache of this image-generation step was written before DAR was "
                         "enabled, so where the reference images' keys lie is unknown; enable DAR before building "
                         f"the context (update_context_image / forward_cache_update_*), or {LAYOUT_FN_HELP}")
    q_lens = _memo_host(memo, "query_lens", kw["query_lens"])
    kv_lens = _memo_host(memo, "key_values_lens", kw["key_values_lens"]) if kw.get("key_values_lens") is not None \
        else [0] * len(q_lens)
    if refs and len(refs) != len(q_lens):
        raise ValueError(f"BAGEL layout: the cache tracks {len(refs)} sequences but the call packs {len(q_lens)}; "
                         f"{LAYOUT_FN_HELP}")
    starts, at = [], 0
    for n in q_lens:
        starts.append(at)
        at += n
    gen = _per_sequence(_memo_host(memo, "packed_vae_token_indexes", vae), starts, [s + n for s, n in zip(starts, q_lens)])
    rows = []
    for n, g in enumerate(gen):
        seq_refs = refs[n] if refs else ()
        shapes = [hw for _, hw in seq_refs]
        rows.append(TokenLayout(ref=[r for r, _ in seq_refs], gen=_runs(g),
                                image_shapes=shapes if shapes and all(s is not None for s in shapes) else None))
    if not any(lay.ref for lay in rows):
        return NoLayout(NO_REFERENCES)
    lk = [a + b for a, b in zip(kv_lens, q_lens)]
    for n, lay in enumerate(rows):
        lay.check_bounds(q_lens[n], lk[n], where=f"BAGEL layout of sequence {n}")
    return Derived((((max(q_lens), max(lk)), tuple(rows)),))


def _settings(config, backend, layout_fn, steps, recorder) -> Settings:
    config = check_options(config, backend, recorder, VARLEN_BACKENDS)
    if layout_fn is None:
        return Settings(config, backend, layouts, "bagel", None, StepFilter(steps), recorder)
    user = user_layout_fn(layout_fn)

    def derive(module, kw, memo):
        if kw.get("update_past_key_values", True):
            return NoLayout("a KV-cache write (context tokens, not an image-generation step)", warn=False)
        return user(module, kw, memo)

    return Settings(config, backend, derive, "layout_fn", None, StepFilter(steps), recorder)


def enable(target, config=None, *, layout_fn=None, layers=None, steps=None, recorder=None,
           backend: str = "auto") -> DARHandle:
    """Turn DAR on for a BAGEL model (or an object whose ``model`` is one); returns a `DARHandle`.

    Keywords as for diffusers (docs/diffusers.md): ``layers`` index the language model's attention
    modules (``handle.layer_names``), ``steps`` count ``_forward_flow`` calls since ``generate_image``
    started. ``backend`` is one of ``dar.varlen.VARLEN_BACKENDS``. Enable DAR *before* writing the
    reference images into the context: their key positions are noted as they are written.
    """
    model = _model_of(target)
    if model is None:
        raise TypeError(f"dar.bindings.bagel.enable expects BAGEL's Bagel model, got {type(target).__name__}")
    settings = _settings(config, backend, layout_fn, steps, recorder)
    with _lock:
        state = _states.get(model)
        if state is not None:
            state.configure(settings, layers)
            return state.owner
        handle = DARHandle(target, StepClock(per_forward=False), disable)
        handle.attach(BagelState(model, handle.clock), model, settings, layers, _states)
        return handle


def disable(target) -> None:
    """Remove DAR from a BAGEL model: hooks, wrappers and the interceptor (when unused) removed."""
    model = _model_of(target)
    if model is None:
        raise TypeError(f"dar.bindings.bagel.disable expects BAGEL's Bagel model, got {type(target).__name__}")
    with _lock:
        state = _states.pop(model, None)
        if state is None:
            return
        state.remove()
        if state in state.owner.states:
            state.owner.states.remove(state)


def is_enabled(target) -> bool:
    model = _model_of(target)
    return model is not None and model in _states


__all__ = ["enable", "disable", "is_enabled", "is_bagel", "layouts"]
