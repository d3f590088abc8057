"""A tiny stand-in for OmniGen2's transformer (VectorSpaceLab/OmniGen2, checked at commit 0f72fa9).

What it reproduces of ``omnigen2/models/transformers/transformer_omnigen2.py`` and
``omnigen2/models/attention_processor.py`` (no code of theirs; the behaviour, from reading it):

- ``forward(hidden_states, timestep, text_hidden_states, freqs_cis, text_attention_mask,
  ref_image_hidden_states=None, ...)``: ``hidden_states`` a list of ``(C, H, W)`` latents (or a 4-D
  tensor), ``ref_image_hidden_states`` per row a list of ``(C, H_j, W_j)`` latents or None,
  ``text_attention_mask`` ``(B, L)`` with each row's caption first.
- Refiners before the joint layers: a context refiner over the text (mask = the text mask), a noise
  refiner over the targets, a reference refiner over each reference image alone.
- The joint ``layers`` attend per row over ``[text, ref 1, ..., ref n, target]``, padded at the end
  to the longest row, with a ``(B, L)`` boolean key mask.
- Attention modules carry a ``processor``; the flash one unpads by the mask and calls the
  module-level ``flash_attn_varlen_func(q, k, v, cu_seqlens_q=, cu_seqlens_k=, max_seqlen_q=,
  max_seqlen_k=, dropout_p=0.0, causal=False, softmax_scale=)`` with K/V heads repeated to the
  query heads; the SDPA one calls ``F.scaled_dot_product_attention(q, k, v, attn_mask=(B, 1, 1, L)
  bool, scale=)`` on ``(B, H, L, D)``, K/V heads repeated.

Each processor appends what it was called with and returned to ``processor.calls`` when that is a list.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from .flash_attn_like import flash_attn_varlen_func


class FlashVarlenProcessor:
    calls = None

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, scale=None):
        b, length, _ = hidden_states.shape
        q, k, v = attn.project(hidden_states, encoder_hidden_states)  # (B, L, H, D), K/V with Hk heads
        k = k.repeat_interleave(attn.heads // attn.kv_heads, dim=2)
        v = v.repeat_interleave(attn.heads // attn.kv_heads, dim=2)
        lens = attention_mask.sum(dim=-1, dtype=torch.int32)
        idx = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
        cu = F.pad(torch.cumsum(lens, dim=0, dtype=torch.int32), (1, 0))
        mx = int(lens.max().item())
        qs, ks, vs = (t.reshape(b * length, t.shape[2], t.shape[3])[idx] for t in (q, k, v))
        out = flash_attn_varlen_func(qs, ks, vs, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=mx, max_seqlen_k=mx,
                                     dropout_p=0.0, causal=False, softmax_scale=scale)
        if self.calls is not None:
            self.calls.append(dict(q=qs, k=ks, v=vs, cu=cu, max=mx, scale=scale, out=out))
        full = out.new_zeros(b * length, *out.shape[1:])
        full[idx] = out
        return attn.to_out(full.reshape(b, length, -1))


class SdpaProcessor:
    calls = None

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, scale=None):
        b, length, _ = hidden_states.shape
        q, k, v = attn.project(hidden_states, encoder_hidden_states)
        mask = attention_mask.bool().view(b, 1, 1, -1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k = k.repeat_interleave(q.size(-3) // k.size(-3), -3)
        v = v.repeat_interleave(q.size(-3) // v.size(-3), -3)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        if self.calls is not None:
            self.calls.append(dict(q=q, k=k, v=v, mask=mask, scale=scale, out=out))
        return attn.to_out(out.transpose(1, 2).reshape(b, length, -1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, processor):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, kv_heads * self.head_dim)
        self.to_v = nn.Linear(dim, kv_heads * self.head_dim)
        self.to_out = nn.Linear(dim, dim)
        self.processor = processor

    def project(self, x, ctx):
        b = x.shape[0]
        return (self.to_q(x).view(b, -1, self.heads, self.head_dim), self.to_k(ctx).view(b, -1, self.kv_heads, self.head_dim),
                self.to_v(ctx).view(b, -1, self.kv_heads, self.head_dim))

    def forward(self, hidden_states, attention_mask):
        return self.processor(self, hidden_states, hidden_states, attention_mask, scale=self.head_dim ** -0.5)


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, processor):
        super().__init__()
        self.attn = Attention(dim, heads, kv_heads, processor)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, mask):
        x = x + self.attn(x, mask)
        return x + self.mlp(x)


def _pad_rows(rows: list[torch.Tensor], dim: int):
    length = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros(len(rows), length, dim)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, :r.shape[0]] = r
        mask[i, :r.shape[0]] = True
    return out, mask


class OmniGen2Transformer2DModel(nn.Module):
    def __init__(self, flash: bool = True, dim: int = 48, heads: int = 6, kv_heads: int = 2, text_dim: int = 8,
                 channels: int = 4, layers: int = 2):
        super().__init__()
        proc = FlashVarlenProcessor if flash else SdpaProcessor
        self.config = types.SimpleNamespace(patch_size=2, in_channels=channels)
        p = self.config.patch_size
        self.x_embedder = nn.Linear(p * p * channels, dim)
        self.ref_embedder = nn.Linear(p * p * channels, dim)
        self.text_embedder = nn.Linear(text_dim, dim)
        self.context_refiner = nn.ModuleList([Block(dim, heads, kv_heads, proc())])
        self.noise_refiner = nn.ModuleList([Block(dim, heads, kv_heads, proc())])
        self.ref_image_refiner = nn.ModuleList([Block(dim, heads, kv_heads, proc())])
        self.layers = nn.ModuleList([Block(dim, heads, kv_heads, proc()) for _ in range(layers)])
        self.out = nn.Linear(dim, p * p * channels)
        self.dim = dim

    def processors(self, stage: str = "layers"):
        return [blk.attn.processor for blk in getattr(self, stage)]

    def _patchify(self, img):
        c, h, w = img.shape
        p = self.config.patch_size
        return img.reshape(c, h // p, p, w // p, p).permute(1, 3, 2, 4, 0).reshape((h // p) * (w // p), p * p * c)

    def forward(self, hidden_states, timestep, text_hidden_states, freqs_cis, text_attention_mask,
                ref_image_hidden_states=None, attention_kwargs=None, return_dict=False):
        imgs = list(hidden_states)
        caps = text_attention_mask.sum(dim=1).tolist()
        text = self.text_embedder(text_hidden_states)
        for blk in self.context_refiner:
            text = blk(text, text_attention_mask)
        targets, tmask = _pad_rows([self.x_embedder(self._patchify(i)) for i in imgs], self.dim)
        for blk in self.noise_refiner:
            targets = blk(targets, tmask)
        refs = [[self.ref_embedder(self._patchify(r)) for r in (row or [])] for row in
                (ref_image_hidden_states or [None] * len(imgs))]
        flat = [r for row in refs for r in row]
        if flat:
            batch_refs, rmask = _pad_rows(flat, self.dim)
            for blk in self.ref_image_refiner:
                batch_refs = blk(batch_refs, rmask)
            it = iter(range(len(flat)))
            refs = [[batch_refs[next(it), :r.shape[0]] for r in row] for row in refs]
        rows = []
        for b, img in enumerate(imgs):
            n = (img.shape[1] // self.config.patch_size) * (img.shape[2] // self.config.patch_size)
            rows.append(torch.cat([text[b, :int(caps[b])], *refs[b], targets[b, :n]]))
        joint, mask = _pad_rows(rows, self.dim)
        for blk in self.layers:
            joint = blk(joint, mask)
        out = []
        for b, (img, row) in enumerate(zip(imgs, rows)):
            n = (img.shape[1] // self.config.patch_size) * (img.shape[2] // self.config.patch_size)
            out.append(self.out(joint[b, row.shape[0] - n:row.shape[0]]))
        return out


def inputs(batch_refs=((4, 4), (2, 6)), target=(4, 4), caps=(5,), text_len: int = 7, seed: int = 0, channels: int = 4):
    """Forward arguments: one row per entry of ``caps`` (caption lengths), each with the reference latents
    of sizes ``batch_refs`` (latent (H, W), patch 2) and a target of size ``target``."""
    g = torch.Generator().manual_seed(seed)
    b = len(caps)
    mask = torch.zeros(b, text_len, dtype=torch.bool)
    for i, c in enumerate(caps):
        mask[i, :c] = True
    refs = [[torch.randn(channels, h, w, generator=g) for h, w in batch_refs] if batch_refs else None for _ in range(b)]
    return dict(hidden_states=[torch.randn(channels, *target, generator=g) for _ in range(b)],
                timestep=torch.full((b,), 0.5), text_hidden_states=torch.randn(b, text_len, 8, generator=g),
                freqs_cis=None, text_attention_mask=mask, ref_image_hidden_states=refs)
