"""What a binding's layout rule says about one forward: `Derived` (which attention calls are
rebalanced with which layouts), `NoLayout` (none, and why), shared by every binding."""

from __future__ import annotations

import dataclasses

from dar.layout import TokenLayout

Shape = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Derived:
    """How the attention calls of one transformer forward are rebalanced.

    calls:  ``((Lq, Lk), layouts)`` pairs: an attention call with exactly these query and key lengths
            is rebalanced with ``layouts`` (one `TokenLayout` per batch row; ``gen`` in query
            positions, ``ref`` in key positions).
    passes: ``((Lq, Lk), reason)`` pairs: calls the model makes that have no generated-image queries
            or no reference keys (reference self-attention, per-mode blocks, ...). They run unchanged
            without a warning; a recorder counts them under ``reason``.
    Any other call shape runs unchanged with a one-time warning.
    """

    calls: tuple[tuple[Shape, tuple[TokenLayout, ...]], ...]
    passes: tuple[tuple[Shape, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class NoLayout:
    """This forward is not rebalanced: ``reason`` (warned once per model when ``warn``)."""

    reason: str
    warn: bool = True


NO_REFERENCES = "no reference-image tokens in this forward"


def joint(layouts, seq_len: int, passes=()) -> Derived:
    """The common case: every rebalanced call attends over the whole joint sequence."""
    return Derived((((seq_len, seq_len), tuple(layouts)),), tuple(passes))
