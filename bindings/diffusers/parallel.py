"""DAR inside diffusers' context parallelism (Ulysses, ring, both): docs/parallel.md.

Under ``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=U, ring_degree=R))``
the supported families' CP plans split the text stream and the image stream of every forward into
``W = R * U`` equal pieces, so CP rank ``f`` (its rank in the flattened ``(ring, ulysses)`` mesh) holds
``[text piece f, image piece f]``. A processor then calls ``dispatch_attention_fn(..., parallel_config=...)``
on those pieces, and diffusers runs its Ulysses all-to-all and/or its ring loop around a backend's
*forward op*.

A rebalanced call goes through the very same diffusers entry point
(``_templated_context_parallel_attention``) with DAR's forward op in place of the backend's:

- at its first invocation (the rank's own queries and keys, after Ulysses' all-to-all) the op computes
  the key weights of the keys it holds, with ``head_group`` = the Ulysses group and ``seq_group`` =
  the ring group (`dar.parallel`), then all-gathers them over the ring: ``(B, Lk / U)`` float32 per rank;
- for each K/V shard of the ring it runs `dar.ring_attention` with that shard's weights and returns
  ``(out, lse)`` to diffusers' merge; with Ulysses alone it runs the backend's rebalanced attention.

Under tensor parallelism (diffusers >= 0.37) the processors hold a slice of the heads and every token;
each rebalanced call then runs `dar.dar_attention(..., head_group=<TP group>)` (`HeadSplit`).

diffusers' ring visits the shards in the order ``rank, rank + 1, ...`` of its all-gathered buffer; the
op checks each shard's address against that order and raises if diffusers ever visits them otherwise.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from dar import parallel as dp
from dar.call import resolve_scale
from dar.masks import as_bias
from dar.ring import ring_attention

# Families whose diffusers CP plan splits `encoder_hidden_states` (text, first in the joint sequence)
# and `hidden_states` (image) separately along the sequence.
SPLIT_FAMILIES = ("qwenimage", "flux2", "flux")


@dataclasses.dataclass(frozen=True)
class Split:
    """The joint sequence of a context-parallel forward: ``text`` then ``image`` tokens, over ``world`` CP ranks."""

    text: int
    image: int
    world: int

    @property
    def local(self) -> int:
        return (self.text + self.image) // self.world

    def segments(self, f: int) -> tuple[tuple[int, int], ...]:
        """Global segments CP rank ``f`` holds, in its local order: its text piece, its image piece."""
        t, i = self.text // self.world, self.image // self.world
        segs = ((f * t, (f + 1) * t), (self.text + f * i, self.text + (f + 1) * i))
        return tuple(s for s in segs if s[0] < s[1])


@dataclasses.dataclass(frozen=True)
class HeadSplit:
    """Tensor parallelism: every attention call of the forward holds a slice of the heads over ``group``."""

    group: object


@functools.lru_cache(maxsize=16)
def _heads(group) -> HeadSplit:
    return HeadSplit(group)  # one object per group: stable keys for the per-forward cache


def head_group(split):
    """The head group of a forward under tensor parallelism, else None."""
    return split.group if isinstance(split, HeadSplit) else None


def forward_split(model, kw: dict, family: str) -> Split | HeadSplit | None:
    """How a forward's joint sequence is split across CP ranks (a `Split`), or its heads across TP
    ranks (a `HeadSplit`); None without parallelism.

    Raises ValueError (naming the reason) for a parallel configuration DAR cannot serve.
    """
    pc = getattr(model, "_parallel_config", None)
    if pc is None:
        return None
    name = type(model).__name__
    tp = getattr(pc, "tensor_parallel_config", None)
    if tp is not None:
        # Each rank's processors attend with a contiguous slice of the heads (column-sharded Q/K/V)
        # and every token: DAR's head_group case, over the TP mesh.
        return _heads(tp._mesh.get_group())
    cp = pc.context_parallel_config
    if cp is None:
        return None
    if getattr(cp, "ulysses_anything", False) or getattr(cp, "ring_anything", False):
        raise ValueError(f"dar: {name} runs with ContextParallelConfig(ulysses_anything/ring_anything=True), which "
                         f"splits the sequence unevenly; DAR serves even Ulysses and ring splits")
    if family == "layout_fn":  # a user's layout on a known family: that family's split applies
        from .layouts import family_of

        fam = family_of(model)
        family = fam.name if fam is not None else "layout_fn"
    if family not in SPLIT_FAMILIES:
        raise ValueError(f"dar: {name} runs with context parallelism, and DAR knows how diffusers splits the "
                         f"tokens only for {', '.join(SPLIT_FAMILIES)} (family here: {family})")
    hs, ehs = kw.get("hidden_states"), kw.get("encoder_hidden_states")
    if hs is None or ehs is None:
        raise ValueError(f"dar: {name} under context parallelism: the forward has no hidden_states / "
                         f"encoder_hidden_states to tell how the sequence is split")
    return Split(int(ehs.shape[1]), int(hs.shape[1]), int(cp.ring_degree) * int(cp.ulysses_degree))


@functools.lru_cache(maxsize=64)
def _ring_shards(split: Split, ring: int, ulysses: int) -> dp.SeqShards:
    # Ring member c holds, after Ulysses' all-to-all, the pieces of CP ranks c*U .. c*U + U - 1 in order.
    members = tuple(sum((split.segments(c * ulysses + u) for u in range(ulysses)), ()) for c in range(ring))
    return dp.SeqShards(members, members)


def rank_slots(layouts, config, split: Split, ring: int, ulysses: int) -> tuple[int, ...]:
    """Sampled rows each ring member contributes to the exchange for a forward's layouts (`ShardPlan.rank_slots`)."""
    from dar.layout import resolve_layouts
    from dar.plan import make_plan

    lays = resolve_layouts(layouts, len(layouts) if isinstance(layouts, (list, tuple)) else 1,
                           split.text + split.image, split.text + split.image)
    plan = make_plan(lays, split.text + split.image, split.text + split.image, config)
    return dp.shard_plan(plan, _ring_shards(split, ring, ulysses), 0).rank_slots


def dar_traffic(*, batch: int, heads: int, head_dim: int, dtype_bytes: int, split: Split, ring: int, ulysses: int,
                rank_slots: tuple[int, ...], num_groups: int, thresholds: str = "minmax",
                masked: bool = False) -> list:
    """The collectives DAR adds to one rebalanced attention call of a CP forward (the same on every
    rank), in issue order: ``(kind, group size, payload bytes)`` (`dar.parallel.wire_bytes` turns them
    into bytes sent). ``rank_slots``: see `rank_slots`."""
    blk = ulysses * split.local  # tokens a ring member holds after Ulysses' all-to-all
    calls = [("all_gather", ring * ulysses, batch * split.local * 4)] if masked else []
    calls += dp.statistics_traffic(batch=batch, heads_q=heads // ulysses, head_dim=head_dim, dtype_bytes=dtype_bytes,
                                   lk_local=blk, rank_slots=rank_slots if ring > 1 else None,
                                   num_groups=num_groups, head_world=ulysses if ulysses > 1 else None,
                                   thresholds=thresholds, stat_bytes=8 if dtype_bytes == 8 else 4)
    if ring > 1:
        calls.append(("all_gather", ring, batch * blk * 4))  # every ring member's key weights
    return calls


def model_traffic(*, batch: int, heads: int, head_dim: int, dtype_bytes: int, seq: int, ring: int,
                  ulysses: int) -> list:
    """The collectives diffusers' own context-parallel attention issues per call, per rank (same form):
    Ulysses' all-to-alls of q, k, v and the output, and the ring's all-gather of K and V."""
    local = batch * (seq // (ring * ulysses)) * heads * head_dim * dtype_bytes  # one of q, k, v before exchange
    calls = [("all_to_all", ulysses, local)] * 4 if ulysses > 1 else []
    if ring > 1:
        calls.append(("all_gather", ring, 2 * local))  # K and V after Ulysses: U x the tokens, 1/U the heads
    return calls


def _no_backward(ctx, grad_out, *args, **kwargs):
    raise RuntimeError("dar: DAR under context parallelism runs forward only (inference); dar.disable the model "
                       "to train it with context parallelism")


class _ForwardOp:
    """DAR's forward op for one attention call inside diffusers' Ulysses / ring templates."""

    def __init__(self, layouts, settings, shards, key_bias, ring, ulysses, ring_rank, groups):
        self.layouts, self.settings, self.shards = layouts, settings, shards
        self.key_bias = key_bias  # (B, Lk) float32 in ring order, or None
        self.ring, self.ulysses, self.ring_rank = ring, ulysses, ring_rank
        self.head_group, self.seq_group = groups
        self.calls = 0
        self.weights = None  # (B, Lk) float32, every ring member's keys in ring order
        self.sp = None
        self.base = None  # address of shard 0 in diffusers' gathered K/V buffer

    def _check_shard(self, i: int, key, value) -> int:
        """The shard diffusers hands over at step ``i``: ``(ring_rank + i) % R``, checked by address."""
        c = (self.ring_rank + i) % self.ring
        if i == 0:
            return c
        size = (key.numel() + value.numel()) * key.element_size()
        if self.base is None:
            self.base = key.data_ptr() - c * size
        elif key.data_ptr() != self.base + c * size:
            raise RuntimeError("dar: diffusers' ring attention visited its K/V shards in an order DAR does not "
                               "recognise; DAR cannot tell which key weights belong to this shard")
        return c

    def __call__(self, ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                 _save_ctx=True, _parallel_config=None, **_):
        i = self.calls
        self.calls += 1
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, H, L, D) views
        s = self.settings
        blk = q.shape[2]
        if i == 0:
            own = None if self.key_bias is None else self.key_bias[:, self.ring_rank * blk:(self.ring_rank + 1) * blk]
            self.sp, self.weights = dp.rank_key_weights(q, k, self.layouts, s.config, own, scale, self.head_group,
                                                        self.seq_group, shards=self.shards)
        c = self._check_shard(i, key, value)
        keys = slice(c * blk, (c + 1) * blk)
        bias = None if self.key_bias is None else self.key_bias[:, keys]
        w = None if self.weights is None else self.weights[:, keys]
        if self.ring == 1 and not return_lse:
            # Ulysses alone: every key is here; the selected DAR backend runs the rebalanced attention.
            return dp.rank_attention(q, k, v, w, self.sp, s.config, bias, scale, s.backend).transpose(1, 2)
        out, lse = ring_attention(q, k, v, w, self.sp.keys.gen_ranges, mode=s.config.mode, scale=scale,
                                  key_bias=bias)
        out = out.transpose(1, 2)
        return (out, lse.transpose(1, 2)) if return_lse else out


def rebalance(state, layouts, split: Split, q, k, v, attn_mask, scale, parallel_config):
    """DAR for one context-parallel ``dispatch_attention_fn`` call of the joint sequence ``split``
    describes (SDPA-layout views of this rank's pieces in and out), through diffusers' own template."""
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    cp = parallel_config.context_parallel_config
    if state.settings.recorder is not None:
        raise ValueError("dar: recorder= is not supported under context parallelism (each rank holds a part of "
                         "the tensors a Recorder stores); record on one device")
    if q.shape[1] != k.shape[1]:
        raise ValueError("dar: diffusers' context-parallel attention takes as many KV heads as query heads; this "
                         f"call has {q.shape[1]} and {k.shape[1]}")
    b = q.shape[0]
    key_bias = None
    if attn_mask is not None:
        if attn_mask.dim() != 4 or attn_mask.shape[1] != 1 or attn_mask.shape[2] != 1:
            raise ValueError(f"dar: under context parallelism DAR takes key-padding masks (B, 1, 1, Lk); this call "
                             f"has attn_mask of shape {tuple(attn_mask.shape)}")
        local, total = k.shape[2], split.text + split.image
        if attn_mask.shape[3] not in (local, total):
            raise ValueError(f"dar: the key-padding mask has {attn_mask.shape[3]} keys; this rank holds {local} of "
                             f"{total}, so it must have {local} (this rank's) or {total} (the whole sequence's)")
        m = attn_mask[:, 0, 0, :].expand(b, attn_mask.shape[3])
        key_bias = as_bias(m)
        if attn_mask.shape[3] == local:
            # diffusers >= 0.39 splits the text mask with the tokens, so each rank's mask covers its own
            # [text piece, image piece]. Every rank's key mask in ring order (the flattened CP mesh's rank
            # order): O(B * Lk_local) each.
            key_bias = dp.gather_ranks(key_bias, cp._flattened_mesh.get_group(), dim=1)
        else:
            # diffusers 0.38 builds the joint mask in global order [text, image] before its split hooks, while
            # each rank's keys are [its text piece, its image piece]: put the mask in rank order here, no
            # exchange. (diffusers' own attention applies that global mask to the rank-order keys.)
            key_bias = torch.cat([key_bias[:, a:e] for f in range(split.world) for a, e in split.segments(f)], dim=1)
    ring, ulysses = int(cp.ring_degree), int(cp.ulysses_degree)
    groups = (cp._ulysses_mesh.get_group() if ulysses > 1 else None,
              cp._ring_mesh.get_group() if ring > 1 else None)
    op = _ForwardOp(layouts, state.settings, _ring_shards(split, ring, ulysses), key_bias, ring, ulysses,
                    int(cp._ring_local_rank) if ring > 1 else 0, groups)
    scale = resolve_scale("scale", scale, q.shape[-1])
    out = _templated_context_parallel_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, 0.0,
                                                False, float(scale), False, False, forward_op=op,
                                                backward_op=_no_backward, _parallel_config=parallel_config)
    return out.transpose(1, 2)
