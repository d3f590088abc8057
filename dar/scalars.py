"""User scalars: Python, numpy and 0-d tensor numbers coerced to Python ``int`` / ``float``; bools rejected.

`DARConfig` fields and ``scale`` go through here so that ``np.float32(0.2)`` or ``torch.tensor(0.2)``
mean the same as ``0.2``, while ``True`` (an ``int`` subclass in Python) is never taken for ``1``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch


def _unwrap(value):
    """A 0-d tensor's Python number (``.item()``; a GPU tensor costs one device sync), else ``value``."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool:
        return value.item()
    return value


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)


def as_real(name: str, value, *, finite: bool = True) -> float:
    """``value`` as a float: any real number (int, float, numpy scalar, 0-d tensor), never a bool."""
    if _is_bool(value):
        raise TypeError(f"{name} must be a real number, got a bool ({value!r})")
    value = _unwrap(value)
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    out = float(value)
    if finite and not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def as_int(name: str, value) -> int:
    """``value`` as an int: any integer (int, numpy integer, 0-d integer tensor), never a bool or float."""
    if _is_bool(value):
        raise TypeError(f"{name} must be an int, got a bool ({value!r})")
    value = _unwrap(value)
    if not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)
