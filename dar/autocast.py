"""`outside_autocast`: DAR's public functions compute at the inputs' precision, never autocast's.

Models such as BAGEL call attention inside ``torch.autocast(dtype=torch.bfloat16)``. Autocast recasts
the float32 matmuls of the scoring (steps 3-4 of docs/semantics.md) to bfloat16, which moves ``r`` by
more than the thresholds tolerate and changes the weights, and it recasts the rebalanced attention
too. Every public entry point (dense and packed) is wrapped here, once, so no backend has to guard
its own float32 work.
"""

from __future__ import annotations

import functools

import torch


# Device types with autocast, decided once at import: torch.amp.is_autocast_available is a C builtin that dynamo
# cannot trace on torch 2.5, whereas a membership test on this frozenset folds away.
_AUTOCAST_DEVICES = frozenset(
    d for d in ("cpu", "cuda", "xpu", "mps", "hpu", "xla") if torch.amp.is_autocast_available(d))


def outside_autocast(fn):
    """``fn(q, ...)`` run with autocast off on q's device type (a no-op when autocast is off).

    The result is then what it is outside ``torch.autocast``: weights and statistics in float32
    (float64 for float64 inputs) and the output in q's dtype. A ``q`` that is not a tensor, or a
    device without autocast (``meta``), runs as is and the call's own validation reports it.
    """

    @functools.wraps(fn)
    def run(q, *args, **kwargs):
        if isinstance(q, torch.Tensor) and q.device.type in _AUTOCAST_DEVICES:
            with torch.autocast(device_type=q.device.type, enabled=False):
                return fn(q, *args, **kwargs)
        return fn(q, *args, **kwargs)

    return run
