"""Automatic token layouts: where the reference and generated-image tokens sit, per batch row.

Each family function reads only what the transformer's ``forward`` already receives and returns a
`Derived` (for each attention-call shape ``(Lq, Lk)`` the forward makes: the layouts of its rows, or
why that call has nothing to rebalance), a `NoLayout` (this forward cannot be rebalanced, and why),
or None (this forward has no reference tokens). docs/diffusers.md tabulates the rules per family;
`NOT_SUPPORTED` below lists every other diffusers transformer with the reason.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import weakref

import torch

from dar.layout import TokenLayout

from ..runtime.outcomes import Derived, NoLayout, joint


def _cached(memo: dict, name: str, tensor: torch.Tensor, extra: tuple, compute):
    """``compute()`` once per (tensor, version, extra): host reads of ids and masks happen once per
    pipeline call (pipelines build these tensors once), not once per step. The memo holds the tensor
    itself, so its id cannot be reused by another tensor while the entry lives."""
    table = memo.setdefault(name, {})
    key = (id(tensor), tensor._version, tuple(tensor.shape)) + extra
    hit = table.get(key)
    if hit is not None and hit[0] is tensor:
        return hit[1]
    if len(table) >= 8:
        table.clear()
    value = compute()
    table[key] = (tensor, value)
    return value


def _as_shape_list(entry, where: str) -> list[tuple[int, int, int]]:
    # One row of img_shapes: a list of (frames, height, width), or a single such triple.
    if isinstance(entry, (tuple, list)) and len(entry) == 3 and all(isinstance(x, int) for x in entry):
        entry = [entry]
    if not isinstance(entry, (tuple, list)) or not entry:
        raise ValueError(f"{where} must be a non-empty list of (frames, height, width), got {entry!r}")
    out = []
    for j, fhw in enumerate(entry):
        if not isinstance(fhw, (tuple, list)) or len(fhw) != 3:
            raise ValueError(f"{where}[{j}] must be a (frames, height, width) triple, got {fhw!r}")
        out.append(tuple(int(x) for x in fhw))
    return out


def qwenimage(model, kw: dict, memo: dict):
    """Layouts of a Qwen-Image(-Edit, -Layered) forward from ``img_shapes`` and the text length."""
    shapes, hs, ehs = kw.get("img_shapes"), kw.get("hidden_states"), kw.get("encoder_hidden_states")
    if shapes is None or hs is None or ehs is None:
        return None
    batch, n_img = int(hs.shape[0]), int(hs.shape[1])
    n_txt = int(ehs.shape[1])  # padded text length: the processor puts every text slot before the image
    if not isinstance(shapes, (list, tuple)) or not shapes:
        raise ValueError(f"img_shapes must be a list with one entry per batch row, got {shapes!r}")
    if len(shapes) not in (1, batch):
        raise ValueError(f"img_shapes has {len(shapes)} entries but the batch has {batch} rows")
    layered = bool(getattr(getattr(model, "config", None), "use_layer3d_rope", False))
    layouts, any_ref = [], False
    for b in range(batch):
        where = f"img_shapes[{b if len(shapes) > 1 else 0}]"
        entries = _as_shape_list(shapes[b if len(shapes) > 1 else 0], where)
        sizes = [f * h * w for f, h, w in entries]
        if sum(sizes) != n_img:
            raise ValueError(f"{where} = {entries} describes {sum(sizes)} image tokens but hidden_states has {n_img}")
        n_gen = max(len(entries) - 1, 1) if layered else 1
        start = n_txt + sum(sizes[:n_gen])
        refs, grids = [], []
        for (f, h, w), size in zip(entries[n_gen:], sizes[n_gen:]):
            refs.append((start, start + size))
            grids.append((f * h, w))
            start += size
        any_ref |= bool(refs)
        layouts.append(TokenLayout(ref=refs, gen=[(n_txt, n_txt + sum(sizes[:n_gen]))], image_shapes=grids or None))
    if not any_ref:
        return None
    return joint(layouts, n_txt + n_img)


def _qwenimage21_blocks(img_mask: torch.Tensor, sizes: list[int]):
    """``(total, [(start, end) per image block])`` of a Qwen-Image 2.1 joint sequence, or a `NoLayout`.

    As the model does: every ``True`` slot of ``img_mask[0]`` stands for 4 latent tokens, and the
    image positions are filled block by block in ``img_shapes`` order."""
    slots = img_mask[0].detach().to("cpu", torch.bool).tolist()
    pos, image_positions = 0, []
    for is_image in slots:
        if is_image:
            image_positions.extend(range(pos, pos + 4))
            pos += 4
        else:
            pos += 1
    if sum(sizes) != len(image_positions):
        return NoLayout(f"img_shapes describes {sum(sizes)} image tokens but img_mask marks {len(image_positions)}")
    blocks, i = [], 0
    for size in sizes:
        run = image_positions[i:i + size]
        if run[-1] - run[0] + 1 != size:
            return NoLayout("an image block's tokens are not contiguous in the joint sequence")
        blocks.append((run[0], run[-1] + 1))
        i += size
    return pos, blocks


def qwenimage21(model, kw: dict, memo: dict):
    """Layouts of a Qwen-Image 2.1 forward from ``img_shapes`` (conditions first, target last) and
    ``img_mask``.

    The joint sequence interleaves text and condition images, with the target image last. The
    processors attend block-causally: one call per prefix segment (text run or condition image;
    nothing generated there) and one call whose queries are the target tokens and whose keys are the
    whole sequence; with ``kv_cache_mode="cached"`` only that call is made, the prefix keys coming
    from the cache. That call (``Lq`` = target tokens, ``Lk`` = whole sequence) is rebalanced."""
    shapes, img_mask, hs = kw.get("img_shapes"), kw.get("img_mask"), kw.get("hidden_states")
    if shapes is None or img_mask is None or hs is None or not shapes:
        return None
    entries = _as_shape_list(shapes[0], "img_shapes[0]")  # the model reads row 0: samples share a layout
    if len(entries) < 2:
        return None
    sizes = [f * h * w for f, h, w in entries]
    got = _cached(memo, "qwenimage21", img_mask, (tuple(sizes),), lambda: _qwenimage21_blocks(img_mask, sizes))
    if isinstance(got, NoLayout):
        return got
    total, blocks = got
    n_gen = sizes[-1]
    if blocks[-1] != (total - n_gen, total):
        return NoLayout("the target image is not the last block of the joint sequence")
    layout = TokenLayout(ref=blocks[:-1], gen=[(0, n_gen)], image_shapes=[(f * h, w) for f, h, w in entries[:-1]])
    # Prefix segments: runs of text or of one image block, each attending to the keys before its end.
    cuts = sorted({0, total - n_gen} | {b for blk in blocks[:-1] for b in blk})
    passes = tuple(((e - s, e), "block-causal prefill of text / condition tokens (no generated queries)")
                   for s, e in zip(cuts, cuts[1:]))
    return Derived((((n_gen, total), (layout,) * int(hs.shape[0])),), passes)


def joyimage_edit_plus(model, kw: dict, memo: dict):
    """Layouts of a JoyImage Edit Plus forward from ``shape_list``: per row the image part is
    ``[target, reference 1, ...]`` (``(t, h, w)`` patches each, padded to the batch's longest row),
    then the text."""
    shapes, hs, ehs = kw.get("shape_list"), kw.get("hidden_states"), kw.get("encoder_hidden_states")
    if shapes is None or hs is None or ehs is None:
        return None
    batch, n_img, n_txt = int(hs.shape[0]), int(hs.shape[1]), int(ehs.shape[1])
    if len(shapes) != batch:
        raise ValueError(f"shape_list has {len(shapes)} entries but the batch has {batch} rows")
    layouts = []
    for b in range(batch):
        entries = _as_shape_list(shapes[b], f"shape_list[{b}]")
        sizes = [t * h * w for t, h, w in entries]
        if sum(sizes) > n_img:
            raise ValueError(f"shape_list[{b}] = {entries} describes {sum(sizes)} patches but hidden_states has {n_img}")
        starts = [sum(sizes[:j]) for j in range(len(sizes))]
        layouts.append(TokenLayout(ref=[(s, s + n) for s, n in zip(starts[1:], sizes[1:])], gen=[(0, sizes[0])],
                                   image_shapes=[(t * h, w) for t, h, w in entries[1:]] or None))
    if not any(lay.ref for lay in layouts):
        return None
    return joint(layouts, n_img + n_txt)


def _flux3_refs(cond_ids: torch.Tensor, offset: int):
    ids = cond_ids[0] if cond_ids.dim() == 3 else cond_ids
    rows = ids.detach().to("cpu", torch.float64).tolist()
    refs, grids = [], []
    for s, e, _ in _runs([r[3] for r in rows]):  # reference k has l = -(1 + k)
        refs.append((offset + s, offset + e))
        grids.append(_grid([(r[1], r[2]) for r in rows], s, e))
    return tuple(refs), (tuple(grids) if all(g is not None for g in grids) else None)


def flux3(model, kw: dict, memo: dict):
    """Layouts of a FLUX.3 forward: per-mode blocks attend within the text, the image or the
    references alone (nothing to rebalance); the joint blocks attend over ``[text, image,
    references]``, each reference image one run of ``image_cond_ids``' L value."""
    hs, ehs, cond, cond_ids = (kw.get(k) for k in ("hidden_states", "encoder_hidden_states",
                                                   "image_cond_hidden_states", "image_cond_ids"))
    if hs is None or ehs is None or cond is None or cond_ids is None:
        return None
    n_txt, n_img, n_cond = int(ehs.shape[1]), int(hs.shape[1]), int(cond.shape[1])
    refs, grids = _cached(memo, "flux3", cond_ids, (n_txt + n_img,), lambda: _flux3_refs(cond_ids, n_txt + n_img))
    layout = TokenLayout(ref=refs, gen=[(n_txt, n_txt + n_img)], image_shapes=grids)
    seq = n_txt + n_img + n_cond
    passes = (((n_cond, n_cond), "per-mode block of the reference tokens (no generated queries)"),
              ((n_img, n_img), "per-mode block of the image tokens (no reference keys)"),
              ((n_txt, n_txt), "per-mode block of the text tokens"))
    return joint((layout,) * int(hs.shape[0]), seq, passes)


def _runs(values: list) -> list[tuple[int, int, object]]:
    """Maximal runs of equal consecutive values: ``(start, end, value)``."""
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            runs.append((start, i, values[start]))
            start = i
    return runs


def _grid(ids_hw: list, start: int, end: int):
    # (height, width) of a reference image from its tokens' distinct row / column ids.
    rows = {r for r, _ in ids_hw[start:end]}
    cols = {c for _, c in ids_hw[start:end]}
    return (len(rows), len(cols)) if len(rows) * len(cols) == end - start else None


def _row_layout(kinds: list, hw: list, offset: int) -> TokenLayout:
    """Layout of one row from a per-token kind: ``"gen"``, or any other hashable value for a
    reference token (each run of one value is one reference image)."""
    gen, refs, grids = [], [], []
    for s, e, kind in _runs(kinds):
        if kind == "gen":
            gen.append((offset + s, offset + e))
        else:
            refs.append((offset + s, offset + e))
            grids.append(_grid(hw, s, e))
    grids = grids if grids and all(g is not None for g in grids) else None
    return TokenLayout(ref=refs, gen=gen, image_shapes=grids)


def _id_rows(img_ids: torch.Tensor, batch: int, columns: int) -> list[list[list[float]]]:
    ids = img_ids if img_ids.dim() == 3 else img_ids[None]
    ids = ids[..., :columns].detach().to("cpu", torch.float64).tolist()
    if len(ids) not in (1, batch):
        raise ValueError(f"img_ids has {len(ids)} rows but the batch has {batch}")
    return ids if len(ids) == batch else [ids[0]] * batch


def _fill_mask_rows(model, hs: torch.Tensor):
    """Per row, per token: True where a FLUX Fill-style input marks the token as generated.

    Such models take ``[noisy latents, masked-image latents, mask]`` on the channel axis (VisualCloze
    uses FLUX.1 Fill); the mask channels follow the ``2 * out_channels`` latent channels. None when
    the model has no mask channels."""
    cfg = getattr(model, "config", None)
    c_in, c_out = getattr(cfg, "in_channels", None), getattr(cfg, "out_channels", None) or getattr(cfg, "in_channels", 0)
    if not c_in or c_in <= 2 * c_out or hs.shape[-1] != c_in:
        return None
    return (hs[..., 2 * c_out:].detach().float().mean(dim=-1) > 0.5).cpu().tolist()


def _flux_rows(model, hs, img_ids, n_txt: int):
    """One layout per row in joint ``[text, image]`` positions, or a `NoLayout`.

    FLUX.2 / FLUX.1 Kontext / Bria Fibo: tokens whose time id (first column) is 0 are generated; each
    run of one non-zero time value is a reference image. VisualCloze (a FLUX.1 Fill grid: every grid
    row has its own time id >= 1, none is 0): the generated cells are the tokens the Fill mask marks,
    every other run of one time value is a reference (an in-context row is one run; in the query row
    the condition cells and the target interleave per patch row, so each patch-row run is one range).
    """
    batch = int(hs.shape[0])
    rows = _id_rows(img_ids, batch, 3)
    if all(any(r[0] == 0 for r in row) for row in rows):
        return tuple(_row_layout(["gen" if r[0] == 0 else r[0] for r in row], [(r[1], r[2]) for r in row], n_txt)
                     for row in rows)
    masks = _fill_mask_rows(model, hs)
    if masks is None:
        return NoLayout(f"no image token has time id 0 and {type(model).__name__} has no mask channels, so the "
                        f"generated tokens cannot be told apart from the references")
    return tuple(_row_layout(["gen" if m else r[0] for r, m in zip(row, mask)], [(r[1], r[2]) for r in row], n_txt)
                 for row, mask in zip(rows, masks))


_FLUX2_CACHES = "flux2_kv_caches"  # memo entry: Flux2KVCache -> reference ranges relative to the text


def flux_ids(model, kw: dict, memo: dict):
    """Layouts of a FLUX.2 / FLUX.1 (Kontext, VisualCloze) / Bria Fibo forward from ``img_ids``."""
    img_ids, txt_ids, hs = kw.get("img_ids"), kw.get("txt_ids"), kw.get("hidden_states")
    if img_ids is None or txt_ids is None or hs is None:
        return None
    mode = kw.get("kv_cache_mode")
    if mode == "cached":
        return _flux2_cached(kw, memo)
    batch, n_txt, n_img = int(hs.shape[0]), int(txt_ids.shape[-2]), int(img_ids.shape[-2])
    if n_img != hs.shape[1]:
        raise ValueError(f"img_ids has {n_img} positions but hidden_states has {hs.shape[1]} tokens")
    # The Fill mask lives in hidden_states, which is new every step, but it is fixed for a pipeline
    # call, as are the ids: keyed on the ids tensor, it is read once per call.
    lays = _cached(memo, "flux_ids", img_ids, (n_txt, batch, tuple(hs.shape)),
                   lambda: _flux_rows(model, hs, img_ids, n_txt))
    if isinstance(lays, NoLayout):
        return lays
    if not any(lay.ref for lay in lays):
        return None
    n_ref = int(kw.get("num_ref_tokens") or 0)
    if mode == "extract" and n_ref > 0:
        return _flux2_extract(lays, n_txt, n_img, n_ref, memo)
    return joint(lays, n_txt + n_img)


def _flux2_extract(lays, n_txt: int, n_img: int, n_ref: int, memo: dict):
    """FLUX.2 ``kv_cache_mode="extract"``: the sequence is ``[text, references, image]``; text and
    image queries attend to every key in one call, the references to themselves in another."""
    ref_end = n_txt + n_ref
    for lay in lays:
        if any(s < n_txt or e > ref_end for s, e in lay.ref) or any(s < ref_end for s, _ in lay.gen):
            return NoLayout(f"the reference ids do not fill the first num_ref_tokens={n_ref} image tokens that the "
                            f"KV cache holds")
    queries = tuple(TokenLayout(ref=lay.ref, gen=[(s - n_ref, e - n_ref) for s, e in lay.gen],
                                image_shapes=lay.image_shapes) for lay in lays)
    memo["flux2_pending"] = tuple((tuple((s - n_txt, e - n_txt) for s, e in lay.ref), lay.image_shapes)
                                  for lay in lays)
    return Derived((((n_txt + n_img - n_ref, n_txt + n_img), queries),),
                   (((n_ref, n_ref), "reference self-attention of the KV-cache extract pass"),))


def flux2_after(model, kw: dict, memo: dict, output) -> None:
    """After an extract forward: remember which reference images the returned KV cache holds."""
    pending = memo.pop("flux2_pending", None)
    if pending is None and kw.get("kv_cache_mode") == "extract":
        flux_ids(model, kw, memo)  # an extract forward at an unselected step: its split is still needed
        pending = memo.pop("flux2_pending", None)
    cache = output[1] if isinstance(output, tuple) and len(output) > 1 else getattr(output, "kv_cache", None)
    if pending is not None and cache is not None:
        memo.setdefault(_FLUX2_CACHES, weakref.WeakKeyDictionary())[cache] = pending


def _flux2_cached(kw: dict, memo: dict):
    """FLUX.2 ``kv_cache_mode="cached"``: queries ``[text, image]``, keys ``[text, cached references,
    image]``; the reference split is the one its extract forward saw."""
    cache, hs, txt_ids = kw.get("kv_cache"), kw["hidden_states"], kw["txt_ids"]
    n_ref = int(getattr(cache, "num_ref_tokens", 0) or 0)
    if cache is None or n_ref == 0:
        return None
    batch, n_txt, n_img = int(hs.shape[0]), int(txt_ids.shape[-2]), int(hs.shape[1])
    rows = memo.get(_FLUX2_CACHES, {}).get(cache)
    if rows is None or len(rows) not in (1, batch):
        return NoLayout("the KV cache was filled while DAR was not enabled on this model (or for another batch), so "
                        "the cached reference images are unknown; enable DAR before the pipeline call")
    rows = rows if len(rows) == batch else rows * batch
    lays = tuple(TokenLayout(ref=[(n_txt + s, n_txt + e) for s, e in refs], gen=[(n_txt, n_txt + n_img)],
                             image_shapes=grids) for refs, grids in rows)
    return Derived((((n_txt + n_img, n_txt + n_ref + n_img), lays),))


_GLM_CACHES = "glm_kv_caches"  # memo entry: GlmImageKVCache -> per cached sample, its images in cache positions
_GLM_WRITE = "condition image written into the KV cache (no generated queries)"
_GLM_SKIP = "forward without the cached condition images (kv_caches mode 'skip': the unconditional pass)"


def _glm_cache(kw: dict):
    """``(kv_caches, its first layer's cache)`` of a GLM-Image forward, or None without a cache."""
    caches = kw.get("kv_caches")
    layers = getattr(caches, "caches", None)
    return (caches, layers[0]) if layers else None


def _glm_grid(model, hs: torch.Tensor) -> tuple[int, int]:
    p = int(model.config.patch_size)
    return int(hs.shape[-2]) // p, int(hs.shape[-1]) // p


def glm_image(model, kw: dict, memo: dict):
    """Layouts of a GLM-Image forward, by the mode of its ``kv_caches``.

    GlmImagePipeline runs one ``"write"`` forward per condition image (keys and values stored in the
    cache; `glm_image_after` records where each image lands), then denoises with ``"read"`` forwards
    (keys ``[cached images, text, image]``, queries ``[text, image]``: ``Lq != Lk``) and, for
    classifier-free guidance, ``"skip"`` forwards that do not see the cache."""
    hs, ehs, got = kw.get("hidden_states"), kw.get("encoder_hidden_states"), _glm_cache(kw)
    if hs is None or ehs is None or got is None:
        return None
    caches, layer = got
    h, w = _glm_grid(model, hs)
    n_txt, n_img = int(ehs.shape[1]), h * w
    seq = n_txt + n_img
    if layer.mode == "write":
        return Derived((), (((seq, seq), _GLM_WRITE),))
    if layer.mode == "skip":
        return Derived((), (((seq, seq), _GLM_SKIP),))
    if layer.mode != "read" or not layer.k_caches:
        return None
    cached = [int(k.shape[1]) for k in layer.k_caches]
    samples = memo.get(_GLM_CACHES, {}).get(caches)
    if samples is None or len(samples) < len(cached) or any(
            rec is None or not rec or rec[-1][1] != n for rec, n in zip(samples, cached)):
        return NoLayout("the KV cache was filled while DAR was not enabled on this model, so the cached condition "
                        "images are unknown; enable DAR before the pipeline call")
    batch, n = int(hs.shape[0]), len(cached)
    if n != 1 and batch % n:
        return NoLayout(f"{n} cached samples do not divide the batch of {batch}", warn=False)  # the model raises
    # As GlmImageLayerKVCache.get: one cached sample serves every row, else row b reads sample b // (batch / n).
    rows = [samples[0 if n == 1 else b // (batch // n)] for b in range(batch)]
    lays = tuple(TokenLayout(ref=[(s, e) for s, e, _ in rec], gen=[(n_txt, seq)],
                             image_shapes=[grid for _, _, grid in rec]) for rec in rows)
    return Derived((((seq, cached[0] + seq), lays),))


def glm_image_after(model, kw: dict, memo: dict, output) -> None:
    """After a ``"write"`` forward: record where its image landed in the cache of the current sample.

    The cache concatenates each write's ``[text, image]`` keys; a record that does not end where the
    cache did before this write (a cache cleared and refilled, or filled partly without DAR) is
    dropped, so a read never uses a stale split."""
    hs, ehs, got = kw.get("hidden_states"), kw.get("encoder_hidden_states"), _glm_cache(kw)
    if hs is None or ehs is None or got is None or got[1].mode != "write":
        return
    caches, layer = got
    idx = int(layer.current_sample_idx)
    if idx >= len(layer.k_caches):
        return
    h, w = _glm_grid(model, hs)
    end = int(layer.k_caches[idx].shape[1])
    start = end - h * w
    before = start - int(ehs.shape[1])
    samples = memo.setdefault(_GLM_CACHES, weakref.WeakKeyDictionary()).setdefault(caches, [])
    samples.extend([None] * (idx + 1 - len(samples)))
    rec = samples[idx]
    if before == 0:
        rec = []
    elif rec is None or not rec or rec[-1][1] != before:
        rec = None
    samples[idx] = None if rec is None else rec + [(start, end, (h, w))]


_REFINERS = "refiner layer before the joint layers (DAR rebalances the joint layers)"


def _zimage_pad(n: int, multiple: int) -> int:
    return n + (-n) % multiple


def _zimage_row(caps, xs, sigs, noise, p: int, pf: int, multiple: int):
    """``(TokenLayout, cap_len, x_len, sig_len)`` of one omni-mode row ``[captions, images, SigLIP]``.

    Each item is padded to ``multiple`` tokens (a missing image or SigLIP item is ``multiple`` padding
    tokens). The images whose noise-mask value is 1 are generated; those with 0 are references, each
    as its VAE tokens and, in the SigLIP part, its SigLIP tokens (two ranges per reference image)."""
    cap_len = sum(_zimage_pad(int(c.shape[0]), multiple) for c in caps)
    gen, refs, grids, pos = [], [], [], cap_len
    for x, noisy in zip(xs, noise):
        if x is None:
            pos += multiple
            continue
        f, h, w = int(x.shape[1]) // pf, int(x.shape[2]) // p, int(x.shape[3]) // p
        if noisy:
            gen.append((pos, pos + f * h * w))
        else:
            refs.append((pos, pos + f * h * w))
            grids.append((f * h, w))
        pos += _zimage_pad(f * h * w, multiple)
    x_len = pos - cap_len
    for sig, noisy in zip(sigs or (), noise):
        if sig is None:
            pos += multiple
            continue
        h, w = int(sig.shape[0]), int(sig.shape[1])
        if not noisy:
            refs.append((pos, pos + h * w))
            grids.append((h, w))
        pos += _zimage_pad(h * w, multiple)
    return TokenLayout(ref=refs, gen=gen, image_shapes=grids or None), cap_len, x_len, pos - cap_len - x_len


def zimage_omni(model, kw: dict, memo: dict):
    """Layouts of a Z-Image forward in omni mode (``x`` a list of image lists per sample).

    Each row is ``[captions, images, SigLIP tokens]``, every item padded to the model's multiple, rows
    padded to the longest (the model masks the padding). Before the joint layers, refiner layers
    attend within the images, the captions and the SigLIP tokens separately; they pass unchanged.
    Basic mode (one image per sample: text-to-image, img2img, inpainting) has no references."""
    xs, caps, sigs, noise = kw.get("x"), kw.get("cap_feats"), kw.get("siglip_feats"), kw.get("image_noise_mask")
    if not xs or not isinstance(xs[0], list) or caps is None or noise is None:
        return None
    multiple = int(getattr(sys.modules[type(model).__module__], "SEQ_MULTI_OF", 32))
    p, pf = int(kw.get("patch_size", 2)), int(kw.get("f_patch_size", 1))
    # As the model: SigLIP tokens join the sequence when the first sample has them and the model embeds them.
    with_sig = sigs is not None and sigs[0] is not None and getattr(model, "siglip_embedder", None) is not None
    rows = [_zimage_row(caps[i], xs[i], sigs[i] if with_sig else None, noise[i], p, pf, multiple)
            for i in range(len(xs))]
    if not any(lay.ref and lay.gen for lay, *_ in rows):
        return None
    seq = max(c + x + s for _, c, x, s in rows)
    passes = {(n, n): _REFINERS for n in (max(r[k] for r in rows) for k in (1, 2, 3)) if n}
    return joint([lay for lay, *_ in rows], seq, tuple(passes.items()))


def _merged_passes(*pairs) -> tuple:
    """``((Lq, Lk), reason)`` pairs with one entry per shape (reasons of coinciding shapes joined)."""
    out: dict = {}
    for shape, reason in pairs:
        if reason not in out.get(shape, ""):
            out[shape] = f"{out[shape]}; or {reason}" if shape in out else reason
    return tuple(out.items())


def _fibo2_gist_counts(model, mask, text_len: int, batch: int) -> tuple[int, ...]:
    cfg = model.config
    lengths = [text_len] * batch if mask is None else mask.sum(dim=1).tolist()
    count = sys.modules[type(model).__module__].compute_gist_count  # the model's own rule
    return tuple(count(lengths, min_gist=cfg.min_num_gist_tokens, max_gist=cfg.max_num_gist_tokens,
                       gist_step=cfg.gist_step, min_text_len=cfg.gist_min_text_len,
                       max_text_len=cfg.gist_max_text_len))


def bria_fibo2(model, kw: dict, memo: dict):
    """Layouts of a Bria Fibo 2.0 forward with ``context_latents`` (the images to edit).

    The joint sequence is ``[gist, image, context images]``, or ``[image, context images, gist]``
    when the batch's prompts get different gist counts (the shorter ones padded and masked). The
    gist count per prompt follows from its text length (``encoder_attention_mask``) by the model's
    own rule. The other calls (the noise refiner over ``[image, context]``, the Perceiver's gist
    tokens, the injection blocks' cross-attention to the text) pass unchanged."""
    hs, ehs, ctx = kw.get("hidden_states"), kw.get("encoder_hidden_states"), kw.get("context_latents")
    if hs is None or ehs is None or not ctx:
        return None
    p = int(model.config.patch_size)
    mask, batch, text_len = kw.get("encoder_attention_mask"), int(hs.shape[0]), int(ehs.shape[2])
    if mask is None:
        counts = _fibo2_gist_counts(model, None, text_len, batch)
    else:  # a host read of the mask, once per pipeline call (the pipeline builds it once)
        counts = _cached(memo, "fibo2_gist", mask, (text_len,),
                         lambda: _fibo2_gist_counts(model, mask, text_len, batch))
    n_gist = max(counts)
    n_img = (int(hs.shape[2]) // p) * (int(hs.shape[3]) // p)
    grids = [(int(c.shape[2]) // p, int(c.shape[3]) // p) for c in ctx]
    start = 0 if min(counts) < n_gist else n_gist
    refs, pos = [], start + n_img
    for h, w in grids:
        refs.append((pos, pos + h * w))
        pos += h * w
    seq = n_gist + pos - start
    if text_len == seq and model.config.injection_layer_ids:
        return NoLayout(f"the text has as many tokens ({text_len}) as the joint sequence, so the injection blocks' "
                        f"cross-attention to it cannot be told apart from the joint attention")
    layout = TokenLayout(ref=refs, gen=[(start, start + n_img)], image_shapes=grids)
    passes = _merged_passes(((seq - n_gist, seq - n_gist), _REFINERS),
                            ((n_gist, text_len), "Perceiver: the gist tokens read the text"),
                            ((n_gist, n_gist), "Perceiver: self-attention of the gist tokens"),
                            ((seq, text_len), "cross-attention of an injection block to the text (no reference keys)"))
    return joint((layout,) * batch, seq, passes)


def omnigen(model, kw: dict, memo: dict):
    """Layouts of an OmniGen forward from ``input_image_sizes`` and the output image size."""
    hs, input_ids, sizes = kw.get("hidden_states"), kw.get("input_ids"), kw.get("input_image_sizes")
    if hs is None or input_ids is None or not sizes:
        return None
    batch = int(hs.shape[0])
    p = int(model.config.patch_size)
    n_out = (int(hs.shape[-2]) // p) * (int(hs.shape[-1]) // p)
    seq_len = int(input_ids.shape[1]) + 1 + n_out  # condition tokens, one time token, output image
    latents = kw.get("input_img_latents") or []
    # The model fills the placeholders in dict order, one latent per range: recover each grid.
    grids, i = {}, 0
    for b, ranges in sizes.items():
        for s, e in ranges:
            lat = latents[i] if i < len(latents) else None
            grid = (int(lat.shape[-2]) // p, int(lat.shape[-1]) // p) if lat is not None else None
            grids[(int(b), int(s), int(e))] = grid if grid and math.prod(grid) == e - s else None
            i += 1
    layouts = []
    for b in range(batch):
        refs = sorted((int(s), int(e)) for s, e in sizes.get(b, ()))
        g = [grids.get((b, s, e)) for s, e in refs]
        layouts.append(TokenLayout(ref=refs, gen=[(seq_len - n_out, seq_len)],
                                   image_shapes=g if g and all(x is not None for x in g) else None))
    if not any(lay.ref for lay in layouts):
        return None
    return joint(layouts, seq_len)


@dataclasses.dataclass(frozen=True)
class Family:
    """An automatic layout rule: ``derive(model, call_kwargs, memo)`` and an optional
    ``after(model, call_kwargs, memo, output)`` run after every forward (for layouts that span
    forwards: a KV cache filled by one forward and read by later ones)."""

    name: str
    derive: object
    after: object = None


def _families():
    """``(module, class name, Family)`` for every supported transformer (modules missing from an
    older diffusers are skipped)."""
    return (
        ("transformer_qwenimage", "QwenImageTransformer2DModel", Family("qwenimage", qwenimage)),
        ("transformer_qwenimage21", "QwenImage21Transformer2DModel", Family("qwenimage21", qwenimage21)),
        ("transformer_joyimage_edit_plus", "JoyImageEditPlusTransformer3DModel",
         Family("joyimage_edit_plus", joyimage_edit_plus)),
        ("transformer_flux3", "Flux3Transformer2DModel", Family("flux3", flux3)),
        ("transformer_flux2", "Flux2Transformer2DModel", Family("flux2", flux_ids, flux2_after)),
        ("transformer_flux", "FluxTransformer2DModel", Family("flux", flux_ids)),
        ("transformer_bria_fibo", "BriaFiboTransformer2DModel", Family("bria_fibo", flux_ids)),
        ("transformer_glm_image", "GlmImageTransformer2DModel", Family("glm_image", glm_image, glm_image_after)),
        ("transformer_z_image", "ZImageTransformer2DModel", Family("zimage", zimage_omni)),
        ("transformer_bria_fibo2", "BriaFibo2Transformer2DModel", Family("bria_fibo2", bria_fibo2)),
        ("transformer_omnigen", "OmniGenTransformer2DModel", Family("omnigen", omnigen)),
    )


def _resolve(module: str, name: str):
    import importlib

    try:
        mod = importlib.import_module(f"diffusers.models.transformers.{module}")
    except ImportError:
        return None
    return getattr(mod, name, None)


SUPPORTED = tuple(name for _, name, _ in _families())


def family_of(model) -> Family | None:
    """The `Family` of a supported diffusers transformer, else None."""
    from .. import omnigen2  # OmniGen2 lives outside diffusers: recognised by class name, nothing imported

    if omnigen2.is_transformer(model):
        return Family("omnigen2", omnigen2.layouts)
    for module, name, fam in _families():
        cls = _resolve(module, name)
        if cls is not None and isinstance(model, cls):
            return fam
    return None


# Every other diffusers transformer whose attention DAR could intercept, with why it has no automatic
# layout. tests/bindings/test_diffusers_coverage.py enumerates the installed diffusers' transformers and fails
# on any class that is neither supported (with a layout test) nor listed here, so a new release's
# multi-reference model cannot go unnoticed. Entries for classes an older diffusers lacks are fine.
NOT_MULTI_REFERENCE = "not multi-reference"
NOT_YET = "not yet supported"
NOT_SUPPORTED: dict[str, tuple[str, str]] = {
    # Multi-reference models without a layout rule yet.
    "WanVACETransformer3DModel": (NOT_YET, "WanVACEPipeline prepends reference_images as latent frames but does not "
                                  "pass their count to the transformer, so the layout cannot be derived from its "
                                  "arguments; use layout_fn with the number of reference frames"),
    "LTX2VideoTransformer3DModel": (NOT_YET, "IC-LoRA reference_conditions are video conditions of their own kind; "
                                    "not analysed"),
    "Cosmos3OmniTransformer": (NOT_YET, "conditioning frames of one image or video; not analysed"),
    # One conditioning image or video: image-to-video, single-image edit, or a character reference.
    "CogVideoXTransformer3DModel": (NOT_MULTI_REFERENCE, "one conditioning image or video (latent frames / channels)"),
    "ConsisIDTransformer3DModel": (NOT_MULTI_REFERENCE, "one identity image"),
    "ChronoEditTransformer3DModel": (NOT_MULTI_REFERENCE, "one input image to edit"),
    "CosmosTransformer3DModel": (NOT_MULTI_REFERENCE, "text or one conditioning video / image"),
    "EasyAnimateTransformer3DModel": (NOT_MULTI_REFERENCE, "text, one control video or an inpainting mask"),
    "HeliosTransformer3DModel": (NOT_MULTI_REFERENCE, "text, one image or one video"),
    "HunyuanVideoTransformer3DModel": (NOT_MULTI_REFERENCE, "text or one conditioning image"),
    "HunyuanVideo15Transformer3DModel": (NOT_MULTI_REFERENCE, "text or one conditioning image"),
    "HunyuanVideoFramepackTransformer3DModel": (NOT_MULTI_REFERENCE, "one image plus the video's own history"),
    "JoyImageEditTransformer3DModel": (NOT_MULTI_REFERENCE, "one input image to edit"),
    "Kandinsky5Transformer3DModel": (NOT_MULTI_REFERENCE, "text or one conditioning image"),
    "Kandinsky6Transformer3DModel": (NOT_MULTI_REFERENCE, "text or one conditioning image"),
    "Kandinsky6SRTransformer3DModel": (NOT_MULTI_REFERENCE, "super-resolution of one video"),
    "LongCatImageTransformer2DModel": (NOT_MULTI_REFERENCE, "text or one input image to edit"),
    "LTXVideoTransformer3DModel": (NOT_MULTI_REFERENCE, "text or conditioning frames of the generated video"),
    "MotifVideoTransformer3DModel": (NOT_MULTI_REFERENCE, "text or one conditioning image"),
    "SanaVideoTransformer3DModel": (NOT_MULTI_REFERENCE, "text or one conditioning image"),
    "SanaWMTransformer3DModel": (NOT_MULTI_REFERENCE, "world model: the video's own context frames"),
    "SanaWMLTX2RefinerTransformer3DModel": (NOT_MULTI_REFERENCE, "refines one video"),
    "SkyReelsV2Transformer3DModel": (NOT_MULTI_REFERENCE, "text, one image or the video's own earlier frames"),
    "WanTransformer3DModel": (NOT_MULTI_REFERENCE, "text, one image (cross-attention and latent channels) or one "
                              "video"),
    "WanAnimateTransformer3DModel": (NOT_MULTI_REFERENCE, "one character image plus pose and face videos"),
    "WanAnimate2Transformer3DModel": (NOT_MULTI_REFERENCE, "one character image plus driving videos"),
    "AnyFlowTransformer3DModel": (NOT_MULTI_REFERENCE, "text or one conditioning image / video"),
    "AnyFlowFARTransformer3DModel": (NOT_MULTI_REFERENCE, "the video's own earlier frames"),
    "MiniMaxH3Transformer3DModel": (NOT_MULTI_REFERENCE, "no diffusers pipeline with reference images"),
    "CogView4Transformer2DModel": (NOT_MULTI_REFERENCE, "text, or one control image on the latent channels"),
    "ChromaTransformer2DModel": (NOT_MULTI_REFERENCE, "text; img2img / inpainting noise the input image"),
    "SD3Transformer2DModel": (NOT_MULTI_REFERENCE, "text; img2img / inpainting / ControlNet do not add reference "
                              "tokens"),
    "SanaTransformer2DModel": (NOT_MULTI_REFERENCE, "text; img2img noises the input image"),
    "HunyuanImageTransformer2DModel": (NOT_MULTI_REFERENCE, "text, or one image to refine"),
    # Text (or class / audio / other) to output only: no image tokens besides the generated ones.
    "AuraFlowTransformer2DModel": (NOT_MULTI_REFERENCE, "text-to-image"),
    "DiTTransformer2DModel": (NOT_MULTI_REFERENCE, "class-conditional image generation"),
    "HunyuanDiT2DModel": (NOT_MULTI_REFERENCE, "text-to-image"),
    "LatteTransformer3DModel": (NOT_MULTI_REFERENCE, "text-to-video"),
    "LuminaNextDiT2DModel": (NOT_MULTI_REFERENCE, "text-to-image"),
    "PixArtTransformer2DModel": (NOT_MULTI_REFERENCE, "text-to-image"),
    "Transformer2DModel": (NOT_MULTI_REFERENCE, "generic text/class-conditional image transformer"),
    "TransformerTemporalModel": (NOT_MULTI_REFERENCE, "temporal layers of UNet video models"),
    "PriorTransformer": (NOT_MULTI_REFERENCE, "predicts a CLIP image embedding; no image tokens"),
    "AllegroTransformer3DModel": (NOT_MULTI_REFERENCE, "text-to-video"),
    "MochiTransformer3DModel": (NOT_MULTI_REFERENCE, "text-to-video"),
    "BriaTransformer2DModel": (NOT_MULTI_REFERENCE, "text-to-image"),
    "CogView3PlusTransformer2DModel": (NOT_MULTI_REFERENCE, "text-to-image"),
    "ErnieImageTransformer2DModel": (NOT_MULTI_REFERENCE, "text-to-image"),
    "HiDreamImageTransformer2DModel": (NOT_MULTI_REFERENCE, "text-to-image"),
    "Ideogram4Transformer2DModel": (NOT_MULTI_REFERENCE, "text-to-image"),
    "Krea2Transformer2DModel": (NOT_MULTI_REFERENCE, "text-to-image"),
    "Lumina2Transformer2DModel": (NOT_MULTI_REFERENCE, "text-to-image"),
    "NucleusMoEImageTransformer2DModel": (NOT_MULTI_REFERENCE, "text-to-image"),
    "OvisImageTransformer2DModel": (NOT_MULTI_REFERENCE, "text-to-image"),
    "PRXTransformer2DModel": (NOT_MULTI_REFERENCE, "text-to-image"),
    "DreamLiteTransformer2DModel": (NOT_MULTI_REFERENCE, "no diffusers pipeline with reference images"),
    "AceStepTransformer1DModel": (NOT_MULTI_REFERENCE, "music generation"),
    "StableAudioDiTModel": (NOT_MULTI_REFERENCE, "audio generation"),
    "StableAudio3DiTModel": (NOT_MULTI_REFERENCE, "audio generation"),
    "LongCatAudioDiTTransformer": (NOT_MULTI_REFERENCE, "audio generation"),
    "MiniMaxMusic3Transformer1DModel": (NOT_MULTI_REFERENCE, "music generation"),
    "MiniMaxMusic3RVQDepthDecoder": (NOT_MULTI_REFERENCE, "music token decoder"),
    "T5FilmDecoder": (NOT_MULTI_REFERENCE, "spectrogram generation"),
    "RFD4ProteinaTransformer": (NOT_MULTI_REFERENCE, "protein structure generation"),
}


def unsupported_reason(model) -> str | None:
    """``"<status>: <reason>"`` from `NOT_SUPPORTED` for ``model``'s class (or a base class), else None."""
    for cls in type(model).__mro__:
        entry = NOT_SUPPORTED.get(cls.__name__)
        if entry is not None:
            return f"{entry[0]}: {entry[1]}"
    return None
