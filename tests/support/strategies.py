"""Hypothesis strategies for DAR cases: shapes, layouts, masks and configs, kept small for CI."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st

import dar


@dataclasses.dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layouts: list
    cfg: dar.DARConfig
    attn_mask: torch.Tensor | None
    is_causal: bool
    scale: float | None

    def kwargs(self) -> dict:
        return dict(attn_mask=self.attn_mask, scale=self.scale, is_causal=self.is_causal)


@st.composite
def ranges(draw, length: int, max_ranges: int):
    """Sorted, disjoint, non-empty half-open ranges inside [0, length)."""
    if length == 0:
        return []
    n_cuts = draw(st.integers(0, min(2 * max_ranges, length)))
    cuts = sorted(draw(st.sets(st.integers(0, length), min_size=n_cuts, max_size=n_cuts)))
    pairs = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2)]
    return [(s, e) for s, e in pairs if e > s][:max_ranges]


configs = st.builds(
    dar.DARConfig,
    num_samples=st.integers(1, 12),
    gamma=st.sampled_from([0.0, 0.15, 0.5, 0.9]),
    tau_high=st.sampled_from([0.6, 0.7, 0.9, 1.0]),
    tau_low=st.sampled_from([0.0, 0.1, 0.3, 0.5]),
    sampling=st.sampled_from(["random", "strided"]),
    seed=st.integers(0, 3),
    normalize=st.sampled_from(["joint", "per_image"]),
    thresholds=st.sampled_from(["minmax", "quantile"]),
    mode=st.sampled_from(["key_scale", "prob_scale"]),
    queries=st.sampled_from(["generation", "all"]),
)


@st.composite
def cases(draw, dtypes=(torch.float32, torch.float64), max_len: int = 20, head_dims=(4, 8, 12),
          mask_kinds=("none", "key_padding", "bool", "float", "causal")):
    b = draw(st.integers(1, 2))
    hk = draw(st.integers(1, 2))
    hq = hk * draw(st.integers(1, 3))
    lq = draw(st.integers(1, max_len))
    lk = draw(st.integers(1, max_len))
    d = draw(st.sampled_from(head_dims))
    dv = draw(st.sampled_from([d, 6]))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    spread = draw(st.sampled_from([1.0, 3.0]))
    q = (torch.randn(b, hq, lq, d, generator=g) * spread).to(dtype)
    k = (torch.randn(b, hk, lk, d, generator=g) * spread).to(dtype)
    v = torch.randn(b, hk, lk, dv, generator=g).to(dtype)
    per_row = draw(st.booleans())
    n_layouts = b if per_row else 1
    lays = [dar.TokenLayout(ref=draw(ranges(lk, 3)), gen=draw(ranges(lq, 2))) for _ in range(n_layouts)]
    layouts = lays if per_row else lays[0]
    cfg = draw(configs.filter(lambda c: c.tau_low < c.tau_high))
    kind = draw(st.sampled_from(mask_kinds))
    mask, causal = None, False
    if kind == "key_padding":
        mask = torch.rand(b, 1, 1, lk, generator=g) > 0.3
    elif kind == "bool":
        mask = torch.rand(b, 1, lq, lk, generator=g) > 0.3
    elif kind == "float":
        mask = torch.where(torch.rand(1, hq, lq, lk, generator=g) > 0.2, torch.randn(1, hq, lq, lk, generator=g),
                           torch.tensor(float("-inf"))).to(dtype)
    elif kind == "float_key":  # a key-only additive bias (B, 1, 1, Lk), as flex and triton take
        mask = torch.where(torch.rand(b, 1, 1, lk, generator=g) > 0.2, torch.randn(b, 1, 1, lk, generator=g),
                           torch.tensor(float("-inf"))).to(dtype)
    elif kind == "causal":
        causal = True
    scale = draw(st.sampled_from([None, 0.3]))
    return Case(q, k, v, layouts, cfg, mask, causal, scale)


NONFINITE = (float("nan"), float("inf"), float("-inf"))


@st.composite
def nonfinite_cases(draw, **kwargs):
    """`cases` with, half of the time, one to three NaN / +-inf values put into q, k, v or a float mask
    (docs/semantics.md, "Non-finite inputs")."""
    case = draw(cases(**kwargs))
    if draw(st.booleans()):
        return case
    targets = ["q", "k", "v"] + (["attn_mask"] if case.attn_mask is not None and case.attn_mask.is_floating_point()
                                 else [])
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(targets))
        t = getattr(case, name).clone()
        flat = t.view(-1) if t.is_contiguous() else t.reshape(-1)
        value = draw(st.sampled_from(NONFINITE[:2] if name == "attn_mask" else NONFINITE))
        flat[draw(st.integers(0, flat.numel() - 1))] = value
        setattr(case, name, flat.view(t.shape))
    return case
