"""`DARPlan`: a batch's layouts and config turned into the small index tensors every backend consumes.

The plan is host-side and cached per (layouts, sizes, config); its tensors are tiny (B x m sampled
query indices, B x R reference ranges, B x G generation ranges), so kernels get the token layout
without any ``Lq x Lk`` structure and without a host synchronisation.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from .config import DARConfig
from .layout import TokenLayout
from .sampling import sampled_queries


@dataclasses.dataclass(frozen=True)
class DARPlan:
    """Host description of one batch: everything DAR needs that does not depend on tensor values.

    samples[b]:    sampled query indices S of row b (sorted, possibly empty).
    ref_ranges[b]: reference key ranges of row b; ref_groups[b] their group id (0 for "joint",
                   the range index for "per_image").
    gen_ranges[b]: query ranges that are rebalanced in row b (the gen ranges, or ``(0, Lq)`` for
                   ``queries="all"``); empty when the row is plain attention.
    active:        False when no row can get a weight other than 1 (gamma == 0, or every row has an
                   empty P or R): then scoring is skipped altogether.
    """

    batch: int
    lq: int
    lk: int
    samples: tuple[tuple[int, ...], ...]
    ref_ranges: tuple[tuple[tuple[int, int], ...], ...]
    ref_groups: tuple[tuple[int, ...], ...]
    gen_ranges: tuple[tuple[tuple[int, int], ...], ...]
    num_groups: int
    active: bool

    @property
    def max_samples(self) -> int:
        return max([0] + [len(s) for s in self.samples])

    @property
    def max_refs(self) -> int:
        return max([0] + [len(r) for r in self.ref_ranges])

    @property
    def max_gen(self) -> int:
        return max([0] + [len(g) for g in self.gen_ranges])

    @property
    def rows_uniform(self) -> bool:
        """True when every batch row rebalances the same query rows."""
        return all(g == self.gen_ranges[0] for g in self.gen_ranges)

    def tensors(self, device: torch.device | str) -> "PlanTensors":
        """The plan as small int32 device tensors (cached per device in eager mode)."""
        device = torch.device(device)
        if torch.compiler.is_compiling():
            return _build_tensors(self, device)
        return _cached_tensors(self, device)


@dataclasses.dataclass(frozen=True)
class PlanTensors:
    """Padded int32 device tensors of a `DARPlan`.

    samples    (B, M):    sampled query indices, -1 where row b has fewer than M samples.
    ref_ranges (B, R, 2): half-open reference key ranges, (0, 0) padding.
    ref_groups (B, R):    group id of each range, -1 on padding.
    gen_ranges (B, G, 2): half-open rebalanced query ranges, (0, 0) padding.
    """

    samples: torch.Tensor
    ref_ranges: torch.Tensor
    ref_groups: torch.Tensor
    gen_ranges: torch.Tensor

    def key_groups(self, lk: int) -> torch.Tensor:
        """(B, Lk) int32: group id of each key, -1 for keys outside every reference range."""
        keys = torch.arange(lk, device=self.ref_ranges.device, dtype=torch.int32)
        starts = self.ref_ranges[..., 0:1]
        ends = self.ref_ranges[..., 1:2]
        inside = (keys >= starts) & (keys < ends)  # (B, R, Lk), R = number of reference images
        gid = torch.where(inside, self.ref_groups[..., None] + 1, 0).sum(dim=1, dtype=torch.int32)
        return gid - 1

    def rebalanced_rows(self, lq: int) -> torch.Tensor:
        """(B, Lq) bool: query rows that are rebalanced."""
        rows = torch.arange(lq, device=self.gen_ranges.device, dtype=torch.int32)
        inside = (rows >= self.gen_ranges[..., 0:1]) & (rows < self.gen_ranges[..., 1:2])
        return inside.any(dim=1)


def _pad(rows, width: int, fill):
    return [list(r) + [fill] * (width - len(r)) for r in rows]


def _build_tensors(plan: DARPlan, device: torch.device) -> PlanTensors:
    m, r, g = max(plan.max_samples, 1), max(plan.max_refs, 1), max(plan.max_gen, 1)
    i32 = dict(dtype=torch.int32, device=device)
    return PlanTensors(
        samples=torch.tensor(_pad(plan.samples, m, -1), **i32),
        ref_ranges=torch.tensor(_pad(plan.ref_ranges, r, (0, 0)), **i32).reshape(plan.batch, r, 2),
        ref_groups=torch.tensor(_pad(plan.ref_groups, r, -1), **i32),
        gen_ranges=torch.tensor(_pad(plan.gen_ranges, g, (0, 0)), **i32).reshape(plan.batch, g, 2),
    )


@functools.lru_cache(maxsize=256)
def _cached_tensors(plan: DARPlan, device: torch.device) -> PlanTensors:
    return _build_tensors(plan, device)


def make_plan(layouts: tuple[TokenLayout, ...], lq: int, lk: int, cfg: DARConfig) -> DARPlan:
    """Build (or fetch from cache) the plan of a batch. Pure Python on ints: torch.compile folds it."""
    # Under torch.compile the cache is bypassed explicitly: dynamo traces (and folds) the Python.
    build = _make_plan.__wrapped__ if torch.compiler.is_compiling() else _make_plan
    return build(layouts, lq, lk, cfg.num_samples, cfg.sampling, cfg.seed, cfg.normalize, cfg.queries, cfg.gamma)


@functools.lru_cache(maxsize=256)
def _make_plan(layouts, lq, lk, num_samples, sampling, seed, normalize, queries, gamma) -> DARPlan:
    samples, refs, groups, gens = [], [], [], []
    active = False
    for lay in layouts:
        s = sampled_queries(lay.gen, num_samples, sampling, seed)
        row_active = bool(s) and bool(lay.ref)
        active |= row_active
        samples.append(s)
        refs.append(lay.ref)
        groups.append(tuple(0 if normalize == "joint" else i for i in range(len(lay.ref))))
        if not row_active:
            gens.append(())  # plain attention: every weight is 1
        elif queries == "all":
            gens.append(((0, lq),))
        else:
            gens.append(lay.gen)
    # Lists, not generators with max(default=): dynamo (torch 2.13) cannot trace the latter, and this runs traced.
    num_groups = max([0] + [max(g) + 1 for g in groups if g])
    return DARPlan(
        batch=len(layouts), lq=lq, lk=lk, samples=tuple(samples), ref_ranges=tuple(refs),
        ref_groups=tuple(groups), gen_ranges=tuple(gens), num_groups=num_groups,
        active=active and gamma > 0,
    )
