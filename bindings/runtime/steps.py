"""Layer and step filters, and the step counter.

Step rule: for a pipeline, the step index is the number of ``scheduler.step`` calls since the last
``scheduler.set_timesteps`` (which every diffusers pipeline calls at the start of ``__call__``), so
all transformer calls of one denoising iteration (conditional and unconditional passes of
classifier-free guidance) share one index, starting at 0. For a transformer enabled on its own, every
forward call is one step (0, 1, 2, ...), counted from `enable` or `DARHandle.reset_steps`.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Callable


def _positional_arity(fn) -> int:
    """How many positional arguments ``fn`` takes (2 means "up to two")."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return 1
    n = 0
    for p in sig.parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            return 2
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            n += 1
    return min(max(n, 1), 2)


def int_set(name: str, value, what: str) -> frozenset[int]:
    """An int or an iterable of ints as a frozenset (TypeError naming ``name`` otherwise)."""
    items = [value] if isinstance(value, numbers.Integral) else value
    try:
        items = list(items)
    except TypeError:
        raise TypeError(f"{name} must be None, an int, an iterable of ints or a callable over {what}, "
                        f"got {type(value).__name__}") from None
    for x in items:
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise TypeError(f"{name} must hold ints, got {x!r}")
    return frozenset(int(x) for x in items)


def layer_selection(layers, names: list[str]) -> list[bool]:
    """Which of the attention layers ``names`` are rebalanced.

    ``layers``: None (all), an int or iterable of ints (indices into ``names``; negative counts from
    the end), or a callable taking ``(index)`` or ``(index, name)`` and returning a bool.
    """
    n = len(names)
    if layers is None:
        return [True] * n
    if callable(layers):
        two = _positional_arity(layers) == 2
        return [bool(layers(i, name) if two else layers(i)) for i, name in enumerate(names)]
    wanted = int_set("layers", layers, "(index) or (index, name)")
    for i in wanted:
        if not -n <= i < n:
            raise ValueError(f"layers contains {i} but the model has {n} attention layers (indices 0..{n - 1})")
    wanted = {i % n for i in wanted}
    return [i in wanted for i in range(n)]


class StepFilter:
    """``steps``: None (all), an int or iterable of non-negative ints, or a callable taking
    ``(step)`` or ``(step, timestep)``; ``timestep`` is the model's ``timestep`` argument as a float
    (reading it costs one host synchronisation per transformer call, so it is read only when the
    callable takes it)."""

    def __init__(self, steps):
        self.fn: Callable | None = None
        self.indices: frozenset[int] | None = None
        self.needs_timestep = False
        if steps is None:
            return
        if callable(steps):
            self.fn = steps
            self.needs_timestep = _positional_arity(steps) == 2
            return
        self.indices = int_set("steps", steps, "(step) or (step, timestep)")
        bad = [i for i in self.indices if i < 0]
        if bad:
            raise ValueError(f"steps must be non-negative step indices, got {sorted(bad)}")

    def __call__(self, step: int, timestep: float | None) -> bool:
        if self.fn is not None:
            return bool(self.fn(step, timestep) if self.needs_timestep else self.fn(step))
        return self.indices is None or step in self.indices


class StepClock:
    """The current step index; ``per_forward`` counts transformer forwards, else scheduler steps."""

    def __init__(self, per_forward: bool):
        self.per_forward = per_forward
        self.step = 0

    def begin_forward(self) -> int:
        step = self.step
        if self.per_forward:
            self.step += 1
        return step

    def reset(self) -> None:
        self.step = 0

    def advance(self) -> None:
        if not self.per_forward:
            self.step += 1


def timestep_value(t) -> float | None:
    """The model's ``timestep`` argument as a Python float (first element), or None."""
    if t is None:
        return None
    if isinstance(t, numbers.Real):
        return float(t)
    try:
        return float(t.reshape(-1)[0])
    except (AttributeError, IndexError, TypeError, RuntimeError):
        return None
