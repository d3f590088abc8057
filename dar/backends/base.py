"""The backend interface: what every DAR backend implements."""

from __future__ import annotations

import abc

import torch

from ..call import DARCall


class Backend(abc.ABC):
    """A way to run DAR. Backends are stateless singletons registered in `dar.backends`."""

    name: str = ""

    def unsupported(self, call: DARCall) -> str | None:
        """Why this backend cannot run ``call`` (a sentence naming the input), or None if it can."""
        return None

    @abc.abstractmethod
    def key_weights(self, call: DARCall) -> torch.Tensor:
        """(B, Lk) float32 key weights w (steps 1-6 of docs/semantics.md). Only called when the plan is active."""

    @abc.abstractmethod
    def attention(self, call: DARCall, weights: torch.Tensor | None) -> torch.Tensor:
        """(B, Hq, Lq, Dv) output in q's dtype (step 7); ``weights=None`` means plain attention."""
