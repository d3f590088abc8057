"""The engine-neutral bindings runtime: a binding's settings, its per-model state (hooks, interception
sites, the `Active` entry of each forward, warn-once) and the handle `dar.enable` returns.

Used by the diffusers binding (and OmniGen2 through it) and by BAGEL; each binding adds how it installs
itself (`ModelState.install`) and, for diffusers, how parallelism splits a forward
(`ModelState.forward_split`). `context` holds the per-thread stacks and layer hooks, `steps` the step
clock and filters, `outcomes` what a layout rule returns.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import warnings
import weakref
from typing import Callable

import torch

from dar.config import DARConfig
from dar.layout import TokenLayout

from . import context
from .outcomes import NO_REFERENCES, Derived, NoLayout
from .steps import StepClock, StepFilter, layer_selection, timestep_value

logger = logging.getLogger("dar.bindings.diffusers")  # the logger name users filter on, kept


@dataclasses.dataclass(frozen=True, eq=False)
class Settings:
    """What `enable` was asked for; replaced as a whole (never mutated) when `enable` runs again."""

    config: DARConfig
    backend: str
    layout_fn: Callable  # (model, call_kwargs, memo) -> Derived | NoLayout | UserLayouts | None
    family: str
    after: Callable | None  # (model, call_kwargs, memo, output) after every forward, selected step or not
    steps: StepFilter
    recorder: object | None


@dataclasses.dataclass(frozen=True)
class Now:
    step: int
    timestep: float | None


@functools.lru_cache(maxsize=64)
def _forward_signature(cls) -> inspect.Signature | None:
    try:
        return inspect.signature(cls.forward)
    except (TypeError, ValueError):
        return None


def call_kwargs(module, args: tuple, kwargs: dict) -> dict:
    """The transformer forward's arguments by parameter name (positional ones included)."""
    if not args:
        return dict(kwargs)
    sig = _forward_signature(type(module))
    if sig is None:
        return dict(kwargs)
    try:
        bound = sig.bind_partial(module, *args, **kwargs)
    except TypeError:
        return dict(kwargs)
    out = dict(bound.arguments)
    out.pop(next(iter(sig.parameters)), None)  # self
    for name, p in sig.parameters.items():
        if p.kind == p.VAR_KEYWORD and name in out:
            out.update(out.pop(name))
    return out


@dataclasses.dataclass(frozen=True)
class UserLayouts:
    """What a user's ``layout_fn`` returned: applies to every attention call it fits."""

    layouts: object  # a TokenLayout or a tuple of them


def _user_layout_fn(fn):
    """Adapt a user's ``layout_fn(module, call_kwargs)`` to the internal form."""

    def derive(model, kw, memo):
        got = fn(model, kw)
        if got is None:
            return NoLayout("layout_fn returned None for this forward", warn=False)
        if isinstance(got, TokenLayout):
            return UserLayouts(got)
        if isinstance(got, (list, tuple)) and got and all(isinstance(x, TokenLayout) for x in got):
            return UserLayouts(tuple(got))
        raise TypeError(f"layout_fn must return a dar.TokenLayout, a list of them (one per batch row) or None, "
                        f"got {type(got).__name__}")

    return derive


class ModelState:
    """DAR's hooks, interception sites and settings for one model: the lifecycle every binding that hooks a
    model's forward shares (diffusers, OmniGen2, BAGEL). A binding subclasses it with ``install``."""

    def __init__(self, model: torch.nn.Module, clock: StepClock):
        self.model_ref = weakref.ref(model)
        self.clock = clock
        self.settings: Settings | None = None
        self.now = Now(0, None)
        self.passive = context.Active(self, reason="step not selected")
        self.frames: list[context.LayerFrame] = []
        self.hooks: list = []
        self.sites: list = []  # interception sites (anything with release())
        self.memo: dict = {}
        self._interned: dict = {}
        self._said: set[str] = set()
        self.owner = None  # the DARHandle that enabled this model

    # -- messages ----------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return type(self.model_ref()).__name__

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            warnings.warn(message, stacklevel=3)
            logger.warning(message)

    def install(self, model) -> None:
        raise NotImplementedError  # each binding installs its own hooks and sites

    def forward_split(self, module, kw: dict):
        """How parallelism splits this forward's sequence or heads; None (the default) without it."""
        return None

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        for site in self.sites:
            site.release()
        self.sites.clear()
        self.frames.clear()
        self._interned.clear()
        self.memo.clear()

    def configure(self, settings: Settings, layers) -> None:
        selected = layer_selection(layers, [f.name for f in self.frames])
        for frame, sel in zip(self.frames, selected):
            frame.selected = sel
        self.settings = settings
        self._interned.clear()
        self.memo.clear()

    # -- per forward -------------------------------------------------------------------------------
    def intern(self, derived, split=None) -> context.Active:
        """One long-lived `Active` per distinct outcome (stable torch.compile guards across steps).

        ``derived``: a `Derived`, a `UserLayouts`, or a `NoLayout`; ``split``: how context
        parallelism splits the forward's sequence (`parallel.Split`), None without it."""
        key = (derived, split)
        hit = self._interned.get(key)
        if hit is None:
            if len(self._interned) >= 256:
                self._interned.clear()
            if isinstance(derived, UserLayouts):
                lays = derived.layouts
                rows = (lays,) if isinstance(lays, TokenLayout) else lays
                gen_end = max([0] + [e for lay in rows for _, e in lay.gen])
                ref_end = max([0] + [e for lay in rows for _, e in lay.ref])
                hit = context.Active(self, user=lays, gen_end=gen_end, ref_end=ref_end, split=split)
            elif isinstance(derived, Derived):
                hit = context.Active(self, calls=dict(derived.calls), passes=dict(derived.passes), split=split)
            else:
                hit = context.Active(self, reason=derived.reason)
            self._interned[key] = hit
        return hit

    def _not_rebalanced(self, outcome) -> NoLayout:
        """The `NoLayout` for a forward that is not rebalanced, after saying so once per reason."""
        if outcome is None:
            outcome = NoLayout(NO_REFERENCES)
        if outcome.warn:
            self.warn_once(f"forward:{outcome.reason}",
                           f"dar: {self.model_name} ({self.settings.family} layout): {outcome.reason}; this forward "
                           f"runs without DAR")
        return outcome

    # The transformer-level hooks read host values (ids, shapes, the step counter) and run once per
    # forward; kept out of torch.compile so they never break or specialise the model's graph.
    # PyTorch calls a compiled module's own hooks from eager code, so this costs no graph break.
    @torch.compiler.disable
    def _forward_enter(self, module, args, kwargs):
        s = self.settings
        step = self.clock.begin_forward()
        kw = None
        timestep = None
        if s.steps.needs_timestep or s.recorder is not None:
            kw = call_kwargs(module, args, kwargs)
            timestep = timestep_value(kw.get("timestep"))
        self.now = Now(step, timestep)
        entry = self.passive
        if s.steps(step, timestep):
            if kw is None:
                kw = call_kwargs(module, args, kwargs)
            derived = s.layout_fn(module, kw, self.memo)
            split = None
            if not isinstance(derived, (Derived, UserLayouts)):
                derived = self._not_rebalanced(derived)
            else:
                split = self.forward_split(module, kw)
            entry = self.intern(derived, split)
        context.calls_stack().append(entry)
        return None

    @torch.compiler.disable
    def _forward_exit(self, module, args, kwargs, output):
        # Runs on every forward, whether its step is selected or not: a KV cache filled at an unselected
        # step is read at selected ones.
        after = self.settings.after if self.settings is not None else None
        if after is not None:
            after(module, call_kwargs(module, args, kwargs), self.memo, output)
        stack = context.calls_stack()
        for i in range(len(stack) - 1, -1, -1):
            if stack[i].state is self:
                del stack[i]
                break
        return None


class DARHandle:
    """What `dar.enable` returns for a diffusers pipeline or transformer.

    Attributes: ``target`` (what was enabled), ``models`` (the transformers DAR runs in),
    ``config``, ``backend``, ``layer_names`` (per model, the attention modules in index order).
    ``step`` is the current step index (see docs/diffusers.md for the counting rule);
    `reset_steps` sets it back to 0. Usable as a context manager that disables on exit.
    """

    def __init__(self, target, clock: StepClock, disable: Callable[[object], None]):
        """``disable``: the owning binding's own ``disable(target)``, so the handle needs no route back
        through the dispatcher (`dar.bindings`) that imported the binding."""
        self._target_ref = weakref.ref(target)
        self._disable = disable
        self.clock = clock
        self.states: list[ModelState] = []
        self.scheduler_patches: list[tuple] = []  # (scheduler, name, wrapper, had_attr, previous)

    @property
    def target(self):
        return self._target_ref()

    @property
    def models(self) -> list[torch.nn.Module]:
        return [m for m in (s.model_ref() for s in self.states) if m is not None]

    @property
    def config(self) -> DARConfig | None:
        return self.states[0].settings.config if self.states else None

    @property
    def backend(self) -> str | None:
        return self.states[0].settings.backend if self.states else None

    @property
    def layer_names(self) -> list[list[str]]:
        return [[f.name for f in s.frames] for s in self.states]

    @property
    def enabled(self) -> bool:
        return bool(self.states)

    @property
    def step(self) -> int:
        return self.clock.step

    def reset_steps(self) -> None:
        self.clock.reset()

    def attach(self, state: ModelState, model, settings: Settings, layers, registry: dict) -> ModelState:
        """Install ``state`` on ``model`` and configure it (uninstalled again if configuring raises), then
        own it and record it as ``registry[model]``: one place for every binding (diffusers, BAGEL)."""
        state.install(model)
        try:
            state.configure(settings, layers)
        except BaseException:
            state.remove()
            raise
        state.owner = self
        self.states.append(state)
        registry[model] = state
        return state

    def disable(self) -> None:
        target = self.target
        if target is not None:
            self._disable(target)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.disable()
        return False

    def __repr__(self) -> str:
        names = [type(m).__name__ for m in self.models]
        return f"DARHandle(target={type(self.target).__name__}, models={names}, config={self.config}, enabled={self.enabled})"


def user_layout_fn(layout_fn):
    """A user's ``layout_fn`` in the internal ``(model, call_kwargs, memo)`` form, after checking it is callable."""
    if not callable(layout_fn):
        raise TypeError(f"layout_fn must be a callable (module, call_kwargs) -> TokenLayout | list | None, "
                        f"got {type(layout_fn).__name__}")
    return _user_layout_fn(layout_fn)
