"""Dynamic Attention Rebalancing (DAR): sharper attention to the reference images that matter.

Public API: `DARConfig`, `TokenLayout`, `dar_attention`, `compute_key_weights`; model bindings
`enable`, `disable`, `rebalanced`, `Recorder` (loaded on first use).
"""

from __future__ import annotations

from .api import compute_key_weights, dar_attention
from .backends import BACKENDS
from .config import DARConfig
from .layout import TokenLayout
from .scoring import KeyStats

__version__ = "0.1.0"

# Model bindings live in dar.bindings and import diffusers/transformers lazily.
_LAZY = {"enable": "dar.bindings", "disable": "dar.bindings", "rebalanced": "dar.bindings",
         "Recorder": "dar.bindings.recorder"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dar' has no attribute {name!r}")


__all__ = ["BACKENDS", "DARConfig", "KeyStats", "TokenLayout", "compute_key_weights", "dar_attention",
           "enable", "disable", "rebalanced", "Recorder", "__version__"]
