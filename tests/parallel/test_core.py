"""dar_attention / compute_key_weights with the heads, the tokens or both split over gloo ranks.

Every rank builds the same full tensors from a seed, runs the single-process reference on them, then
the sharded call on its own slice, and compares: weights exactly (float64) and outputs to rounding.
Both world sizes (2 and 4 processes) run every case inside one spawn.
"""

from __future__ import annotations

import itertools
import random
import sys

import pytest
import torch
import torch.distributed as dist

import dar
from dar import DARConfig, TokenLayout
from dar import parallel, scoring
from dar.call import make_call
from tests.support.dist_harness import run_world

MODES = ("key_scale", "prob_scale")
NORMALIZE = ("joint", "per_image")
THRESHOLDS = ("minmax", "quantile")
QUERIES = ("generation", "all")
SAMPLING = ("random", "strided")


def _configs():
    # Every value of every field appears, in several combinations (a rotating cover of the product).
    combos = list(itertools.product(MODES, NORMALIZE, THRESHOLDS, QUERIES, SAMPLING))
    picked = combos[::5] + [("key_scale", "joint", "minmax", "generation", "random")]
    return [DARConfig(num_samples=5, gamma=0.3, tau_high=0.6, tau_low=0.35, mode=m, normalize=n, thresholds=t,
                      queries=qq, sampling=s, seed=3) for m, n, t, qq, s in picked]


def _layouts(rng: random.Random, batch: int, length: int):
    """Per-row layouts: text, a gen range and 1-3 reference ranges, in varying orders and sizes."""
    out = []
    for _ in range(batch):
        cuts = sorted(rng.sample(range(1, length), 4))
        spans = [(0, cuts[0]), (cuts[0], cuts[1]), (cuts[1], cuts[2]), (cuts[2], cuts[3]), (cuts[3], length)]
        gen = spans[1]
        refs = [spans[i] for i in sorted(rng.sample([2, 3, 4], rng.randint(1, 3)))]
        if rng.random() < 0.3:  # the generated image after the references
            gen, refs = spans[4], [spans[i] for i in (1, 2, 3)]
        out.append(TokenLayout(ref=refs, gen=[gen]))
    return out


def _mask(kind: str, batch: int, length: int, rng: random.Random, dtype):
    if kind == "none":
        return None
    keep = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    for b in range(batch):
        for j in rng.sample(range(length), 2):
            keep[b, ..., j] = False
    if kind == "bool":
        return keep
    bias = torch.randn(1, 1, 1, length, generator=torch.Generator().manual_seed(7), dtype=dtype) * 0.5
    return bias.masked_fill(~keep[:1], float("-inf"))  # a float key bias shared by the batch


def _groups(rank: int, world: int):
    """(head_group, seq_group, head index, heads split, seq index, seq split) per split kind."""
    world_group = dist.group.WORLD
    kinds = {"head": (world_group, None, rank, world, 0, 1), "seq": (None, world_group, 0, 1, rank, world)}
    if world == 4:
        # 2 x 2: ranks {0,1} and {2,3} share tokens (head groups); {0,2} and {1,3} share heads (seq groups).
        heads = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        seqs = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        kinds["both"] = (heads[rank // 2], seqs[rank % 2], rank % 2, 2, rank // 2, 2)
    return kinds


def _slice(n: int, i: int, parts: int) -> slice:
    return slice(i * n // parts, (i + 1) * n // parts)


def _check_case(kind, groups, q, k, v, layouts, cfg, mask, dtype):
    head_group, seq_group, hi, hn, si, sn = groups
    b, hq, length, _ = q.shape
    hk = k.shape[1]
    qs, ks, ts = _slice(hq, hi, hn), _slice(hk, hi, hn), _slice(length, si, sn)
    local_mask = None if mask is None else mask[..., ts]
    want_w = dar.compute_key_weights(q, k, layouts, cfg, mask, backend="reference")
    want_torch = dar.dar_attention(q, k, v, layouts, cfg, mask, backend="torch")
    want_ref = dar.dar_attention(q, k, v, layouts, cfg, mask, backend="reference")
    args = (q[:, qs, ts], k[:, ks, ts])
    w = dar.compute_key_weights(*args, layouts, cfg, local_mask, head_group=head_group, seq_group=seq_group)
    out, w2 = dar.dar_attention(*args, v[:, ks, ts], layouts, cfg, local_mask, return_weights=True,
                                head_group=head_group, seq_group=seq_group)
    what = f"{kind} {cfg} mask={None if mask is None else mask.dtype}"
    if dtype == torch.float64:
        assert torch.equal(w, want_w[:, ts]), what
        assert torch.equal(w2, w), what
        torch.testing.assert_close(out, want_torch[:, qs, ts], atol=1e-12, rtol=1e-12, msg=lambda m: f"{what}: {m}")
    else:  # float32: compare where the float64 r̂ is clear of the thresholds
        mask64 = mask.double() if mask is not None and mask.is_floating_point() else mask
        stats = scoring.key_statistics(make_call(q.double(), k.double(), None, layouts, cfg, mask64, None, False))
        clear = ((stats.rhat - cfg.tau_high).abs() > 1e-3) & ((stats.rhat - cfg.tau_low).abs() > 1e-3)
        clear |= stats.rhat.isnan()
        assert torch.equal(w[clear[:, ts]], want_w[:, ts][clear[:, ts]]), what
        if bool(clear.all()):
            torch.testing.assert_close(out, want_torch[:, qs, ts], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out, want_ref[:, qs, ts], atol=1e-6, rtol=1e-6, msg=lambda m: f"{what}: {m}")


def _traffic_case(groups, q, k, v, layouts, cfg, mask):
    """The collectives recorded for one call are exactly those `parallel.statistics_traffic` predicts."""
    head_group, seq_group, hi, hn, si, sn = groups
    b, hq, length, d = q.shape
    hk = k.shape[1]
    qs, ks, ts = _slice(hq, hi, hn), _slice(hk, hi, hn), _slice(length, si, sn)
    lk = ts.stop - ts.start
    with parallel.count_traffic() as t:
        dar.compute_key_weights(q[:, qs, ts], k[:, ks, ts], layouts, cfg, None if mask is None else mask[..., ts],
                                head_group=head_group, seq_group=seq_group)
    rank_slots = None
    if seq_group is not None:
        sc = parallel.make_sharded_call(q[:, qs, ts], k[:, ks, ts], None, layouts, cfg, None, None, False,
                                        head_group, seq_group)
        rank_slots = sc.sp.rank_slots
    traffic = dict(batch=b, heads_q=qs.stop - qs.start, head_dim=d, dtype_bytes=q.element_size(), lk_local=lk,
                   rank_slots=rank_slots, head_world=None if head_group is None else hn,
                   thresholds=cfg.thresholds, stat_bytes=8 if q.dtype == torch.float64 else 4)
    want = parallel.statistics_traffic(
        num_groups=make_call(q, k, None, layouts, cfg, None, None, False).plan.num_groups, **traffic)
    assert t.calls == want
    assert t.sent == sum(parallel.wire_bytes(*c) for c in want)
    with parallel.count_traffic() as t:  # the attention adds the K/V gather of the sharded call
        dar.dar_attention(q[:, qs, ts], k[:, ks, ts], v[:, ks, ts], layouts, cfg, None,
                          head_group=head_group, seq_group=seq_group)
    extra = t.calls[len(want):]
    if seq_group is None:
        assert extra == []
    else:
        kv = b * (ks.stop - ks.start) * lk * d * q.element_size()
        assert extra == [("all_gather", sn, kv), ("all_gather", sn, kv), ("all_gather", sn, b * lk * 4)]


def _errors(rank, world):
    q = torch.randn(1, 2, 4, 8)
    lay = TokenLayout(ref=[(0, 2)], gen=[(2, 4 * world)])
    with pytest.raises(TypeError, match="seq_group must be a torch.distributed ProcessGroup"):
        dar.dar_attention(q, q, q, lay, seq_group="world")
    with pytest.raises(TypeError, match="head_group must be"):
        dar.compute_key_weights(q, q, lay, head_group=[0, 1])
    with pytest.raises(ValueError, match="is_causal=True is not supported with seq_group"):
        dar.dar_attention(q, q, q, lay, is_causal=True, seq_group=dist.group.WORLD)
    with pytest.raises(ValueError, match="attn_mask must be a key-padding mask"):
        dar.dar_attention(q, q, q, lay, attn_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool),
                          seq_group=dist.group.WORLD)
    with pytest.raises(ValueError, match="exceeds the number of keys"):  # layouts are checked in global positions
        dar.compute_key_weights(q, q, TokenLayout(ref=[(0, 4 * world + 1)], gen=[(0, 2)]),
                                seq_group=dist.group.WORLD)
    with pytest.raises(ValueError, match="backend must be one of"):
        dar.compute_key_weights(q, q, lay, backend="nope", seq_group=dist.group.WORLD)


def _varlen(rank, world):
    """The packed functions with the heads split: equal to the single-process packed call."""
    gen = torch.Generator().manual_seed(5)
    hq, hk = 2 * world, world
    cu = torch.tensor([0, 7, 19, 24], dtype=torch.int32)
    q, k, v = (torch.randn(24, h, 8, generator=gen, dtype=torch.float64) for h in (hq, hk, hk))
    layouts = [TokenLayout(ref=[(4, 7)], gen=[(0, 4)]), TokenLayout(ref=[(0, 5), (9, 12)], gen=[(5, 9)]),
               TokenLayout(ref=[(3, 5)], gen=[(0, 3)])]
    qs, ks = _slice(hq, rank, world), _slice(hk, rank, world)
    for cfg, causal in ((DARConfig(num_samples=3, gamma=0.3), False),
                        (DARConfig(num_samples=3, gamma=0.3, mode="prob_scale", normalize="per_image"), True)):
        args = (cu, cu, 12, 12, layouts, cfg)
        want_w = dar.compute_key_weights_varlen(q, k, *args, causal=causal, backend="reference")
        want = dar.dar_attention_varlen(q, k, v, *args, causal=causal, backend="torch")
        w = dar.compute_key_weights_varlen(q[:, qs], k[:, ks], *args, causal=causal, head_group=dist.group.WORLD)
        out, w2 = dar.dar_attention_varlen(q[:, qs], k[:, ks], v[:, ks], *args, causal=causal, return_weights=True,
                                           head_group=dist.group.WORLD)
        assert torch.equal(w, want_w) and torch.equal(w2, want_w)
        torch.testing.assert_close(out, want[:, qs], atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="seq_group is not supported by the varlen functions"):
        dar.dar_attention_varlen(q, k, v, cu, cu, 12, 12, layouts, seq_group=dist.group.WORLD)


def _route(rank, world):
    """Issue 21: following this rank's q from `dar_attention`, a sequence-sharded call enters each module of
    its route once: no module is entered again while it is still on the stack (the sharded pipeline used to
    enter dar.parallel eight times, through the bindings and back)."""
    gen = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, 2, 8, 8, generator=gen) for _ in range(3))
    chains = []

    def follow(frame, event, arg):
        if event != "call" or not frame.f_globals.get("__name__", "").startswith("dar") \
                or not any(x is q or getattr(x, "q", None) is q for x in frame.f_locals.values()):  # q or its call
            return
        mods, f = [], frame
        while f is not None:
            name = f.f_globals.get("__name__", "")
            if name.startswith("dar") and (not mods or mods[-1] != name):
                mods.append(name)
            f = f.f_back
        chains.append(mods[::-1])

    sys.setprofile(follow)
    try:
        dar.dar_attention(q, k, v, TokenLayout(ref=[(0, 6 * world)], gen=[(6 * world, 8 * world)]),
                          DARConfig(num_samples=4), seq_group=dist.group.WORLD, backend="torch")
    finally:
        sys.setprofile(None)
    assert any("dar.parallel" in c and "dar.backends.torch" in c for c in chains), chains  # the route was followed
    for c in chains:
        assert len(c) == len(set(c)), c


def _worker(rank: int, world: int) -> None:
    torch.manual_seed(0)
    rng = random.Random(world)
    kinds = _groups(rank, world)
    ran = 0
    for i, cfg in enumerate(_configs()):
        gqa = i % 2 == 1
        hq, hk, length = 2 * world, world if gqa else 2 * world, 6 * world
        gen = torch.Generator().manual_seed(100 + i)
        q, k, v = (torch.randn(2, h, length, 8, generator=gen, dtype=torch.float64) for h in (hq, hk, hk))
        layouts = _layouts(rng, 2, length)
        mask = _mask(("none", "bool", "float")[i % 3], 2, length, rng, torch.float64)
        for kind, groups in kinds.items():
            _check_case(kind, groups, q, k, v, layouts, cfg, mask, torch.float64)
            ran += 1
    # One float32 case per split; one traffic check per split; a single layout for the whole batch.
    cfg = DARConfig(num_samples=6, gamma=0.25)
    gen = torch.Generator().manual_seed(1)
    length = 6 * world
    q, k, v = (torch.randn(2, h, length, 8, generator=gen) for h in (2 * world, world, world))
    one = TokenLayout(ref=[(length // 2, length)], gen=[(1, length // 2)])
    for kind, groups in kinds.items():
        _check_case(kind, groups, q, k, v, one, cfg, None, torch.float32)
        _traffic_case(groups, q, k, v, [one, one], cfg, None)
        _traffic_case(groups, q.double(), k.double(), v.double(), _layouts(rng, 2, length),
                      DARConfig(num_samples=4, normalize="per_image", thresholds="quantile"), None)
        ran += 1
    _varlen(rank, world)
    _errors(rank, world)
    _route(rank, world)
    assert ran == len(kinds) * (len(_configs()) + 1)


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_matches_single_process(world):
    run_world(world, _worker)


@pytest.mark.parametrize("mode", MODES)
def test_ring_attention_shards_merge_to_dar_attention(mode):
    """dar.ring_attention on 3 K/V shards, merged by log-sum-exp, is dar_attention over all keys
    (GQA, Dv != D, per-row layouts, a key-padding mask that empties a whole shard for one batch row)."""
    gen = torch.Generator().manual_seed(2)
    b, hq, hk, length, d, dv = 2, 4, 2, 18, 8, 6
    q = torch.randn(b, hq, length, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hk, length, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hk, length, dv, generator=gen, dtype=torch.float64)
    layouts = [TokenLayout(ref=[(10, 18)], gen=[(2, 10)]), TokenLayout(ref=[(0, 5), (12, 18)], gen=[(5, 12)])]
    keep = torch.ones(b, length, dtype=torch.bool)
    keep[1, 6:12] = False  # row 1 sees nothing in the middle shard
    keep[0, 3] = False
    cfg = DARConfig(num_samples=4, gamma=0.4, mode=mode)
    want, w = dar.dar_attention(q, k, v, layouts, cfg, keep[:, None, None, :], return_weights=True, backend="torch")
    bias = torch.zeros(b, length, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    rows = [lay.gen for lay in layouts]
    parts = [dar.ring_attention(q, k[:, :, s:s + 6], v[:, :, s:s + 6], w[:, s:s + 6], rows, mode=mode,
                                key_bias=bias[:, s:s + 6]) for s in (0, 6, 12)]
    assert torch.isneginf(parts[1][1][1]).all() and (parts[1][0][1] == 0).all()
    lse = torch.stack([p[1] for p in parts])  # merge: softmax over the shards' log-sum-exps
    share = torch.softmax(lse, dim=0)[..., None]
    got = sum(s * p[0] for s, p in zip(share, parts))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    plain, _ = dar.ring_attention(q, k, v, None, mode=mode)  # no weights: plain attention
    torch.testing.assert_close(plain, torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1),
                                                                                      v.repeat_interleave(2, 1)))


def test_ring_attention_checks_its_arguments():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="weights must have shape"):
        dar.ring_attention(q, q, q, torch.ones(1, 3))
    with pytest.raises(ValueError, match="mode must be one of"):
        dar.ring_attention(q, q, q, mode="nope")
    with pytest.raises(ValueError, match="rows range"):
        dar.ring_attention(q, q, q, torch.ones(1, 4), [((2, 9),)])
    # The checks every entry point shares (dar.call.check_tensors): the ring took mismatched dtypes and
    # GQA head counts that do not divide before they were shared.
    with pytest.raises(TypeError, match="k has dtype torch.float64 but q has torch.float32"):
        dar.ring_attention(q, q.double(), q)
    with pytest.raises(ValueError, match="multiple of the number of key heads"):
        dar.ring_attention(torch.randn(1, 3, 4, 8), q, q)
    with pytest.raises(ValueError, match="q must be 4-D"):
        dar.ring_attention(q[0], q, q)
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        dar.ring_attention(q, q, None)


def test_ring_attention_bf16_rounds_k_prime_once(monkeypatch):
    """bf16 ring shards (issue 22 item 6): K' = w ⊙ K is the shared helper's (w applied unrounded in float32,
    the product rounded once), and the merged output is the single-device float64 result with the same w
    within the documented bound (tests/support/tolerances.py: OUTPUT_TOL plus the K' rounding bound)."""
    from dar import delegate, ring
    from dar.backends import get_backend
    from tests.support.tolerances import UNIT_ROUNDOFF, assert_close_within, key_scale_bound

    gen = torch.Generator().manual_seed(4)
    b, hq, hk, length, d = 2, 4, 2, 18, 16
    q, k, v = (torch.randn(b, h, length, d, generator=gen).to(torch.bfloat16) for h in (hq, hk, hk))
    layouts = [TokenLayout(ref=[(10, 18)], gen=[(2, 10)]), TokenLayout(ref=[(0, 5), (12, 18)], gen=[(5, 12)])]
    cfg = DARConfig(num_samples=4, gamma=0.37)
    w = dar.compute_key_weights(q, k, layouts, cfg, backend="torch")
    assert not torch.equal(w, w.bfloat16().float())  # some weights are not bf16 numbers: rounding them would show
    seen = []

    def spy(qq, kk, vv, bias, scale):
        seen.append(kk)
        return sdpa_lse(qq, kk, vv, bias, scale)

    sdpa_lse = ring._sdpa_lse
    monkeypatch.setattr(ring, "_sdpa_lse", spy)
    rows = [lay.gen for lay in layouts]
    parts, rounded_once = [], 0
    for s in (0, 6, 12):
        seen.clear()
        parts.append(dar.ring_attention(q, k[:, :, s:s + 6], v[:, :, s:s + 6], w[:, s:s + 6], rows))
        # The rows differ per batch row, so each batch row is attended on its own (a batch of one), on K
        # (plain rows) or on K' (rebalanced rows; K' = K where this shard's weights are all 1).
        k_prime = delegate.scaled_keys(k[:, :, s:s + 6], w[:, s:s + 6])
        plain = [k[i:i + 1, :, s:s + 6] for i in range(b)]
        for t in seen:
            if not any(torch.equal(t, p) for p in plain):
                assert any(torch.equal(t, k_prime[i:i + 1]) for i in range(b)), "K' is not the shared helper's"
                rounded_once += 1
    assert rounded_once >= 2
    share = torch.softmax(torch.stack([p[1] for p in parts]).double(), dim=0)[..., None]
    got = sum(sh * p[0].double() for sh, p in zip(share, parts))
    call = make_call(q.double(), k.double(), v.double(), layouts, cfg, None, None, False)
    want = get_backend("reference").attention(call, w.double())
    bound = key_scale_bound(q, k, v, w, d ** -0.5, UNIT_ROUNDOFF[torch.bfloat16])
    assert_close_within(got, want, torch.bfloat16, bound, what="bf16 ring vs single device")
