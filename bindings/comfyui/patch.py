"""`apply(model, cfg)`: a clone of a ComfyUI MODEL whose reference-image attention is rebalanced.

Everything DAR adds lives in the clone's ``model_options["transformer_options"]`` (a ModelPatcher
clone deep-copies its model_options; the model object itself, its modules and every module global
are shared with the original and left alone):

- an ``apply_model`` wrapper (ComfyUI's ``WrappersMP.APPLY_MODEL``, which every ``BaseModel`` runs,
  OmniGen2 included, whose diffusion model has no wrapper point of its own) computes the forward's
  reference spans from its inputs (`models.spans`) and hands the diffusion model a copy of
  ``transformer_options`` holding a `Forward` under ``FORWARD_KEY``: the context of that forward
  (spans, step, the count of joint attention calls so far);
- ``optimized_attention_override``: ComfyUI's ``wrap_attn`` calls it as
  ``override(func, *args, **kwargs)`` for every attention call, ``func`` being the attention the
  user selected (pytorch, sage, flash, xformers, sub-quadratic on CPU). A joint-sequence call of a
  forward with references runs `dar.dar_attention` with ``attention_fn`` = ``func`` (the delegate
  path: DAR computes the key weights, ``func`` does the attention on ``K' = w * K``); every other
  call goes to ``func`` unchanged. An override some other node set before is chained: DAR's
  "attention" is then ``previous(func, ...)``, so that node still decides which kernel runs.

Closures, not bound methods, are stored: ComfyUI deep-copies model_options on every clone, and a
deep copy keeps functions as they are (a bound method would copy its object, a Recorder with it).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from dar.config import DARConfig
from dar.delegate import AttentionKernel

from ..runtime import WarnOnce
from ..runtime.steps import StepFilter, int_set
from . import models

OVERRIDE = "optimized_attention_override"
FORWARD_KEY = "dar_forward"  # the per-forward context in the transformer_options DAR hands down
WRAPPER_KEY = "dar"  # DAR's key among the apply_model wrappers
APPLY_MODEL = "apply_model"  # comfy.patcher_extension.WrappersMP.APPLY_MODEL
RECORDER_KEY = "dar_recorder"  # the Recorder of a clone patched with one (read by the DARAttentionMap node)
REF_TOKENS = "reference_image_num_tokens"  # newer ComfyUI: per-reference token counts, set by the model
_ARG_NAMES = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")


@dataclasses.dataclass
class Forward:
    """One ``apply_model`` call: its spans, its step, and how many joint attention calls it has made."""

    spans: models.Spans
    step: int | None
    timestep: float | None = None  # the current sigma, read only for a step callable that takes it
    layer: int = 0


@dataclasses.dataclass(frozen=True)
class Settings:
    config: DARConfig
    backend: str
    layers: object  # None, a frozenset of non-negative ints, or callable(index) -> bool
    steps: StepFilter  # sampling-step indices or callable(step) / (step, sigma) -> bool
    recorder: object | None


def _selected(choice, index: int) -> bool:
    if choice is None:
        return True
    if callable(choice):
        return bool(choice(index))
    return index in choice


def _layer_schedule(name: str, value):
    """None, an int, an iterable of non-negative ints, or a callable -> what `_selected` takes. (The number
    of joint attention calls is known only as the model runs, so no negative indices.)"""
    if value is None or callable(value):
        return value
    chosen = int_set(name, value, "(index)")
    if any(i < 0 for i in chosen):
        raise ValueError(f"{name} must hold non-negative indices, got {sorted(chosen)}")
    return chosen


def step_index(transformer_options: dict) -> int | None:
    """The sampling step of this forward: where ComfyUI's current ``sigmas`` sits in ``sample_sigmas``
    (the schedule the sampler runs), or None when either is missing. One host read per forward."""
    sigma, schedule = transformer_options.get("sigmas"), transformer_options.get("sample_sigmas")
    if not isinstance(sigma, torch.Tensor) or not isinstance(schedule, torch.Tensor) or schedule.numel() == 0:
        return None
    now = sigma.reshape(-1)[:1].to(schedule.device, schedule.dtype)
    return int((schedule.reshape(-1) - now).abs().argmin())


def _bind(args: tuple, kwargs: dict) -> dict | None:
    """ComfyUI's attention arguments by name (``q, k, v, heads, mask, attn_precision, skip_reshape,
    skip_output_reshape``, then the rest of kwargs)."""
    if len(args) > len(_ARG_NAMES):
        return None
    a = dict(zip(_ARG_NAMES, args))
    for name, value in kwargs.items():
        if name in a:
            return None
        a[name] = value
    if not all(n in a for n in _ARG_NAMES[:4]):
        return None
    return a


def _heads_first(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """ComfyUI's ``(B, L, H * D)`` (or, with skip_reshape, ``(B, H, L, D)``) as ``(B, H, L, D)``."""
    if skip_reshape:
        return t
    b, n, hd = t.shape
    return t.view(b, n, heads, hd // heads).transpose(1, 2)


def _comfy_kernel(attend, rest: dict, name: str) -> AttentionKernel:
    """ComfyUI's attention ``attend(q, k, v, heads, mask, skip_reshape=True, ...)`` as the SDPA-style
    kernel DAR's delegate path calls.

    ComfyUI's kernels take no scale (always ``head_dim ** -0.5``): a different scale (the widened
    head dim of the prob_scale column form) is folded into q. ``takes_bias=False`` and
    ``same_head_dims=True`` keep DAR to what every ComfyUI kernel takes (Sage takes no mask; some
    kernels assume v's head dim is q's).
    """

    def fn(q, k, v, attn_mask=None, scale=None, is_causal=False):
        if is_causal:
            raise ValueError("DAR: ComfyUI's attention kernels take no causal flag")
        b, h, lq, d = q.shape
        if k.shape[1] != h:
            k = k.repeat_interleave(h // k.shape[1], dim=1)
            v = v.repeat_interleave(h // v.shape[1], dim=1)
        if scale is not None and scale != d ** -0.5:
            q = q * (scale * d ** 0.5)
        out = attend(q, k, v, h, attn_mask, skip_reshape=True, skip_output_reshape=True, **rest)
        dv = v.shape[-1]
        if out.dim() == 3:  # a kernel that ignores skip_output_reshape returns (B, L, H * Dv)
            out = out.view(b, lq, h, dv).transpose(1, 2)
        return out

    return AttentionKernel(fn, name=name, takes_bias=False, same_head_dims=True)


def _filtered(steps: StepFilter) -> bool:
    return steps.fn is not None or steps.indices is not None


def make_override(family: models.Family, settings: Settings, previous, said: WarnOnce):
    """The ``optimized_attention_override`` DAR installs (chaining ``previous`` when set)."""
    from dar.api import dar_attention

    def override(func, *args, **kwargs):
        attend = func if previous is None else functools.partial(previous, func)
        opts = kwargs.get("transformer_options")
        fwd = opts.get(FORWARD_KEY) if isinstance(opts, dict) else None
        if not isinstance(fwd, Forward):  # a forward without references, or one DAR's wrapper did not see:
            if isinstance(opts, dict) and WRAPPER_KEY not in opts.get("wrappers", {}).get(APPLY_MODEL, {}):
                # the wrapper travels in the MODEL's model_options; a ComfyUI that replaces those wrappers with
                # the ModelPatcher's own (an older upstream version did) would leave DAR off without a word
                said("no-wrapper", f"DAR ({family.name}): DAR's apply_model wrapper is missing from this forward's "
                                   f"transformer_options['wrappers'] (this ComfyUI dropped the wrappers the MODEL's "
                                   f"model_options carry), so DAR cannot see the references: the attention runs "
                                   f"unchanged")
            return attend(*args, **kwargs)
        a = _bind(args, kwargs)
        if a is None:
            said("bind", f"DAR ({family.name}): an attention call whose arguments do not match ComfyUI's "
                              f"(q, k, v, heads, mask, ...) ran unchanged")
            return attend(*args, **kwargs)
        heads, skip = int(a["heads"]), bool(a.get("skip_reshape", False))
        q = _heads_first(a["q"], heads, skip)
        k = _heads_first(a["k"], heads, skip)
        sp = fwd.spans
        if q.shape[2] != sp.joint or k.shape[2] != sp.joint:
            if not family.refs_first:  # FLUX / Qwen-Image: every attention call is a joint one
                said(f"len-{q.shape[2]}-{k.shape[2]}",
                          f"DAR ({family.name}): an attention call over {q.shape[2]} x {k.shape[2]} tokens where the "
                          f"joint sequence has {sp.joint} (text {sp.text}, target {sp.target}, references "
                          f"{list(sp.ref_tokens)}); that call ran unchanged (another patch changed the tokens?)")
            return attend(*args, **kwargs)  # OmniGen2's refiners attend within one segment: plain
        layer = fwd.layer
        fwd.layer += 1
        counted = opts.get(REF_TOKENS)
        if counted is not None and [int(n) for n in counted] != list(sp.ref_tokens):
            said("ref-tokens", f"DAR ({family.name}): ComfyUI's {REF_TOKENS} = {list(counted)} differs from "
                                    f"the reference token counts DAR derived, {list(sp.ref_tokens)}; the forward ran "
                                    f"unchanged")
            return attend(*args, **kwargs)
        if settings.config.gamma == 0 or not _selected(settings.layers, layer):
            return attend(*args, **kwargs)
        if _filtered(settings.steps):
            if fwd.step is None:
                said("no-step", f"DAR ({family.name}): a step schedule is set but this forward's transformer_options "
                                f"hold no sigmas / sample_sigmas (not run by a ComfyUI sampler); it ran unchanged")
                return attend(*args, **kwargs)
            if not settings.steps(fwd.step, fwd.timestep):
                return attend(*args, **kwargs)
        v = _heads_first(a["v"], heads, skip)
        mask = a.get("mask")
        if isinstance(mask, torch.Tensor):  # ComfyUI's mask shapes -> broadcastable to (B, H, Lq, Lk)
            mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() == 2 else \
                mask.unsqueeze(1) if mask.dim() == 3 else mask
        rest = {n: val for n, val in a.items() if n not in _ARG_NAMES or n == "attn_precision"}
        kernel = _comfy_kernel(attend, rest, getattr(func, "__name__", "attention"))
        call = dict(attn_mask=mask, scale=q.shape[-1] ** -0.5, backend=settings.backend, attention_fn=kernel)
        if settings.recorder is None:
            out = dar_attention(q, k, v, sp.layout, settings.config, **call)
        else:
            out, w = dar_attention(q, k, v, sp.layout, settings.config, return_weights=True, **call)
            settings.recorder.observe(layer=layer, layer_name=f"joint.{layer}", step=fwd.step or 0, timestep=None,
                                      q=q, k=k, v=v, layout=sp.layout, config=settings.config, attn_mask=mask,
                                      scale=q.shape[-1] ** -0.5, weights=w, output=out)
        if a.get("skip_output_reshape", False):
            return out
        b, h, lq, dv = out.shape
        return out.transpose(1, 2).reshape(b, lq, h * dv)

    override._dar_override = True
    override._dar_previous = previous
    return override


def make_wrapper(family: models.Family, settings: Settings):
    """The ``apply_model`` wrapper: per forward, the spans and step into a copy of transformer_options."""

    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        opts = transformer_options if transformer_options is not None else {}
        sp = models.spans(family, x, c_crossattn, kwargs.get("ref_latents"))
        if sp is not None and settings.config.gamma != 0:
            opts = dict(opts)
            step = step_index(opts) if _filtered(settings.steps) or settings.recorder is not None else None
            sigma = opts.get("sigmas")
            timestep = float(sigma.reshape(-1)[0]) if settings.steps.needs_timestep and isinstance(
                sigma, torch.Tensor) else None
            opts[FORWARD_KEY] = Forward(sp, step, timestep)
        return executor(x, t, c_concat, c_crossattn, control, opts, **kwargs)

    wrapper._dar_wrapper = True
    return wrapper


class Shared:
    """Holds an object every deep copy of model_options shares (a Recorder is one per patched model)."""

    def __init__(self, value):
        self.value = value

    def __deepcopy__(self, memo):
        return self


def recorder_of(model):
    """The Recorder `apply(..., recorder=...)` attached to ``model`` (a patched clone), or None."""
    held = getattr(model, "model_options", {}).get("transformer_options", {}).get(RECORDER_KEY)
    return held.value if isinstance(held, Shared) else None


def _is_patcher(model) -> bool:
    return callable(getattr(model, "clone", None)) and isinstance(getattr(model, "model_options", None), dict) \
        and getattr(model, "model", None) is not None


def apply(model, cfg: DARConfig | None = None, *, backend: str = "auto", layers=None, steps=None, recorder=None):
    """A clone of the ComfyUI MODEL ``model`` with DAR on; ``model`` itself is left unchanged.

    cfg: a `dar.DARConfig` (default ``DARConfig()``). backend: which backend computes the key
    weights (the attention itself always runs on the kernel ComfyUI selected). layers: None (all),
    non-negative indices of the joint attention calls of a forward (FLUX: double then single
    blocks), or callable(index) -> bool. steps: None (all), sampling-step indices, or
    callable(step) or (step, sigma) -> bool (`dar.bindings.runtime.steps.StepFilter`).
    recorder: a `dar.Recorder` that sees every rebalanced call.
    Raises ValueError naming the model for a model DAR does not support.
    """
    from dar.backends import NAMES

    if not _is_patcher(model):
        raise TypeError(f"dar.bindings.comfyui.apply expects a ComfyUI MODEL (a ModelPatcher), "
                        f"got {type(model).__name__}")
    cfg = DARConfig() if cfg is None else cfg
    if not isinstance(cfg, DARConfig):
        raise TypeError(f"cfg must be a dar.DARConfig, got {type(cfg).__name__}")
    if backend not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {backend!r}")
    if recorder is not None and not callable(getattr(recorder, "observe", None)):
        raise TypeError(f"recorder must have observe(...) (a dar.Recorder), got {type(recorder).__name__}")
    family = models.family_of(model)
    settings = Settings(cfg, backend, _layer_schedule("layers", layers), StepFilter(steps), recorder)
    patched = model.clone()
    opts = patched.model_options.setdefault("transformer_options", {})
    previous = opts.get(OVERRIDE)
    if getattr(previous, "_dar_override", False):  # DAR applied twice: the new settings replace the old
        previous = previous._dar_previous
    opts[OVERRIDE] = make_override(family, settings, previous, WarnOnce())
    if recorder is not None:
        opts[RECORDER_KEY] = Shared(recorder)
    else:
        opts.pop(RECORDER_KEY, None)
    wrappers = opts.setdefault("wrappers", {}).setdefault(APPLY_MODEL, {})
    wrappers[WRAPPER_KEY] = [make_wrapper(family, settings)]
    return patched
