"""DAR for diffusers pipelines and transformer models: `enable` / `disable`.

```python
handle = dar.enable(pipe, dar.DARConfig(gamma=0.15))   # a pipeline or a transformer model
dar.disable(pipe)                                       # the original objects and behaviour back
```

How it works (details in docs/diffusers.md): the name through which the model's attention
processors reach the attention kernel (``dispatch_attention_fn``, or ``F`` for OmniGen's direct SDPA
call) is replaced in the processor's module by an interceptor; forward hooks on the transformer
derive the per-row token layout from the forward's own arguments, and hooks on each attention module
say which layer is running. Calls from enabled models' selected layers and steps that see reference
tokens run `dar.dar_attention`; every other call goes to the original function unchanged.
"""

from __future__ import annotations

import functools
import threading
import weakref

import torch

from .handle import DARHandle, DiffusersState, make_settings
from ..runtime.steps import StepClock

__all__ = ["enable", "disable", "is_enabled", "DARHandle"]

_models: "weakref.WeakKeyDictionary[torch.nn.Module, DiffusersState]" = weakref.WeakKeyDictionary()
_pipelines: "weakref.WeakKeyDictionary[object, DARHandle]" = weakref.WeakKeyDictionary()
_lock = threading.RLock()


def _unwrap(model):
    """The module a `torch.compile(model)` wrapper (OptimizedModule) stands for; hooks go on it."""
    while isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        model = model._orig_mod
    return model


def _is_pipeline(target) -> bool:
    return isinstance(getattr(target, "components", None), dict) and not isinstance(target, torch.nn.Module)


def _transformers_of(pipe) -> list[torch.nn.Module]:
    found = [_unwrap(comp) for name, comp in pipe.components.items()
             if name.startswith("transformer") and isinstance(comp, torch.nn.Module)]
    if not found:
        raise TypeError(f"dar.enable: pipeline {type(pipe).__name__} has no transformer component "
                        f"(components: {sorted(pipe.components)})")
    return found


def enable(target, config=None, *, layout_fn=None, layers=None, steps=None, recorder=None,
           backend: str = "auto") -> DARHandle:
    """Turn DAR on for a diffusers pipeline or transformer model; returns a `DARHandle`.

    Args:
        target: a diffusers pipeline (its ``transformer*`` components are enabled and its scheduler
            drives the step counter) or a transformer model.
        config: a `dar.DARConfig` (default ``DARConfig()``).
        layout_fn: ``(module, call_kwargs) -> TokenLayout | list[TokenLayout] | None`` giving the
            token layout of a transformer forward (``call_kwargs``: its arguments by name). Required
            for models without an automatic layout; overrides the automatic one otherwise.
        layers: which attention layers are rebalanced: None (all that see reference tokens), an
            index or iterable of indices (negative from the end), or a callable ``(index)`` /
            ``(index, name)`` -> bool. Indices count the model's attention modules in
            ``named_modules()`` order (``handle.layer_names``).
        steps: which denoising steps: None (all), indices, or a callable ``(step)`` /
            ``(step, timestep)`` -> bool (counting rule in docs/diffusers.md).
        recorder: an object with ``observe(...)`` (e.g. `dar.Recorder`), called after every
            rebalanced attention call. Nothing extra is computed without one.
        backend: DAR backend for the rebalanced calls (``dar.BACKENDS``; "auto" by default).

    Enabling an already-enabled target again replaces its settings in place and returns the same
    handle (no second set of hooks).
    """
    with _lock:
        if isinstance(target, torch.nn.Module):
            target = _unwrap(target)
            settings = make_settings(target, config, backend, layout_fn, steps, recorder)
            state = _models.get(target)
            if state is None:
                handle = DARHandle(target, StepClock(per_forward=True), disable)
                _attach(handle, target, settings, layers)
                return handle
            state.configure(settings, layers)
            return state.owner
        if _is_pipeline(target):
            models = _transformers_of(target)
            all_settings = [make_settings(m, config, backend, layout_fn, steps, recorder) for m in models]
            for m in models:
                owner = getattr(_models.get(m), "owner", None)
                if owner is not None and owner.target is not target:
                    raise ValueError(f"dar.enable: {type(m).__name__} of this pipeline is already enabled through "
                                     f"another target ({type(owner.target).__name__}); dar.disable that first")
            handle = _pipelines.get(target)
            if handle is None:
                scheduler = getattr(target, "scheduler", None)
                counts_scheduler = callable(getattr(scheduler, "step", None)) and callable(
                    getattr(scheduler, "set_timesteps", None))
                handle = DARHandle(target, StepClock(per_forward=not counts_scheduler), disable)
                try:
                    for m, s in zip(models, all_settings):
                        _attach(handle, m, s, layers)
                except BaseException:
                    _detach_all(handle)
                    raise
                if counts_scheduler:
                    _patch_scheduler(handle, scheduler)
                _pipelines[target] = handle
                return handle
            for m, s in zip(models, all_settings):
                state = _models.get(m)
                if state is None:
                    _attach(handle, m, s, layers)
                else:
                    state.configure(s, layers)
            return handle
        raise TypeError(f"dar.enable expects a diffusers pipeline or transformer model, got {type(target).__name__}")


def disable(target) -> None:
    """Remove DAR from ``target``: hooks removed, intercepted names restored (when no other enabled
    model uses them), scheduler wrappers removed. A no-op for a target that is not enabled."""
    with _lock:
        if isinstance(target, torch.nn.Module):
            state = _models.pop(_unwrap(target), None)
            if state is None:
                return
            state.remove()
            handle = state.owner
            if state in handle.states:
                handle.states.remove(state)
            if not handle.states:
                _unpatch_scheduler(handle)
                pipe = handle.target
                if pipe is not None and _pipelines.get(pipe) is handle:
                    del _pipelines[pipe]
            return
        if _is_pipeline(target):
            handle = _pipelines.pop(target, None)
            if handle is not None:
                _detach_all(handle)
                _unpatch_scheduler(handle)
            for name, comp in target.components.items():
                if isinstance(comp, torch.nn.Module) and _unwrap(comp) in _models:
                    disable(comp)
            return
        raise TypeError(f"dar.disable expects a diffusers pipeline or transformer model, got {type(target).__name__}")


def is_enabled(target) -> bool:
    """True when DAR is enabled on ``target`` (a pipeline or transformer)."""
    with _lock:
        if isinstance(target, torch.nn.Module):
            return _unwrap(target) in _models
        return target in _pipelines if _is_pipeline(target) else False


def _attach(handle: DARHandle, model, settings, layers) -> None:
    handle.attach(DiffusersState(model, handle.clock), model, settings, layers, _models)


def _detach_all(handle: DARHandle) -> None:
    for state in list(handle.states):
        model = state.model_ref()
        state.remove()
        if model is not None and _models.get(model) is state:
            del _models[model]
    handle.states.clear()


def _patch_scheduler(handle: DARHandle, scheduler) -> None:
    """Count steps on the pipeline's scheduler: ``set_timesteps`` resets, ``step`` advances.

    Installed as instance attributes (removed again by `disable`), so the scheduler class and other
    scheduler instances are untouched.
    """
    clock = handle.clock
    orig_set, orig_step = scheduler.set_timesteps, scheduler.step

    # functools.wraps keeps the signatures visible: pipelines inspect set_timesteps' parameters
    # (retrieve_timesteps checks for `sigmas` / `timesteps`).
    @functools.wraps(orig_set)
    def set_timesteps(*args, **kwargs):
        clock.reset()
        return orig_set(*args, **kwargs)

    @functools.wraps(orig_step)
    def step(*args, **kwargs):
        out = orig_step(*args, **kwargs)
        clock.advance()
        return out

    for name, fn in (("set_timesteps", set_timesteps), ("step", step)):
        fn._dar_wrapper = True
        had = name in vars(scheduler)
        previous = vars(scheduler).get(name)
        setattr(scheduler, name, fn)
        handle.scheduler_patches.append((scheduler, name, fn, had, previous))


def _unpatch_scheduler(handle: DARHandle) -> None:
    for scheduler, name, fn, had, previous in reversed(handle.scheduler_patches):
        if vars(scheduler).get(name) is fn:
            if had:
                setattr(scheduler, name, previous)
            else:
                delattr(scheduler, name)
    handle.scheduler_patches.clear()
