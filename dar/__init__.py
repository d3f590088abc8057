"""Dynamic Attention Rebalancing (DAR): sharper attention to the reference images that matter.

Public API: `DARConfig`, `TokenLayout`, `dar_attention`, `compute_key_weights`, `ring_attention`, their packed
(flash-attn varlen) forms `dar_attention_varlen`, `compute_key_weights_varlen`, `AttentionKernel`
(a plain-attention kernel for ``dar_attention(..., attention_fn=)``); model bindings
`enable`, `disable`, `rebalanced`, `Recorder`.

Names load on first use, so ``import dar.eval`` (the torch-free evaluation toolkit) does not pay for
importing torch, and ``import dar`` never imports diffusers or transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "DARConfig": "dar.config",
    "TokenLayout": "dar.layout",
    "dar_attention": "dar.api",
    "compute_key_weights": "dar.api",
    "dar_attention_varlen": "dar.varlen",
    "compute_key_weights_varlen": "dar.varlen",
    "AttentionKernel": "dar.delegate",
    "ring_attention": "dar.ring",
    "BACKENDS": "dar.backends",
    "KeyStats": "dar.scoring",
    "enable": "dar.bindings",
    "disable": "dar.bindings",
    "rebalanced": "dar.bindings",
    "Recorder": "dar.bindings.recorder",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups are plain attribute reads (and torch.compile-friendly)
        return value
    raise AttributeError(f"module 'dar' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_EXPORTS})  # a name already loaded is in both


__all__ = [*_EXPORTS, "__version__"]
