"""A tiny stand-in for BAGEL (ByteDance-Seed/Bagel, checked at commit 056b5fd).

What it reproduces of ``modeling/bagel/bagel.py`` and ``modeling/bagel/qwen2_navit.py`` (no code of
theirs; the behaviour and argument names, from reading it):

- ``NaiveCache(num_layers)``: ``key_cache`` / ``value_cache`` dicts of packed ``(total, Hk, D)`` keys
  per layer; ``seq_lens`` is the cached length (0 when empty).
- ``Bagel.forward_cache_update_text / _vae / _vit(...)``: append tokens to every sequence's cache with
  one language-model forward (``update_past_key_values=True``, ``is_causal=False`` for images). An
  image is ``[start marker, image tokens, end marker]``; ``packed_indexes`` are the positions of the
  new tokens in the merged keys (each sequence: its cached keys, then its new tokens),
  ``packed_key_value_indexes`` those of the cached keys, ``key_values_lens`` the cached lengths and
  ``packed_seqlens`` the new ones. VAE updates run the language model in ``mode="gen"`` with
  ``packed_vae_token_indexes`` / ``packed_text_indexes``; ViT updates in ``mode="und"``.
- ``Bagel.generate_image(...)`` loops over timesteps calling ``_forward_flow``, which runs the
  language model with ``mode="gen"``, ``update_past_key_values=False`` on ``[start, image tokens,
  end]`` for the conditional cache and, with CFG, again for a text-free and an image-free cache.
- ``PackedAttentionMoT.forward_inference`` merges the new keys into the cached ones and calls the
  module-level ``flash_attn_varlen_func(q=, k=, v=, cu_seqlens_q=, cu_seqlens_k=, max_seqlen_q=,
  max_seqlen_k=, causal=)`` with GQA heads.

The language model is the ``Qwen2ForCausalLM``-like ``language_model`` whose ``model`` is called
with keyword arguments. Attention modules append each call to ``module.calls`` when it is a list.
Images are given directly as token grids ``(h, w, C)`` (no VAE / ViT networks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .flash_attn_like import flash_attn_varlen_func

START, END = 1, 2  # marker token ids


class NaiveCache:
    def __init__(self, num_layers: int):
        self.key_cache = {i: None for i in range(num_layers)}
        self.value_cache = {i: None for i in range(num_layers)}

    @property
    def seq_lens(self) -> int:
        return 0 if self.key_cache[0] is None else self.key_cache[0].shape[0]


class PackedAttentionMoT(nn.Module):
    calls = None

    def __init__(self, hidden: int, heads: int, kv_heads: int, layer_idx: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.layer_idx = heads, kv_heads, hidden // heads, layer_idx
        for suffix in ("", "_moe_gen"):
            setattr(self, "q_proj" + suffix, nn.Linear(hidden, hidden))
            setattr(self, "k_proj" + suffix, nn.Linear(hidden, kv_heads * self.head_dim))
            setattr(self, "v_proj" + suffix, nn.Linear(hidden, kv_heads * self.head_dim))
            setattr(self, "o_proj" + suffix, nn.Linear(hidden, hidden))

    def forward(self, *args, **kwargs):
        return self.forward_inference(*args, **kwargs)

    def _project(self, x, name, mode, vae, text):
        if mode == "und":
            return getattr(self, name)(x)
        out = x.new_zeros(x.shape[0], getattr(self, name).out_features)
        out[text] = getattr(self, name)(x[text])
        out[vae] = getattr(self, name + "_moe_gen")(x[vae])
        return out

    def forward_inference(self, packed_query_sequence, query_lens, packed_query_indexes, past_key_values=None,
                          key_values_lens=None, packed_key_value_indexes=None, update_past_key_values=True,
                          is_causal=True, mode="und", packed_vae_token_indexes=None, packed_text_indexes=None):
        x, vae, text = packed_query_sequence, packed_vae_token_indexes, packed_text_indexes
        q = self._project(x, "q_proj", mode, vae, text).view(-1, self.heads, self.head_dim)
        k = self._project(x, "k_proj", mode, vae, text).view(-1, self.kv_heads, self.head_dim)
        v = self._project(x, "v_proj", mode, vae, text).view(-1, self.kv_heads, self.head_dim)
        if past_key_values is not None and past_key_values.key_cache[self.layer_idx] is not None:
            total = int(query_lens.sum()) + int(key_values_lens.sum())
            mk, mv = k.new_zeros(total, *k.shape[1:]), v.new_zeros(total, *v.shape[1:])
            mk[packed_query_indexes], mv[packed_query_indexes] = k, v
            mk[packed_key_value_indexes] = past_key_values.key_cache[self.layer_idx]
            mv[packed_key_value_indexes] = past_key_values.value_cache[self.layer_idx]
            kv_lens = key_values_lens + query_lens
        else:
            mk, mv, kv_lens = k, v, query_lens
        cu_q = F.pad(torch.cumsum(query_lens, dim=0), (1, 0))
        cu_k = F.pad(torch.cumsum(kv_lens, dim=0), (1, 0))
        out = flash_attn_varlen_func(q=q, k=mk, v=mv, cu_seqlens_q=cu_q.to(torch.int32),
                                     cu_seqlens_k=cu_k.to(torch.int32), max_seqlen_q=max(query_lens).item(),
                                     max_seqlen_k=max(kv_lens).item(), causal=is_causal)
        if self.calls is not None:
            self.calls.append(dict(q=q, k=mk, v=mv, cu_q=cu_q.to(torch.int32), cu_k=cu_k.to(torch.int32),
                                   max_q=int(max(query_lens)), max_k=int(max(kv_lens)), causal=is_causal, mode=mode,
                                   update=update_past_key_values, cache=past_key_values, out=out))
        out = out.reshape(out.shape[0], -1)
        out = self._project(out, "o_proj", mode, vae, text)
        if update_past_key_values:
            past_key_values.key_cache[self.layer_idx] = mk
            past_key_values.value_cache[self.layer_idx] = mv
        return out, past_key_values


class DecoderLayer(nn.Module):
    def __init__(self, hidden, heads, kv_heads, layer_idx):
        super().__init__()
        self.self_attn = PackedAttentionMoT(hidden, heads, kv_heads, layer_idx)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(self, packed_query_sequence, **kw):
        h, cache = self.self_attn(packed_query_sequence, **kw)
        x = packed_query_sequence + h
        return x + self.mlp(x), cache


class Qwen2Model(nn.Module):
    def __init__(self, hidden, heads, kv_heads, layers, vocab):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList([DecoderLayer(hidden, heads, kv_heads, i) for i in range(layers)])

    def forward(self, *args, **kwargs):
        return self.forward_inference(*args, **kwargs)

    def forward_inference(self, packed_query_sequence, query_lens, packed_query_position_ids, packed_query_indexes,
                          past_key_values=None, key_values_lens=None, packed_key_value_indexes=None,
                          update_past_key_values=True, is_causal=True, mode="und", packed_vae_token_indexes=None,
                          packed_text_indexes=None):
        extra = dict(packed_vae_token_indexes=packed_vae_token_indexes, packed_text_indexes=packed_text_indexes) \
            if mode == "gen" else {}
        x = packed_query_sequence
        for layer in self.layers:
            x, past_key_values = layer(x, query_lens=query_lens, packed_query_indexes=packed_query_indexes,
                                       past_key_values=past_key_values, key_values_lens=key_values_lens,
                                       packed_key_value_indexes=packed_key_value_indexes,
                                       update_past_key_values=update_past_key_values, is_causal=is_causal, mode=mode,
                                       **extra)
        return x, past_key_values


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, hidden, heads, kv_heads, layers, vocab):
        super().__init__()
        self.model = Qwen2Model(hidden, heads, kv_heads, layers, vocab)

    def forward_inference(self, **kw):
        return self.model(**kw)


def _packing(kv_lens: list[int], new_lens: list[int]):
    """packed_indexes (new tokens) and packed_key_value_indexes (cached ones) of the merged keys."""
    packed, cached, at = [], [], 0
    for kv, n in zip(kv_lens, new_lens):
        cached.extend(range(at, at + kv))
        packed.extend(range(at + kv, at + kv + n))
        at += kv + n
    return torch.tensor(packed), torch.tensor(cached, dtype=torch.long)


def _image_rows(grids: list[tuple[int, int]]):
    """Per sequence [start, image tokens, end]: lens, image token indexes, marker indexes (query positions)."""
    lens, img, text, at = [], [], [], 0
    for h, w in grids:
        text.append(at)
        img.extend(range(at + 1, at + 1 + h * w))
        text.append(at + 1 + h * w)
        lens.append(h * w + 2)
        at += h * w + 2
    return lens, torch.tensor(img), torch.tensor(text)


class Bagel(nn.Module):
    def __init__(self, hidden=48, heads=6, kv_heads=2, layers=2, vocab=32, channels=4, vit_dim=6):
        super().__init__()
        self.language_model = Qwen2ForCausalLM(hidden, heads, kv_heads, layers, vocab)
        self.vae2llm, self.llm2vae = nn.Linear(channels, hidden), nn.Linear(hidden, channels)
        self.vit_embed = nn.Linear(vit_dim, hidden)
        self.vit_max_num_patch_per_side = 16
        self.num_layers = layers

    def _embed_markers(self, lens, text):
        seq = self.language_model.model.embed_tokens.weight.new_zeros(sum(lens), self.vae2llm.out_features)
        ids = torch.tensor([START, END] * (len(text) // 2))
        seq[text] = self.language_model.model.embed_tokens(ids)
        return seq

    # -- context ------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward_cache_update_text(self, past_key_values, packed_text_ids, packed_text_position_ids, text_token_lens,
                                  packed_text_indexes, packed_key_value_indexes, key_values_lens):
        self.language_model.forward_inference(
            packed_query_sequence=self.language_model.model.embed_tokens(packed_text_ids), query_lens=text_token_lens,
            packed_query_position_ids=packed_text_position_ids, packed_query_indexes=packed_text_indexes,
            past_key_values=past_key_values, packed_key_value_indexes=packed_key_value_indexes,
            key_values_lens=key_values_lens, update_past_key_values=True, is_causal=True, mode="und")
        return past_key_values

    @torch.no_grad()
    def forward_cache_update_vae(self, vae_model, past_key_values, padded_images, patchified_vae_latent_shapes,
                                 packed_vae_position_ids, packed_timesteps, packed_vae_token_indexes, packed_text_ids,
                                 packed_text_indexes, packed_position_ids, packed_seqlens, packed_indexes,
                                 key_values_lens, packed_key_value_indexes):
        seq = self._embed_markers(packed_seqlens.tolist(), packed_text_indexes)
        seq[packed_vae_token_indexes] = self.vae2llm(torch.cat([im.reshape(-1, im.shape[-1]) for im in padded_images]))
        self.language_model.forward_inference(
            packed_query_sequence=seq, query_lens=packed_seqlens, packed_query_position_ids=packed_position_ids,
            packed_query_indexes=packed_indexes, past_key_values=past_key_values, key_values_lens=key_values_lens,
            packed_key_value_indexes=packed_key_value_indexes, update_past_key_values=True, is_causal=False,
            mode="gen", packed_vae_token_indexes=packed_vae_token_indexes, packed_text_indexes=packed_text_indexes)
        return past_key_values

    @torch.no_grad()
    def forward_cache_update_vit(self, past_key_values, packed_text_ids, packed_text_indexes, packed_vit_tokens,
                                 packed_vit_token_indexes, packed_vit_position_ids, vit_token_seqlens,
                                 packed_position_ids, packed_seqlens, packed_indexes, packed_key_value_indexes,
                                 key_values_lens):
        seq = self._embed_markers(packed_seqlens.tolist(), packed_text_indexes)
        seq[packed_vit_token_indexes] = self.vit_embed(packed_vit_tokens)
        self.language_model.forward_inference(
            packed_query_sequence=seq, query_lens=packed_seqlens, packed_query_position_ids=packed_position_ids,
            packed_query_indexes=packed_indexes, past_key_values=past_key_values,
            packed_key_value_indexes=packed_key_value_indexes, key_values_lens=key_values_lens,
            update_past_key_values=True, is_causal=False, mode="und")
        return past_key_values

    # -- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_image(self, packed_init_noises, packed_vae_token_indexes, packed_text_indexes, packed_seqlens,
                       packed_indexes, past_key_values, key_values_lens, packed_key_value_indexes, num_timesteps=3,
                       cfg_text_scale=1.0, cfg_text_past_key_values=None, cfg_text_key_values_lens=None,
                       cfg_text_packed_query_indexes=None, cfg_text_packed_key_value_indexes=None, cfg_img_scale=1.0,
                       cfg_img_past_key_values=None, cfg_img_key_values_lens=None, cfg_img_packed_query_indexes=None,
                       cfg_img_packed_key_value_indexes=None):
        x = packed_init_noises
        for t in torch.linspace(1, 0, num_timesteps)[:-1]:
            v = self._forward_flow(x, packed_vae_token_indexes, packed_text_indexes, packed_seqlens, packed_indexes,
                                   past_key_values, key_values_lens, packed_key_value_indexes, cfg_text_scale,
                                   cfg_text_past_key_values, cfg_text_key_values_lens, cfg_text_packed_query_indexes,
                                   cfg_text_packed_key_value_indexes, cfg_img_scale, cfg_img_past_key_values,
                                   cfg_img_key_values_lens, cfg_img_packed_query_indexes,
                                   cfg_img_packed_key_value_indexes)
            x = x - v / num_timesteps
        return x

    def _flow_branch(self, seq, lens, vae, text, indexes, cache, kv_lens, kv_indexes):
        out, _ = self.language_model.forward_inference(
            packed_query_sequence=seq, query_lens=lens, packed_query_position_ids=None, packed_query_indexes=indexes,
            past_key_values=cache, key_values_lens=kv_lens, packed_key_value_indexes=kv_indexes,
            update_past_key_values=False, is_causal=False, mode="gen", packed_vae_token_indexes=vae,
            packed_text_indexes=text)
        return self.llm2vae(out)[vae]

    def _forward_flow(self, x, vae, text, lens, indexes, cache, kv_lens, kv_indexes, cfg_text_scale, cfg_text_cache,
                      cfg_text_kv_lens, cfg_text_indexes, cfg_text_kv_indexes, cfg_img_scale, cfg_img_cache,
                      cfg_img_kv_lens, cfg_img_indexes, cfg_img_kv_indexes):
        seq = self._embed_markers(lens.tolist(), text)
        seq[vae] = self.vae2llm(x)
        v = self._flow_branch(seq, lens, vae, text, indexes, cache, kv_lens, kv_indexes)
        if cfg_text_scale > 1.0:
            v_text = self._flow_branch(seq, lens, vae, text, cfg_text_indexes, cfg_text_cache, cfg_text_kv_lens,
                                       cfg_text_kv_indexes)
            v = v_text + cfg_text_scale * (v - v_text)
        if cfg_img_scale > 1.0:
            v_img = self._flow_branch(seq, lens, vae, text, cfg_img_indexes, cfg_img_cache, cfg_img_kv_lens,
                                      cfg_img_kv_indexes)
            v = v_img + cfg_img_scale * (v - v_img)
        return v


class Context:
    """The per-batch generation context as BAGEL's inferencer keeps it: cached lengths and the cache."""

    def __init__(self, model: Bagel, batch: int):
        self.model, self.kv_lens, self.cache = model, [0] * batch, NaiveCache(model.num_layers)

    def branch(self) -> "Context":
        """A copy for a CFG branch, as BAGEL's inferencer makes one: ``deepcopy`` of the cache and lengths."""
        import copy

        out = Context.__new__(Context)
        out.model, out.kv_lens, out.cache = self.model, list(self.kv_lens), copy.deepcopy(self.cache)
        return out

    def add_text(self, lengths: list[int], seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, 32, (sum(lengths),), generator=g)
        packed, cached = _packing(self.kv_lens, lengths)
        self.model.forward_cache_update_text(self.cache, ids, None, torch.tensor(lengths, dtype=torch.int),
                                             packed, cached, torch.tensor(self.kv_lens, dtype=torch.int))
        self.kv_lens = [a + b for a, b in zip(self.kv_lens, lengths)]

    def add_image(self, grids: list[tuple[int, int]], vae: bool = True, vit: bool = True, seed: int = 0):
        """One reference image per sequence (token grid ``grids[n]``): its VAE tokens, then its ViT tokens."""
        g = torch.Generator().manual_seed(seed)
        lens, img, text = _image_rows(grids)
        kv = torch.tensor(self.kv_lens, dtype=torch.int)
        packed, cached = _packing(self.kv_lens, lens)
        if vae:
            images = [torch.randn(h, w, self.model.vae2llm.in_features, generator=g) for h, w in grids]
            self.model.forward_cache_update_vae(None, self.cache, images, list(grids), None, None, img,
                                                None, text, None, torch.tensor(lens, dtype=torch.int), packed, kv, cached)
            self.kv_lens = [a + b for a, b in zip(self.kv_lens, lens)]
        if vit:
            kv = torch.tensor(self.kv_lens, dtype=torch.int)
            packed, cached = _packing(self.kv_lens, lens)
            side = self.model.vit_max_num_patch_per_side
            pos = torch.cat([(torch.arange(h)[:, None] * side + torch.arange(w)[None, :]).reshape(-1) for h, w in grids])
            tokens = torch.randn(len(img), self.model.vit_embed.in_features, generator=g)
            self.model.forward_cache_update_vit(self.cache, None, text, tokens, img, pos,
                                                torch.tensor([h * w for h, w in grids], dtype=torch.int), None,
                                                torch.tensor(lens, dtype=torch.int), packed, cached, kv)
            self.kv_lens = [a + b for a, b in zip(self.kv_lens, lens)]

    def generation_inputs(self, grids: list[tuple[int, int]], prefix: str = ""):
        lens, img, text = _image_rows(grids)
        packed, cached = _packing(self.kv_lens, lens)
        names = ("packed_indexes", "key_values_lens", "packed_key_value_indexes") if not prefix else \
            (f"{prefix}packed_query_indexes", f"{prefix}key_values_lens", f"{prefix}packed_key_value_indexes")
        out = dict(zip(names, (packed, torch.tensor(self.kv_lens, dtype=torch.int), cached)))
        out[f"{prefix}past_key_values"] = self.cache
        if not prefix:
            out.update(packed_vae_token_indexes=img, packed_text_indexes=text,
                       packed_seqlens=torch.tensor(lens, dtype=torch.int))
        return out
