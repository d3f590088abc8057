"""Interception sites: the names through which attention processors reach the attention kernel.

diffusers processors call ``dispatch_attention_fn(query, key, value, ...)`` with ``(B, L, H, D)``
tensors, looked up in their own module's namespace at call time (QwenImage, FLUX.2, FLUX.1).
OmniGen's processor calls ``F.scaled_dot_product_attention`` on ``(B, H, L, D)`` tensors through
the module-level name ``F``. OmniGen2's flash processor and BAGEL's language model call
``flash_attn_varlen_func`` on packed ``(total, H, D)`` tensors, imported by name into their module
(`make_varlen_interceptor`). A *site* is such a (namespace, name) pair. Enabling a model replaces
the name by an interceptor for as long as at least one enabled model uses it; the last `release`
puts the original object back, so identity checks hold after `disable`.

The interceptor never reimplements a processor: it receives exactly the arguments the processor
passed, decides from the per-thread context (`context.current`) whether the call is rebalanced, and
otherwise forwards ``*args, **kwargs`` untouched to the original function, i.e. to whatever
attention backend the user selected in diffusers.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import types
import warnings

import torch

from dar.api import dar_attention
from dar.layout import TokenLayout
from dar.varlen import VARLEN_BACKENDS, dar_attention_varlen

from ..runtime import context
from . import dispatch, parallel

logger = logging.getLogger("dar.bindings.diffusers")

DISPATCH = "dispatch"  # diffusers dispatch_attention_fn: (B, L, H, D) tensors
SDPA = "sdpa"  # torch.nn.functional.scaled_dot_product_attention reached via a module-level `F`
VARLEN = "varlen"  # flash_attn_varlen_func imported by name: packed (total, H, D) tensors

_DISPATCH_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa",
                   "attention_kwargs", "backend", "parallel_config")
_DISPATCH_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                      "enable_gqa": False, "attention_kwargs": None, "backend": None, "parallel_config": None}
_DISPATCH_POSITIONAL = 9  # backend / parallel_config are keyword-only
_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
# flash_attn_varlen_func (flash-attn 2.x): the arguments DAR takes, then those it must see at their defaults.
_VARLEN_NAMES = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "dropout_p",
                 "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes", "deterministic",
                 "return_attn_probs", "block_table")
_VARLEN_DEFAULTS = {"dropout_p": 0.0, "softmax_scale": None, "causal": False, "window_size": (-1, -1),
                    "softcap": 0.0, "alibi_slopes": None, "deterministic": False, "return_attn_probs": False,
                    "block_table": None}


def _bind(names, positional: int, defaults: dict, args: tuple, kwargs: dict):
    """Map a call's arguments onto parameter names; None when they don't match the signature."""
    if len(args) > positional:
        return None
    bound = dict(defaults)
    for name, value in zip(names, args):
        bound[name] = value
    for name, value in kwargs.items():
        if name not in names:
            return None
        bound[name] = value
    if any(name not in bound for name in names[:3]):  # query, key, value (q, k, v)
        return None
    return bound


def passed(active, frame, reason: str, warn: str | None = None) -> None:
    """Account for an intercepted call of an enabled model that runs unchanged.

    ``warn``: a key; the model then warns once per key, naming itself and ``reason``. A recorder
    with a ``passed`` method counts the call under ``reason``. Nothing happens while tracing (a
    warning or host work there would break the graph).
    """
    if torch.compiler.is_compiling():
        return
    state = active.state
    if warn is not None:
        state.warn_once(warn, f"dar: {state.model_name}, layer {frame.name!r}: {reason}; that call runs without DAR")
    recorder = state.settings.recorder if state.settings is not None else None
    note = getattr(recorder, "passed", None)
    if note is not None:
        now = state.now
        note(layer=frame.index, layer_name=frame.name, step=now.step, reason=reason)


def _layouts_for(active, frame, lq: int, lk: int):
    """The layouts for an attention call with ``lq`` queries and ``lk`` keys, or None (accounted for)."""
    if active.user is not None:
        if active.gen_end > lq or active.ref_end > lk:
            passed(active, frame, f"the layout_fn layout does not fit an attention call with Lq={lq}, Lk={lk}",
                   warn=f"fit-{frame.index}")
            return None
        return active.user
    lays = active.calls.get((lq, lk))
    if lays is None:
        reason = active.passes.get((lq, lk))
        if reason is not None:
            passed(active, frame, reason)
        else:
            # A call the layout rule does not describe (IP-adapter keys, a processor DAR does not
            # know): it does not see the reference tokens as laid out.
            passed(active, frame, f"an attention call with Lq={lq}, Lk={lk} that the "
                                  f"{active.state.settings.family} layout does not describe",
                   warn=f"shape-{lq}-{lk}")
    return lays


def _rebalance(active, frame, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, kernel=None,
               parallel_config=None):
    """DAR attention for one intercepted call, in SDPA layout; None means "pass this call through".

    ``kernel``: the user's diffusers attention backend as a `dar.AttentionKernel` (dispatch.py), or None.
    ``parallel_config``: diffusers' ParallelConfig of a context-parallel call (parallel.py), or None.
    """
    state = active.state
    settings = state.settings
    lq, lk = q.shape[2], k.shape[2]
    context_parallel = getattr(parallel_config, "context_parallel_config", None) is not None
    if context_parallel:  # this rank's pieces of the joint sequence: look the layout up by its length
        lq = lk = _context_parallel_length(active, frame, q, k)
        if lq is None:
            return None
    layouts = _layouts_for(active, frame, lq, lk)
    if layouts is None:
        return None
    if dropout_p != 0.0:
        passed(active, frame, "attention with dropout_p > 0 (DAR has no dropout)", warn="dropout")
        return None
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        passed(active, frame, f"an attention mask of type {type(attn_mask).__name__} (DAR takes tensor masks)",
               warn=f"mask-{type(attn_mask).__name__}")
        return None
    if q.shape[1] != k.shape[1] and not enable_gqa:
        return None  # the original raises for mismatched heads without enable_gqa; let it
    if attn_mask is not None and attn_mask.dim() == 2 and attn_mask.shape[0] == q.shape[0] and \
            attn_mask.shape[1] == k.shape[2]:
        # dispatch's native backend reads a 2-D mask as a (B, Lk) key-padding mask.
        attn_mask = attn_mask[:, None, None, :]
    if context_parallel:  # DAR inside diffusers' Ulysses / ring (parallel.py)
        return parallel.rebalance(state, layouts, active.split, q, k, v, attn_mask, scale, parallel_config)
    recorder = settings.recorder
    if settings.backend != "auto":
        kernel = None  # an explicit DAR backend wins over the diffusers one
    heads = parallel.head_group(active.split)  # tensor parallelism: this rank holds a slice of the heads
    if heads is not None:
        kernel = None  # the split call runs on the DAR backend's attention
        if recorder is not None:
            raise ValueError("dar: recorder= is not supported under tensor parallelism (each rank holds a slice of "
                             "the heads a Recorder stores); record on one device")
    if recorder is None:
        return dar_attention(q, k, v, layouts, settings.config, attn_mask, scale, is_causal=bool(is_causal),
                             backend=settings.backend, attention_fn=kernel, head_group=heads)
    out, w = dar_attention(q, k, v, layouts, settings.config, attn_mask, scale,
                           is_causal=bool(is_causal), backend=settings.backend, return_weights=True,
                           attention_fn=kernel, head_group=heads)
    now = state.now
    layout = layouts if isinstance(layouts, TokenLayout) else list(layouts)
    recorder.observe(layer=frame.index, layer_name=frame.name, step=now.step, timestep=now.timestep,
                     q=q, k=k, v=v, layout=layout, config=settings.config, attn_mask=attn_mask,
                     scale=float(scale) if scale is not None else q.shape[-1] ** -0.5,
                     weights=w, output=out)
    return out


def _context_parallel_length(active, frame, q, k) -> int | None:
    """The joint sequence's length when this call holds its pieces under context parallelism, else None."""
    split = active.split
    if not isinstance(split, parallel.Split):
        raise ValueError("dar: an attention call carries a context-parallel config but its model's forward was not "
                         "seen under context parallelism (the processors were called outside the model's forward)")
    if q.shape[2] != split.local or k.shape[2] != split.local:
        passed(active, frame, f"a context-parallel attention call with local Lq={q.shape[2]}, Lk={k.shape[2]}, not "
                              f"the joint sequence's {split.local} tokens per rank", warn=f"cp-{q.shape[2]}-{k.shape[2]}")
        return None
    return split.text + split.image


def _rebalancing():
    """``(active, frame)`` of an attention call an enabled model may rebalance, else None: no enabled model
    is running, or its calls or this layer are not rebalanced (accounted for with `passed`)."""
    hit = context.current()
    if hit is None:
        return None
    active, frame = hit
    if not active.rebalanced:
        passed(active, frame, active.reason)
        return None
    if not frame.selected:
        passed(active, frame, "layer not selected")
        return None
    return hit


def _make_interceptor(original, names, positional, defaults, *, blhd: bool, unsupported=None, route=None):
    """A stand-in for an attention function that rebalances the calls of enabled models.

    Every call that is not rebalanced (no enabled model running, layer or step filtered out, no
    layout, arguments DAR does not take) goes to ``original`` unchanged. ``blhd``: the function
    takes and returns ``(B, L, H, D)`` (diffusers' dispatch) rather than SDPA's ``(B, H, L, D)``.
    ``unsupported(a, active, frame)``: True for bound arguments that must pass through (it accounts
    for the call with `passed`).
    ``route(a)``: the kernel the rebalanced attention runs on (the user's diffusers backend), or None.
    """

    def interceptor(*args, **kwargs):
        hit = _rebalancing()
        if hit is None:
            return original(*args, **kwargs)
        active, frame = hit
        a = _bind(names, positional, defaults, args, kwargs)
        if a is None:
            passed(active, frame, "arguments that do not match the attention function's signature", warn="bind")
            return original(*args, **kwargs)
        if unsupported is not None and unsupported(a, active, frame):
            return original(*args, **kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        if not (isinstance(q, torch.Tensor) and q.dim() == 4 and isinstance(k, torch.Tensor) and k.dim() == 4):
            passed(active, frame, "query / key that are not 4-D tensors", warn="rank")
            return original(*args, **kwargs)
        if blhd:  # (B, L, H, D) -> (B, H, L, D) views: no copy; DAR accepts any strides.
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = _rebalance(active, frame, q, k, v, a["attn_mask"], a["dropout_p"], a["is_causal"], a["scale"],
                         a["enable_gqa"], kernel=None if route is None else route(a),
                         parallel_config=a.get("parallel_config"))
        if out is None:
            return original(*args, **kwargs)
        return out.transpose(1, 2) if blhd else out

    interceptor._dar_original = original
    return interceptor


def _backend_kwargs(a, active, frame) -> bool:
    if not a["attention_kwargs"]:
        return False
    passed(active, frame, "attention with backend-specific attention_kwargs", warn="attention_kwargs")
    return True


def make_dispatch_interceptor(original):
    """A stand-in for ``dispatch_attention_fn`` that rebalances calls of enabled models."""
    def route(a):
        chosen = dispatch.chosen_backend(a["backend"])
        return None if chosen is None else dispatch.kernel(original, chosen)

    fn = _make_interceptor(original, _DISPATCH_NAMES, _DISPATCH_POSITIONAL, _DISPATCH_DEFAULTS, blhd=True,
                           unsupported=_backend_kwargs, route=route)
    fn.__name__ = fn.__qualname__ = "dar_dispatch_attention_fn"
    return fn


def make_sdpa_interceptor(original):
    """A stand-in for ``F.scaled_dot_product_attention`` (SDPA layout in and out)."""
    fn = _make_interceptor(original, _SDPA_NAMES, len(_SDPA_NAMES), _SDPA_DEFAULTS, blhd=False)
    fn.__name__ = fn.__qualname__ = "dar_scaled_dot_product_attention"
    return fn


def _varlen_unsupported(a) -> str | None:
    """Why a ``flash_attn_varlen_func`` call must run unchanged (an option DAR does not have), or None."""
    if a["dropout_p"] != 0.0:
        return "attention with dropout_p > 0 (DAR has no dropout)"
    if tuple(a["window_size"] or (-1, -1)) != (-1, -1):
        return "sliding-window attention (window_size)"
    if a["softcap"] not in (0, 0.0, None):
        return "attention with a softcap"
    if a["alibi_slopes"] is not None:
        return "attention with ALiBi slopes"
    if a["return_attn_probs"]:
        return "a call asking for the attention probabilities"
    if a["block_table"] is not None:
        return "paged attention (block_table)"
    for name in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k"):
        if not isinstance(a[name], torch.Tensor):
            return f"{name} that is not a tensor"
    if a["q"].dim() != 3 or a["k"].dim() != 3:
        return "q / k that are not packed (total, H, D) tensors"
    return None


def _rebalance_varlen(active, frame, a):
    """DAR for one intercepted ``flash_attn_varlen_func`` call; None means "pass this call through"."""
    state = active.state
    settings = state.settings
    why = _varlen_unsupported(a)
    if why is not None:
        passed(active, frame, why, warn=f"varlen-{why}")
        return None
    max_q, max_k = int(a["max_seqlen_q"]), int(a["max_seqlen_k"])
    layouts = _layouts_for(active, frame, max_q, max_k)
    if layouts is None:
        return None
    n = a["cu_seqlens_q"].shape[0] - 1
    if isinstance(layouts, TokenLayout):
        layouts = (layouts,) * n
    if len(layouts) != n:
        passed(active, frame, f"a packed call of {n} sequences where the layout has {len(layouts)}",
               warn=f"varlen-n-{n}")
        return None
    if settings.config.gamma == 0:
        return None  # gamma = 0 is plain attention: the original kernel, bit for bit
    if settings.backend not in VARLEN_BACKENDS:
        raise ValueError(f"dar.enable(backend={settings.backend!r}): {state.model_name} calls flash_attn_varlen_func "
                         f"and the packed path supports backend in {VARLEN_BACKENDS}")
    scale = a["softmax_scale"]
    scale = float(scale) if scale is not None else a["q"].shape[-1] ** -0.5
    args = (a["q"], a["k"], a["v"], a["cu_seqlens_q"], a["cu_seqlens_k"], max_q, max_k, layouts, settings.config,
            scale, bool(a["causal"]))
    if settings.recorder is None:
        return dar_attention_varlen(*args, backend=settings.backend)
    out, w = dar_attention_varlen(*args, backend=settings.backend, return_weights=True)
    now = state.now
    observe = getattr(settings.recorder, "observe_packed", None)
    if observe is None:
        raise TypeError(f"recorder {type(settings.recorder).__name__} has no observe_packed(...) for packed "
                        f"(flash_attn_varlen_func) calls; use a dar.Recorder")
    observe(layer=frame.index, layer_name=frame.name, step=now.step, timestep=now.timestep, q=a["q"], k=a["k"],
            cu_seqlens_q=a["cu_seqlens_q"], cu_seqlens_k=a["cu_seqlens_k"], layouts=layouts,
            config=settings.config, scale=scale, weights=w, causal=bool(a["causal"]))
    return out


def make_varlen_interceptor(original):
    """A stand-in for ``flash_attn_varlen_func`` that rebalances calls of enabled models.

    Packed ``(total, H, D)`` tensors in and out; sequence ``n`` of the call is batch row ``n`` of the
    forward's layouts. Every other call goes to ``original`` with its arguments untouched.
    """

    def interceptor(*args, **kwargs):
        hit = _rebalancing()
        if hit is None:
            return original(*args, **kwargs)
        active, frame = hit
        a = _bind(_VARLEN_NAMES, len(_VARLEN_NAMES), _VARLEN_DEFAULTS, args, kwargs)
        if a is None or any(name not in a for name in _VARLEN_NAMES[:7]):
            passed(active, frame, "arguments that do not match flash_attn_varlen_func's signature", warn="bind")
            return original(*args, **kwargs)
        out = _rebalance_varlen(active, frame, a)
        return original(*args, **kwargs) if out is None else out

    interceptor._dar_original = original
    interceptor.__name__ = interceptor.__qualname__ = "dar_flash_attn_varlen_func"
    return interceptor


def _functional_proxy(functional: types.ModuleType) -> types.ModuleType:
    """A module object like ``torch.nn.functional`` whose SDPA is intercepted.

    It holds the very same function objects, so everything else the processor's module does through
    ``F`` is unchanged (and torch.compile still recognises those functions).
    """
    proxy = types.ModuleType("dar_functional_proxy", "torch.nn.functional with DAR's SDPA interceptor")
    for name, value in vars(functional).items():
        if name not in ("__name__", "__doc__", "__spec__", "__loader__", "__package__"):
            setattr(proxy, name, value)
    proxy.scaled_dot_product_attention = make_sdpa_interceptor(functional.scaled_dot_product_attention)
    proxy._dar_original = functional
    return proxy


@dataclasses.dataclass(eq=False)
class Site:
    namespace: dict
    name: str
    kind: str
    original: object
    replacement: object
    users: int = 0

    @property
    def label(self) -> str:
        return f"{self.namespace.get('__name__', '?')}.{self.name}"

    def release(self) -> None:
        """Drop one user (`release`): how the shared runtime's `ModelState.remove` hands a site back."""
        release(self)


_sites: dict[tuple[int, str], Site] = {}
_lock = threading.RLock()


def find_site(processor) -> tuple[dict, str, str] | None:
    """``(namespace, name, kind)`` through which ``processor`` reaches attention, or None."""
    call = getattr(type(processor), "__call__", None)
    namespace = getattr(call, "__globals__", None)
    code = getattr(call, "__code__", None)
    if namespace is None or code is None:
        return None
    names = code.co_names
    has_dispatch = callable(namespace.get("dispatch_attention_fn"))
    if has_dispatch and "dispatch_attention_fn" in names:
        return namespace, "dispatch_attention_fn", DISPATCH
    if "flash_attn_varlen_func" in names and callable(namespace.get("flash_attn_varlen_func")):
        return namespace, "flash_attn_varlen_func", VARLEN
    f = namespace.get("F")
    if "scaled_dot_product_attention" in names and (
        f is torch.nn.functional or getattr(f, "_dar_original", None) is torch.nn.functional
    ):
        return namespace, "F", SDPA
    if has_dispatch:
        return namespace, "dispatch_attention_fn", DISPATCH  # reached through a helper of the same module
    return None


def acquire(namespace: dict, name: str, kind: str) -> Site:
    """Install (or share) the interceptor at ``namespace[name]``."""
    with _lock:
        key = (id(namespace), name)
        site = _sites.get(key)
        if site is None:
            # (If someone wrapped our interceptor since, it is still in the chain: share the site.)
            original = namespace[name]
            if kind == DISPATCH:
                replacement = make_dispatch_interceptor(original)
            elif kind == VARLEN:
                replacement = make_varlen_interceptor(original)
            else:
                replacement = _functional_proxy(original)
            site = Site(namespace, name, kind, original, replacement)
            namespace[name] = replacement
            _sites[key] = site
        site.users += 1
        return site


def release(site: Site) -> None:
    """Drop one user of ``site``; the last one restores the original object."""
    with _lock:
        site.users -= 1
        if site.users > 0:
            return
        if _sites.get((id(site.namespace), site.name)) is site:
            del _sites[(id(site.namespace), site.name)]
        if site.namespace.get(site.name) is site.replacement:
            site.namespace[site.name] = site.original
        else:
            warnings.warn(f"dar: {site.label} was replaced by someone else while DAR was enabled; leaving the "
                          f"current object in place", stacklevel=3)


def installed_sites() -> list[Site]:
    with _lock:
        return list(_sites.values())
