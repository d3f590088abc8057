"""Per-thread record of which enabled model and which attention layer are running right now.

Shared by the bindings that intercept a module-level attention function (diffusers, OmniGen2, BAGEL).

The interceptors replace a module-level name (``dispatch_attention_fn``) shared by every model of a
family, so they need to know, at call time, whether the call comes from an enabled model and from
which of its attention layers. Forward hooks push that onto two per-thread stacks:

- ``calls``: one entry per running transformer forward of an enabled model (pushed by the model's
  pre-hook, popped by its always-called post-hook). The entry says how this forward is rebalanced.
- ``layers``: one `LayerFrame` per running attention module of an enabled model.

Stacks (not single slots) keep nested or re-entrant forwards correct; thread-local storage keeps two
pipelines running in two threads apart. Everything pushed is a long-lived object (frames are made at
enable time, `Active` entries are interned per model), so torch.compile guards on them stay stable
from one step to the next.
"""

from __future__ import annotations

import dataclasses
import threading

_local = threading.local()


def calls_stack() -> list:
    stack = getattr(_local, "calls", None)
    if stack is None:
        stack = _local.calls = []
    return stack


def layers_stack() -> list:
    stack = getattr(_local, "layers", None)
    if stack is None:
        stack = _local.layers = []
    return stack


def current():
    """``(active, frame)`` for the innermost running attention layer of an enabled model, or None.

    ``active`` is the entry its model's forward pushed (an `Active`, or that model's `PASSIVE`
    marker when this forward is not rebalanced). Traced by torch.compile: plain attribute and list
    reads only.
    """
    layers = getattr(_local, "layers", None)
    calls = getattr(_local, "calls", None)
    if not layers or not calls:
        return None
    frame = layers[-1]
    active = calls[-1]
    if active.state is not frame.state:
        return None  # the innermost forward belongs to another model (a nested call)
    return active, frame


def remove_last(stack: list, item) -> None:
    """Pop ``item`` from ``stack`` (normally its top; searched if an exception skipped a pop)."""
    if stack and stack[-1] is item:
        stack.pop()
        return
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is item:
            del stack[i]
            return


@dataclasses.dataclass(eq=False)
class LayerFrame:
    """One attention module of an enabled model: its index, qualified name and whether it is selected."""

    state: object
    index: int
    name: str
    selected: bool


@dataclasses.dataclass(eq=False, frozen=True)
class Active:
    """How the running forward of ``state``'s model is rebalanced.

    calls:  ``{(Lq, Lk): layouts}`` from an automatic layout (one `TokenLayout` per batch row): an
            attention call with these query / key lengths is rebalanced with those layouts.
    passes: ``{(Lq, Lk): reason}``: calls of this forward that have nothing to rebalance (reference
            self-attention, per-mode blocks); they run unchanged without a warning.
    user:   the layouts a user's ``layout_fn`` returned (a `TokenLayout` or a tuple of them); they apply
            to every call they fit.
    reason: why this forward is not rebalanced at all (``calls`` and ``user`` are None), e.g. a step
            filtered out or no reference tokens; None for a rebalanced forward.
    """

    state: object
    calls: dict | None = None
    passes: dict = dataclasses.field(default_factory=dict)
    user: object = None
    reason: str | None = None
    gen_end: int = 0  # largest gen / ref range end over the rows (for the fit check of user layouts)
    ref_end: int = 0
    split: object = None  # under context parallelism: how the joint sequence is split (parallel.Split)

    @property
    def rebalanced(self) -> bool:
        return self.calls is not None or self.user is not None


def layer_enter(frame, module, args):
    """Forward pre-hook of an attention module: ``frame`` is running (``functools.partial(layer_enter, frame)``)."""
    layers_stack().append(frame)


def layer_exit(frame, module, args, output):
    """Always-called forward hook of an attention module: ``frame`` is done."""
    stack = layers_stack()
    if stack and stack[-1] is frame:
        stack.pop()
    else:
        remove_last(stack, frame)


def hook_layer(state, index: int, name: str, module) -> LayerFrame:
    """Make the `LayerFrame` of ``module`` and register its enter / exit hooks on ``state.hooks``."""
    import functools

    frame = LayerFrame(state, index, name, True)
    state.frames.append(frame)
    state.hooks.append(module.register_forward_pre_hook(functools.partial(layer_enter, frame)))
    state.hooks.append(module.register_forward_hook(functools.partial(layer_exit, frame), always_call=True))
    return frame
