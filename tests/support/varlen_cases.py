"""Hypothesis strategy for packed (varlen) DAR cases, and the float64 oracle applied per sequence."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from hypothesis import strategies as st

import dar
from .oracle import dar_float64
from .strategies import configs, ranges

# (Hq, Hk, D): OmniGen2's shape (21 query heads, 7 KV heads, head dim 120) and small ones.
HEADS = [(21, 7, 120), (4, 2, 8), (3, 3, 12), (2, 1, 4)]


@dataclasses.dataclass
class VarlenCase:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    lens_q: list
    lens_k: list
    layouts: list
    cfg: dar.DARConfig
    causal: bool
    scale: float | None

    @property
    def max_q(self) -> int:
        return max(self.lens_q)

    @property
    def max_k(self) -> int:
        return max(self.lens_k)

    def args(self, with_v: bool = True) -> tuple:
        head = (self.q, self.k, self.v) if with_v else (self.q, self.k)
        return (*head, self.cu_q, self.cu_k, self.max_q, self.max_k, self.layouts, self.cfg, self.scale, self.causal)


def cu(lens) -> torch.Tensor:
    return torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int32)


@st.composite
def varlen_cases(draw, dtypes=(torch.float32, torch.float64), max_len: int = 12, heads=HEADS, min_len: int = 1,
                 spreads=(1.0, 3.0)):
    n = draw(st.integers(1, 5))
    hq, hk, d = draw(st.sampled_from(heads))
    dv = draw(st.sampled_from([d, 6]))
    same = draw(st.booleans())  # self-attention (Lq_n == Lk_n, OmniGen2) or Lq_n != Lk_n (BAGEL)
    lens_q = draw(st.lists(st.integers(min_len, max_len), min_size=n, max_size=n))
    lens_k = lens_q if same else draw(st.lists(st.integers(min_len, max_len), min_size=n, max_size=n))
    dtype = draw(st.sampled_from(dtypes))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    spread = draw(st.sampled_from(spreads))
    q = (torch.randn(sum(lens_q), hq, d, generator=g) * spread).to(dtype)
    k = (torch.randn(sum(lens_k), hk, d, generator=g) * spread).to(dtype)
    v = torch.randn(sum(lens_k), hk, dv, generator=g).to(dtype)
    layouts = []
    for lq, lk in zip(lens_q, lens_k):
        if draw(st.integers(0, 4)) == 0:  # a sequence without references (e.g. a CFG branch)
            layouts.append(dar.TokenLayout(gen=draw(ranges(lq, 2))))
        else:
            layouts.append(dar.TokenLayout(ref=draw(ranges(lk, 3)), gen=draw(ranges(lq, 2))))
    cfg = draw(configs.filter(lambda c: c.tau_low < c.tau_high))
    causal = draw(st.booleans())
    scale = draw(st.sampled_from([None, 0.3]))
    return VarlenCase(q, k, v, cu(lens_q), cu(lens_k), lens_q, lens_k, layouts, cfg, causal, scale)


def bottom_right_mask(lq: int, lk: int) -> torch.Tensor:
    """flash-attn's causal rule, written out again for the oracle: key j <= i + (Lk - Lq)."""
    return torch.tensor([[j - i <= lk - lq for j in range(lk)] for i in range(lq)], dtype=torch.bool)


def oracle(case: VarlenCase, with_v: bool = True):
    """Packed float64 results: out (total_q, Hq, Dv) or None, w (total_k,), rhat (total_k,), thresholds list."""
    outs, ws, rhats, ths = [], [], [], []
    cq, ck = case.cu_q.tolist(), case.cu_k.tolist()
    for n, lay in enumerate(case.layouts):
        qn = case.q[cq[n]:cq[n + 1]].transpose(0, 1)[None]
        kn = case.k[ck[n]:ck[n + 1]].transpose(0, 1)[None]
        vn = case.v[ck[n]:ck[n + 1]].transpose(0, 1)[None] if with_v else None
        mask = bottom_right_mask(qn.shape[2], kn.shape[2])[None, None] if case.causal else None
        out, w, rhat, th = dar_float64(qn, kn, vn, [lay], case.cfg, attn_mask=mask, scale=case.scale)
        if with_v:
            outs.append(out[0].transpose(1, 0, 2))
        ws.append(w[0])
        rhats.append(rhat[0])
        ths.extend(th[0])
    out = np.concatenate(outs) if with_v else None
    return out, np.concatenate(ws), np.concatenate(rhats), ths
