"""`TokenLayout`: where the reference-image keys and the generated-image queries sit in a sequence."""

from __future__ import annotations

import dataclasses
from typing import Sequence

Range = tuple[int, int]


def _as_ranges(name: str, ranges) -> tuple[Range, ...]:
    if ranges is None:
        return ()
    if isinstance(ranges, (str, bytes)) or not isinstance(ranges, Sequence):
        raise TypeError(f"TokenLayout.{name} must be a sequence of (start, end) pairs, got {type(ranges).__name__}")
    out = []
    for i, r in enumerate(ranges):
        if isinstance(r, (str, bytes)) or not isinstance(r, Sequence) or len(r) != 2:
            raise TypeError(f"TokenLayout.{name}[{i}] must be a (start, end) pair, got {r!r}")
        s, e = (int(x) if _is_int(x) else None for x in r)
        if s is None or e is None:
            raise TypeError(f"TokenLayout.{name}[{i}] must hold two ints, got {r!r}")
        if s < 0 or e <= s:
            raise ValueError(f"TokenLayout.{name}[{i}] = {(s, e)} must satisfy 0 <= start < end (half-open, non-empty)")
        out.append((s, e))
    return tuple(out)


def _is_int(x) -> bool:
    # Accept Python and numpy/torch integer scalars, never bools or floats.
    if isinstance(x, bool):
        return False
    try:
        return int(x) == x and not isinstance(x, float)
    except (TypeError, ValueError):
        return False


def _as_shapes(shapes) -> tuple[tuple[int, int], ...]:
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, Sequence):
        raise TypeError(f"TokenLayout.image_shapes must be a sequence of (h, w) pairs, got {type(shapes).__name__}")
    out = []
    for i, hw in enumerate(shapes):
        if isinstance(hw, (str, bytes)) or not isinstance(hw, Sequence) or len(hw) != 2:
            raise ValueError(f"TokenLayout.image_shapes[{i}] must be an (h, w) pair, got {hw!r}")
        if not all(_is_int(x) for x in hw):
            raise TypeError(f"TokenLayout.image_shapes[{i}] must hold two ints, got {hw!r}")
        out.append((int(hw[0]), int(hw[1])))
    return tuple(out)


def _check_disjoint(name: str, ranges: Sequence[Range]) -> None:
    ordered = sorted(ranges)
    for (s0, e0), (s1, e1) in zip(ordered, ordered[1:]):
        if s1 < e0:
            raise ValueError(f"TokenLayout.{name} ranges {(s0, e0)} and {(s1, e1)} overlap")


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Token positions of one batch row.

    ref:  half-open key-index ranges, one per reference image, in key order.
    gen:  half-open query-index ranges of the generated-image (noise) tokens.
    image_shapes: optional ``(h, w)`` token grid per ref range (``h * w`` must equal its length); only
                  used to reshape per-key statistics into images for inspection.
    """

    ref: tuple[Range, ...] = ()
    gen: tuple[Range, ...] = ()
    image_shapes: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        ref = _as_ranges("ref", self.ref)
        gen = _as_ranges("gen", self.gen)
        for (s0, e0), (s1, e1) in zip(ref, ref[1:]):
            if s1 < e0:
                raise ValueError(
                    f"TokenLayout.ref ranges must be in key order and must not overlap; got {(s0, e0)} then {(s1, e1)}"
                )
        _check_disjoint("gen", gen)
        object.__setattr__(self, "ref", ref)
        object.__setattr__(self, "gen", tuple(sorted(gen)))
        if self.image_shapes is not None:
            shapes = _as_shapes(self.image_shapes)
            if len(shapes) != len(ref):
                raise ValueError(
                    f"TokenLayout.image_shapes has {len(shapes)} entries but ref has {len(ref)} ranges"
                )
            for i, ((h, w), (s, e)) in enumerate(zip(shapes, ref)):
                if h <= 0 or w <= 0 or h * w != e - s:
                    raise ValueError(
                        f"TokenLayout.image_shapes[{i}] = {(h, w)} must be positive with h*w == len(ref[{i}]) = {e - s}"
                    )
            object.__setattr__(self, "image_shapes", shapes)

    @property
    def num_gen(self) -> int:
        return sum(e - s for s, e in self.gen)

    @property
    def num_ref(self) -> int:
        return sum(e - s for s, e in self.ref)

    def check_bounds(self, lq: int, lk: int, where: str = "layout") -> None:
        """Raise ValueError if a range does not fit a sequence of ``lq`` queries and ``lk`` keys."""
        for s, e in self.ref:
            if e > lk:
                raise ValueError(f"{where}.ref range {(s, e)} exceeds the number of keys Lk={lk}")
        for s, e in self.gen:
            if e > lq:
                raise ValueError(f"{where}.gen range {(s, e)} exceeds the number of queries Lq={lq}")


def resolve_layouts(layout, batch: int, lq: int, lk: int, name: str = "layout",
                    count: str | None = None) -> tuple[TokenLayout, ...]:
    """One validated `TokenLayout` per batch row from a single layout or a list of ``batch`` of them.

    Shared with the packed API, where the rows are sequences: ``name`` is the argument named in
    messages, ``count`` says where ``batch`` comes from (default: the batch size B).
    """
    if isinstance(layout, TokenLayout):
        layout.check_bounds(lq, lk, where=name)
        return (layout,) * batch
    if isinstance(layout, (list, tuple)):
        if len(layout) != batch:
            count = f"the batch size B is {batch}" if count is None else count
            raise ValueError(f"{name} is a list of {len(layout)} TokenLayouts but {count}")
        for i, lay in enumerate(layout):
            if not isinstance(lay, TokenLayout):
                raise TypeError(f"{name}[{i}] must be a dar.TokenLayout, got {type(lay).__name__}")
            lay.check_bounds(lq, lk, where=f"{name}[{i}]")
        return tuple(layout)
    raise TypeError(f"{name} must be a dar.TokenLayout or a list of them, got {type(layout).__name__}")
