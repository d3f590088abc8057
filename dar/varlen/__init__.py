"""Packed (varlen) DAR: `dar_attention_varlen` and `compute_key_weights_varlen` (`dar.varlen.api`).

The names load on first use: the backends import this package's packed implementations
(`dar.varlen.reference`, `dar.varlen.torch_backend`, `dar.varlen.triton`), and `dar.varlen.api`
imports the backends, so this package file imports neither (no import loop).
"""

from __future__ import annotations

import importlib

_EXPORTS = ("dar_attention_varlen", "compute_key_weights_varlen", "VARLEN_BACKENDS", "VarlenCall",
            "triton_unavailable")


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module("dar.varlen.api"), name)
        globals()[name] = value  # later lookups are plain attribute reads (and torch.compile-friendly)
        return value
    raise AttributeError(f"module 'dar.varlen' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = list(_EXPORTS)
