"""DAR with the heads or the tokens of an attention call split across ranks (docs/parallel.md).

Two process groups describe the split, and they combine (Ulysses x ring):

- ``head_group``: this rank holds a contiguous slice of the query heads, with their KV heads, and
  every token (the layout after Ulysses' all-to-all, and tensor parallelism's). The mass ``r`` is a
  sum over heads, so each rank sums its own heads and one all-reduce of ``(B, Lk_local)`` float32
  completes it.
- ``seq_group``: this rank holds a shard of the tokens of q, k and v, and the layout is in global
  positions. Every rank scores every sampled query against its own keys: the sampled queries
  ``(B, Hq, m, D)`` are all-gathered, then their per-rank log-sum-exps ``(B, Hq, m)``, which give
  each rank the exact softmax normaliser of every sampled row. The mass of a key is then local; the
  min/max of each group is one all-reduce of ``(B, 2G)`` (``thresholds="quantile"`` needs every
  key's mass: one all-gather of ``(B, Lk_local)``).

Nothing here builds an ``Lq x Lk`` tensor or reads a device value on the host: the shard plan is
host arithmetic on the layout (cached), and the collectives are torch's functional collectives.
Every collective (`dar.collectives`) is recorded by `count_traffic`, so the byte counts in the docs are
checked by tests.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from . import scoring
# Traffic, count_traffic and wire_bytes stay importable from here (public names of dar.parallel).
from .collectives import (Traffic, _size_rank, all_reduce, broadcast, count_traffic, extrema_over, gather_ranks,
                          logsumexp_over, wire_bytes)
from .backends import check_backend, select_backend
from .call import DARCall, _check_tensor, make_call, planned_call, unit_weights, with_weights
from .plan import DARPlan

Range = tuple[int, int]


# -- process groups ---------------------------------------------------------------------------------

def check_group(name: str, group):
    """None, or a torch.distributed ProcessGroup (TypeError / ValueError naming ``name`` otherwise)."""
    if group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    if not dist.is_initialized():
        raise ValueError(f"{name} is given but torch.distributed is not initialised (call init_process_group first)")
    return group


def statistics_traffic(*, batch: int, heads_q: int, head_dim: int, dtype_bytes: int, lk_local: int,
                       rank_slots: tuple[int, ...] | None, num_groups: int, head_world: int | None,
                       thresholds: str = "minmax", stat_bytes: int = 4) -> list[tuple[str, int, int]]:
    """The collectives of one sharded key-weight computation (the same on every rank), in issue order:
    ``(kind, group size, payload bytes)``.

    ``heads_q``: this rank's query heads; ``rank_slots``: the sampled rows each rank of the sequence
    group contributes (`ShardPlan.rank_slots`), None without a sequence group; ``head_world``: the
    head group's size, None without one; ``stat_bytes``: 4 (8 for float64 inputs), the log-sum-exps'
    element size.
    """
    seq_world = None if rank_slots is None else len(rank_slots)
    calls = []
    if seq_world is not None:
        calls += [("broadcast", seq_world, batch * heads_q * n * head_dim * dtype_bytes)  # sampled queries
                  for n in rank_slots if n > 0]
        calls.append(("all_gather", seq_world, batch * heads_q * sum(rank_slots) * stat_bytes))  # their lse
    if head_world is not None:
        calls.append(("all_reduce", head_world, batch * lk_local * 4))  # r, summed over heads
    if seq_world is not None:
        if thresholds == "quantile":
            calls.append(("all_gather", seq_world, batch * lk_local * 4))  # every key's r
        else:
            calls.append(("all_reduce", seq_world, batch * 2 * max(num_groups, 1) * 4))  # min and max per group
    return calls


# -- where the tokens are ---------------------------------------------------------------------------

def _seg_len(segs) -> int:
    return sum(e - s for s, e in segs)


@dataclasses.dataclass(frozen=True)
class SeqShards:
    """Where each rank's local tokens sit in the logical (global) sequence of an attention call.

    ``q[r]`` / ``k[r]``: the logical ``[start, end)`` segments rank ``r``'s local queries / keys hold,
    in local order. Every rank holds as many queries (and keys) as every other. The public API uses
    one contiguous segment per rank (`contiguous`); bindings describe other splits (diffusers splits
    the text and the image streams separately, so a rank holds one piece of each).
    """

    q: tuple[tuple[Range, ...], ...]
    k: tuple[tuple[Range, ...], ...]

    def __post_init__(self):
        for name, segs in (("q", self.q), ("k", self.k)):
            if len({_seg_len(s) for s in segs}) != 1:
                raise ValueError(f"SeqShards.{name}: every rank must hold the same number of tokens, got "
                                 f"{[_seg_len(s) for s in segs]}")

    @classmethod
    def contiguous(cls, world: int, lq_local: int, lk_local: int) -> "SeqShards":
        return cls(tuple(((r * lq_local, (r + 1) * lq_local),) for r in range(world)),
                   tuple(((r * lk_local, (r + 1) * lk_local),) for r in range(world)))

    @property
    def world(self) -> int:
        return len(self.q)

    @property
    def lq(self) -> int:
        return sum(_seg_len(s) for s in self.q)

    @property
    def lk(self) -> int:
        return sum(_seg_len(s) for s in self.k)


def _pieces(ranges, segs) -> list[tuple[int, int, int]]:
    """``(local_start, local_end, i)`` for each overlap of ``ranges[i]`` with the segments ``segs``."""
    out, off = [], 0
    for s0, e0 in segs:
        for i, (s, e) in enumerate(ranges):
            a, b = max(s, s0), min(e, e0)
            if a < b:
                out.append((off + a - s0, off + b - s0, i))
        off += e0 - s0
    return sorted(out)


def _merged(pieces) -> tuple[Range, ...]:
    out: list[list[int]] = []
    for s, e, _ in pieces:
        if out and out[-1][1] == s:
            out[-1][1] = e
        else:
            out.append([s, e])
    return tuple((s, e) for s, e in out)


def _local_index(pos: int, segs) -> int | None:
    off = 0
    for s, e in segs:
        if s <= pos < e:
            return off + pos - s
        off += e - s
    return None


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """The plan of one rank of a sequence group, in local coordinates.

    keys:     this rank's queries and keys: rebalanced rows, reference key pieces (with their global
              group ids) and this rank's own sampled rows.
    gathered: this rank's queries against every rank's keys in rank order (after a K/V all-gather).
    samples:  per rank, per batch row, the local indices of the sampled rows it holds.
    """

    keys: DARPlan
    gathered: DARPlan
    samples: tuple[tuple[tuple[int, ...], ...], ...]
    rank: int
    global_gen: tuple  # the global plan's rebalanced row ranges, per batch row

    @property
    def rank_slots(self) -> tuple[int, ...]:
        """Sampled rows each rank contributes to the exchange: the most it holds in any batch row."""
        return tuple(max([0] + [len(s) for s in per]) for per in self.samples)


@functools.lru_cache(maxsize=256)
def shard_plan(plan: DARPlan, shards: SeqShards, rank: int) -> ShardPlan:
    """Map a global `DARPlan` onto rank ``rank`` of ``shards``. Host arithmetic on ints; cached."""
    if plan.lq != shards.lq or plan.lk != shards.lk:
        raise ValueError(f"the shards hold Lq={shards.lq}, Lk={shards.lk} tokens but the layout was planned for "
                         f"Lq={plan.lq}, Lk={plan.lk}")
    lq_loc, lk_loc = _seg_len(shards.q[rank]), _seg_len(shards.k[rank])
    samples = tuple(
        tuple(tuple(i for i in (_local_index(p, shards.q[r]) for p in row) if i is not None) for row in plan.samples)
        for r in range(shards.world))
    gens = tuple(_merged(_pieces(g, shards.q[rank])) for g in plan.gen_ranges)

    def refs(r: int, offset: int):
        ranges, groups = [], []
        for rr, gg in zip(plan.ref_ranges, plan.ref_groups):
            p = _pieces(rr, shards.k[r])
            ranges.append(tuple((s + offset, e + offset) for s, e, _ in p))
            groups.append(tuple(gg[i] for _, _, i in p))
        return ranges, groups

    own_r, own_g = refs(rank, 0)
    all_r, all_g = [[] for _ in plan.ref_ranges], [[] for _ in plan.ref_ranges]
    for r in range(shards.world):
        rr, gg = refs(r, r * lk_loc)
        for b in range(plan.batch):
            all_r[b].extend(rr[b])
            all_g[b].extend(gg[b])
    common = dict(batch=plan.batch, gen_ranges=gens, num_groups=plan.num_groups, active=plan.active)
    keys = DARPlan(lq=lq_loc, lk=lk_loc, samples=samples[rank], ref_ranges=tuple(own_r), ref_groups=tuple(own_g),
                   **common)
    gathered = DARPlan(lq=lq_loc, lk=shards.lk, samples=samples[rank], ref_ranges=tuple(map(tuple, all_r)),
                       ref_groups=tuple(map(tuple, all_g)), **common)
    return ShardPlan(keys, gathered, samples, rank, plan.gen_ranges)


@functools.lru_cache(maxsize=256)
def _slot_tensors(sp: ShardPlan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(own rows (B, S_rank) long, padded with 0; valid (B, sum S_r) bool of the exchanged rows, rank-major)."""
    slots = sp.rank_slots
    own = [list(row) + [0] * (slots[sp.rank] - len(row)) for row in sp.samples[sp.rank]]
    valid = [[j < len(per[b]) for per, s in zip(sp.samples, slots) for j in range(s)] for b in range(len(own))]
    return (torch.tensor(own, dtype=torch.long, device=device).reshape(len(own), slots[sp.rank]),
            torch.tensor(valid, dtype=torch.bool, device=device).reshape(len(own), sum(slots)))


@functools.lru_cache(maxsize=256)
def _idle_rows(sp: ShardPlan, device: torch.device) -> torch.Tensor | None:
    """(B,) bool: batch rows active globally with no rebalanced row on this rank; None if there are none."""
    idle = [not g and bool(full) for g, full in zip(sp.keys.gen_ranges, sp.global_gen)]
    return torch.tensor(idle, device=device) if any(idle) else None


def plain_where_idle(w: torch.Tensor, sp: ShardPlan) -> torch.Tensor:
    """``w`` with weight 1 on the batch rows none of whose rebalanced rows sit on this rank: backends
    read an empty row range as "every weight is 1", so make that true."""
    idle = _idle_rows(sp, w.device)
    return w if idle is None else torch.where(idle[:, None], torch.ones_like(w), w)


# -- statistics -------------------------------------------------------------------------------------

def _gathered_mass(q, k, key_bias, scale, sp: ShardPlan, seq_group, head_group) -> torch.Tensor:
    """(B, Lk_local) float32 mass of this rank's keys under every rank's sampled queries."""
    b, hq, _, d = q.shape
    rows, valid = _slot_tensors(sp, q.device)
    if torch.compiler.is_compiling():
        rows, valid = rows.clone(), valid.clone()  # cached constants: keep them out of the graph's inputs
    qs = q.gather(2, rows[:, None, :, None].expand(b, hq, rows.shape[1], d))  # (B, Hq, S_rank, D): own samples
    reduce_lse = None
    if seq_group is not None:
        # Each rank that holds sampled rows broadcasts them (the sizes are host arithmetic on the
        # plan, the same on every rank): (B, Hq, sum S_r, D), rank-major. A pipelined broadcast has
        # every rank send each block about once, however unevenly the generated tokens are spread.
        me = _size_rank(seq_group)[1]
        qs = torch.cat([broadcast(qs if c == me else qs.new_empty(b, hq, s, d), c, seq_group)
                        for c, s in enumerate(sp.rank_slots) if s > 0], dim=2)
        reduce_lse = logsumexp_over(seq_group)  # each sampled row's log-sum-exp over every rank's keys

    bias = None if key_bias is None else key_bias[:, None, None, :]
    mass = scoring.mass_of_rows(qs, k, bias, valid, scale, reduce_lse)
    if head_group is not None:
        mass = all_reduce(mass, "sum", head_group)
    return mass


def _sharded_weights(mass, sp: ShardPlan, allowed, cfg, seq_group) -> torch.Tensor:
    """Steps 5-6 with groups that span the sequence group: (B, Lk_local) float32 weights."""
    b, lk = mass.shape
    groups = sp.keys.tensors(mass.device).key_groups(lk)
    if seq_group is None:
        return scoring.weights_from_mass(mass, groups, allowed, sp.keys.num_groups, cfg)[0]
    if cfg.thresholds == "quantile":
        # The thresholds are quantiles of the whole group: gather every key's mass (-inf = not allowed).
        if allowed is None:
            allowed = torch.ones(b, lk, dtype=torch.bool, device=mass.device)
        world, rank = _size_rank(seq_group)
        enc = gather_ranks(torch.where(allowed, mass, torch.full_like(mass, float("-inf"))), seq_group, dim=1)
        ok = enc != float("-inf")
        all_groups = sp.gathered.tensors(mass.device).key_groups(world * lk)
        w, _ = scoring.weights_from_mass(torch.where(ok, enc, torch.zeros_like(enc)), all_groups, ok,
                                         sp.keys.num_groups, cfg)
        return w[:, rank * lk:(rank + 1) * lk]
    return scoring.weights_from_mass(mass, groups, allowed, sp.keys.num_groups, cfg, extrema_over(seq_group))[0]


# -- the public entry points (reached through dar.dar_attention / dar.compute_key_weights) -------------

@dataclasses.dataclass(frozen=True)
class ShardedCall:
    call: DARCall  # this rank's tensors; its plan is the global one
    seq_group: object
    head_group: object
    shards: SeqShards | None
    sp: ShardPlan | None  # None without a sequence group


def make_sharded_call(q, k, v, layout, cfg, attn_mask, scale, is_causal, head_group, seq_group,
                      shards: SeqShards | None = None) -> ShardedCall:
    """Validate a sharded call. ``shards`` (bindings only) overrides the contiguous split of ``seq_group``."""
    head_group = check_group("head_group", head_group)
    seq_group = check_group("seq_group", seq_group)
    if seq_group is None and shards is None:
        return ShardedCall(make_call(q, k, v, layout, cfg, attn_mask, scale, is_causal), None, head_group, None, None)
    # (A binding may pass shards without a sequence group: one rank holding the tokens in another order.)
    world, rank = _size_rank(seq_group) if seq_group is not None else (1, 0)
    _check_tensor("q", q)
    _check_tensor("k", k)
    if shards is None:
        shards = SeqShards.contiguous(world, q.shape[2], k.shape[2])
    elif shards.world != world or _seg_len(shards.q[rank]) != q.shape[2] or _seg_len(shards.k[rank]) != k.shape[2]:
        raise ValueError(f"the shards ({shards.world} ranks of {_seg_len(shards.q[0])} queries, "
                         f"{_seg_len(shards.k[0])} keys) do not match seq_group ({world} ranks) and q, k "
                         f"({q.shape[2]} queries, {k.shape[2]} keys)")
    call = make_call(q, k, v, layout, cfg, attn_mask, scale, is_causal, lengths=(shards.lq, shards.lk))
    if call.mask.is_causal:
        raise ValueError("is_causal=True is not supported with seq_group (the causal rule needs positions across "
                         "ranks); DAR's sharded path serves bidirectional attention")
    if call.mask.mask is not None and not call.mask.is_key_only:
        raise ValueError(f"with seq_group, attn_mask must be a key-padding mask or key bias of this rank's keys, "
                         f"shape (B or 1, 1, 1, Lk_local); got {tuple(call.mask.mask.shape)}")
    return ShardedCall(call, seq_group, head_group, shards, shard_plan(call.plan, shards, rank))


def sharded_key_weights(sc: ShardedCall) -> torch.Tensor:
    """(B, Lk_local) float32 weights of this rank's keys, equal to the single-process weights there."""
    call = sc.call
    with torch.no_grad():
        if sc.sp is None:
            mass = scoring.sampled_attention_mass(call)
            if sc.head_group is not None:
                mass = all_reduce(mass, "sum", sc.head_group)
            pt = call.plan.tensors(call.q.device)
            w, _ = scoring.weights_from_mass(mass, pt.key_groups(call.plan.lk), call.mask.key_allowed(),
                                             call.plan.num_groups, call.cfg)
            return w
        mass = _gathered_mass(call.q, call.k, call.mask.key_bias(), call.scale, sc.sp, sc.seq_group, sc.head_group)
        return _sharded_weights(mass, sc.sp, call.mask.key_allowed(), call.cfg, sc.seq_group)


def gathered_call(sc: ShardedCall, w: torch.Tensor | None) -> tuple[DARCall, torch.Tensor | None]:
    """This rank's queries against every rank's keys, values, weights and key mask (all-gathered)."""
    call, group = sc.call, sc.seq_group
    gather = (lambda t, dim: t) if group is None else (lambda t, dim: gather_ranks(t, group, dim))
    k = gather(call.k, 2)
    v = gather(call.v, 2)
    mask = None
    if call.mask.mask is not None:
        km = call.mask.mask[:, 0, 0, :].expand(call.q.shape[0], call.k.shape[2])
        mask = gather(km, 1)[:, None, None, :]
    if w is not None:
        w = gather(w, 1)
        w = plain_where_idle(w, sc.sp)
    return planned_call(call.q, k, v, call.cfg, call.scale, sc.sp.gathered, mask, layouts=call.layouts), w


# -- for bindings that run their own exchange (diffusers' Ulysses / ring templates) -------------------

def rank_key_weights(q, k, layouts, cfg, key_bias, scale, head_group, seq_group,
                     shards: SeqShards | None = None) -> tuple[ShardPlan, torch.Tensor | None]:
    """The key weights of one sharded attention call, for a binding that moves K/V itself.

    ``q``, ``k``: this rank's ``(B, H, L, D)`` pieces; ``key_bias``: ``(B, Lk_local)`` additive bias of
    this rank's keys or None; ``shards``: where each rank's tokens sit (default: contiguous).
    Returns this rank's `ShardPlan` and the weights of every rank's keys, ``(B, Lk)`` float32 in rank
    order (all-gathered over ``seq_group``), or None when nothing is rebalanced.
    """
    mask = None if key_bias is None else key_bias[:, None, None, :]
    sc = make_sharded_call(q, k, None, layouts, cfg, mask, scale, False, head_group, seq_group, shards=shards)
    if not sc.call.plan.active:
        return sc.sp, None
    w = sharded_key_weights(sc)
    return sc.sp, (w if seq_group is None else gather_ranks(w, seq_group, dim=1))


def rank_attention(q, k, v, w, sp: ShardPlan, cfg, key_bias, scale: float, backend: str) -> torch.Tensor:
    """DAR attention of this rank's queries against keys it holds in full (Ulysses after its
    all-to-all), on ``backend``: ``w`` and ``key_bias`` ``(B, Lk)`` as `rank_key_weights` returns them."""
    w = None if w is None else plain_where_idle(w, sp)
    mask = None if key_bias is None else key_bias[:, None, None, :]
    call = planned_call(q, k, v, cfg, scale, sp.keys, mask)
    return select_backend(backend, call).attention(call, w)


def key_weights(q, k, layout, cfg, attn_mask, scale, is_causal, backend, head_group, seq_group) -> torch.Tensor:
    """`dar.compute_key_weights` with groups. The statistics are always the torch implementation; the
    backend name is validated like every entry point's."""
    check_backend(backend, "sharded")
    sc = make_sharded_call(q, k, None, layout, cfg, attn_mask, scale, is_causal, head_group, seq_group)
    if not sc.call.plan.active:
        return unit_weights(k.shape[0], k.shape[2], device=q.device)
    return sharded_key_weights(sc)


def attention(q, k, v, layout, cfg, attn_mask, scale, is_causal, backend, return_weights, head_group, seq_group):
    check_backend(backend, "sharded")
    sc = make_sharded_call(q, k, v, layout, cfg, attn_mask, scale, is_causal, head_group, seq_group)
    w = sharded_key_weights(sc) if sc.call.plan.active else None
    if sc.sp is None:
        out = select_backend(backend, sc.call).attention(sc.call, w)
    else:
        attend, w_all = gathered_call(sc, w)
        out = select_backend(backend, attend).attention(attend, w_all)
    return with_weights(out, w, return_weights, (k.shape[0], k.shape[2]))


__all__ = ["SeqShards", "ShardPlan", "Traffic", "count_traffic", "wire_bytes", "shard_plan", "check_group",
           "gather_ranks", "rank_attention", "rank_key_weights", "statistics_traffic"]
