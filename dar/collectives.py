"""The collectives DAR issues across ranks, and the accounting of their traffic (docs/parallel.md).

torch's functional collectives (traceable by torch.compile), each recorded by `count_traffic` so
the byte counts in the docs are checked by tests. `logsumexp_over` and `extrema_over` are the
cross-rank reductions the shared scoring code takes as arguments (`dar.scoring`) when a rank holds
a share of the keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import torch


def _size_rank(group) -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_world_size(group), dist.get_rank(group)


@dataclasses.dataclass
class Traffic:
    """The collectives one rank issued inside `count_traffic`: ``(kind, group size, payload bytes)``.

    ``payload`` is this rank's tensor (its contribution to an all-gather, the reduced tensor of an
    all-reduce). `sent` converts it to bytes put on the wire by this rank under the bandwidth-optimal
    ring algorithms: an all-gather sends ``(W - 1) * payload``, an all-reduce ``2 (W - 1) / W * payload``,
    a (pipelined) broadcast at most ``payload``.
    """

    calls: list = dataclasses.field(default_factory=list)

    @property
    def payload(self) -> int:
        return sum(p for _, _, p in self.calls)

    @property
    def sent(self) -> float:
        return sum(wire_bytes(kind, w, p) for kind, w, p in self.calls)


def wire_bytes(kind: str, world: int, payload: float) -> float:
    """Bytes one rank sends for a collective of ``payload`` bytes over ``world`` ranks (ring algorithms)."""
    if kind == "all_gather":
        return (world - 1) * payload
    if kind == "all_reduce":
        return 2 * (world - 1) / world * payload
    if kind == "all_to_all":
        return (world - 1) / world * payload
    if kind == "broadcast":  # pipelined along a chain: each rank sends the block at most once
        return payload if world > 1 else 0
    raise ValueError(f"unknown collective {kind!r}")


_recorders = threading.local()


@contextlib.contextmanager
def count_traffic():
    """Record the collectives DAR issues on this thread (eager mode): ``with count_traffic() as t: ...``."""
    stack = getattr(_recorders, "stack", None)
    if stack is None:
        stack = _recorders.stack = []
    t = Traffic()
    stack.append(t)
    try:
        yield t
    finally:
        stack.remove(t)


def _record(kind: str, group, t: torch.Tensor) -> None:
    stack = getattr(_recorders, "stack", None)
    if stack and not torch.compiler.is_compiling():
        entry = (kind, _size_rank(group)[0], t.numel() * t.element_size())
        for rec in stack:
            rec.calls.append(entry)


def all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """``(W * t.shape[0], ...)``: every rank's ``t`` stacked in rank order along dim 0."""
    import torch.distributed._functional_collectives as funcol

    _record("all_gather", group, t)
    return funcol.wait_tensor(funcol.all_gather_single(t.contiguous(), 0, group))


def all_reduce(t: torch.Tensor, op: str, group) -> torch.Tensor:
    import torch.distributed._functional_collectives as funcol

    _record("all_reduce", group, t)
    return funcol.wait_tensor(funcol.all_reduce(t.contiguous(), op, group))


def broadcast(t: torch.Tensor, src: int, group) -> torch.Tensor:
    """``t`` of the rank ``src`` of ``group`` (its rank in the group), on every rank."""
    import torch.distributed._functional_collectives as funcol

    _record("broadcast", group, t)
    return funcol.wait_tensor(funcol.broadcast(t.contiguous(), src, group))


def gather_ranks(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    """All-gather ``t`` and concatenate the ranks' pieces along ``dim`` (rank order)."""
    world = _size_rank(group)[0]
    g = all_gather(t, group).reshape(world, *t.shape)
    return torch.cat(g.unbind(0), dim=dim) if world > 1 else g[0]


def logsumexp_over(group):
    """``lse (B, H, M) -> (B, H, M)``: each row's log-sum-exp over every rank's keys of ``group``
    (one all-gather of the per-rank log-sum-exps)."""
    world = _size_rank(group)[0]

    def reduce(lse: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(all_gather(lse, group).reshape(world, *lse.shape), dim=0)

    return reduce


def extrema_over(group):
    """``(lo, hi) (B, G, 1) -> (lo, hi)``: every group's min and max over the ranks of ``group``
    (one all-reduce of ``(B, 2G)``)."""

    def reduce(lo: torch.Tensor, hi: torch.Tensor):
        ext = all_reduce(torch.cat([-lo, hi], dim=1), "max", group)
        return -ext[:, :lo.shape[1]], ext[:, lo.shape[1]:]

    return reduce


__all__ = ["Traffic", "all_gather", "all_reduce", "broadcast", "count_traffic", "extrema_over", "gather_ranks",
           "logsumexp_over", "wire_bytes"]
