"""The backend interface: what every DAR backend implements, and what it declares it can run.

A backend runs one call object, `dar.call.DARCall`, in two kinds: dense (``call.kind == "dense"``) and
packed (``"packed"``, its ``packing`` set). A sharded call (``head_group=`` / ``seq_group=``)
runs its attention as a dense call on this rank's tensors, so its kind is checked by name only.

Capabilities are declared, each refusal with its reason, so that every entry point refuses the same
calls with the same words (`Backend.refusal`, used by `dar.backends.select_backend`):

- ``cannot_run``: call kinds (``"dense"``, ``"packed"``, ``"sharded"``) it cannot run -> why;
- ``masks``: ``"any"`` (every SDPA mask) or ``"key"`` (key-padding masks / key biases of shape
  ``(B or 1, 1, 1, Lk)``, and ``is_causal``);
- ``modes``: the `DARConfig.mode` values it runs;
- ``packed``: the packed implementation (a module with ``unsupported``, ``key_weights`` and
  ``attention`` taking the call and this backend), attached by the registry; None if there is none.
"""

from __future__ import annotations

import abc

import torch

from ..call import DARCall
from ..config import MODES

CALL_KINDS = ("dense", "packed", "sharded")
# What the flex backend can never run, declared here rather than only on its class: its module does not import
# where FlexAttention lacks what it needs (torch 2.5), and the registry still refuses these kinds by name there.
FLEX_CANNOT_RUN = {
    "packed": "flex has no varlen path (packed sequences run on reference, torch, torch:<kernel> or triton)"}


class Backend(abc.ABC):
    """A way to run DAR. Backends are stateless singletons registered in `dar.backends`."""

    name: str = ""
    # A plain dict, never mutated (an instance that loses a kind gets a new one): dynamo refuses to trace a
    # mappingproxy once it has seen a dict mutate, and a backend may be loaded inside a compiled region.
    cannot_run: dict = {}
    masks: str = "any"
    modes: tuple[str, ...] = MODES
    packed = None

    def cannot_run_kind(self, kind: str) -> str | None:
        """Why this backend cannot run calls of ``kind`` (one of `CALL_KINDS`), or None if it can."""
        why = self.cannot_run.get(kind)
        if why is None and kind == "packed" and self.packed is None:
            why = f"the {self.name} backend has no packed (varlen) implementation"
        return why

    def refusal(self, call) -> str | None:
        """Why this backend cannot run ``call`` (dense or packed), from its declared capabilities first,
        then `unsupported` (device, dtype, head dims, autograd ...); None if it can."""
        why = self.cannot_run_kind(call.kind)
        if why is not None:
            return why
        if call.cfg.mode not in self.modes:
            return f"the {self.name} backend runs mode in {self.modes}, not mode={call.cfg.mode!r}"
        if call.kind == "packed":
            return self.packed.unsupported(call, self)
        return self.unsupported(call)

    def mask_refusal(self, call: DARCall) -> str | None:
        """Why the declared ``masks`` exclude the dense ``call``'s mask, or None."""
        m = call.mask.mask
        if self.masks == "key" and m is not None and not call.mask.is_key_only:
            return (f"attn_mask of shape {tuple(m.shape)} is not a key-only mask; the {self.name} backend takes "
                    "key-padding masks / key biases of shape (B or 1, 1, 1, Lk) and is_causal")
        return None

    def unsupported(self, call: DARCall) -> str | None:
        """Why this backend cannot run the dense ``call`` (a sentence naming the input), or None if it can.
        Overrides start from `mask_refusal` (the tuner asks this method, not `refusal`)."""
        return self.mask_refusal(call)

    @abc.abstractmethod
    def key_weights(self, call: DARCall) -> torch.Tensor:
        """(B, Lk) float32 key weights w (steps 1-6 of docs/semantics.md). Only called when the plan is active."""

    @abc.abstractmethod
    def attention(self, call: DARCall, weights: torch.Tensor | None) -> torch.Tensor:
        """(B, Hq, Lq, Dv) output in q's dtype (step 7); ``weights=None`` means plain attention."""

    def packed_key_weights(self, call) -> torch.Tensor:
        """(total_k,) float32 key weights of a packed call (a `DARCall` with ``packing`` set)."""
        return self.packed.key_weights(call, self)

    def packed_attention(self, call, weights: torch.Tensor | None) -> torch.Tensor:
        """(total_q, Hq, Dv) output of a packed call in q's dtype; ``weights=None`` means plain attention."""
        return self.packed.attention(call, weights, self)
