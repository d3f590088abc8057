"""Automatic token layouts: where the reference and generated-image tokens sit, per batch row.

Each family function reads only what the transformer's ``forward`` already receives and returns
``(layouts, seq_len)``: one `dar.TokenLayout` per batch row and the joint sequence length the
processors attend over, or None when the call has no reference tokens (it then runs unchanged).

- Qwen-Image (``QwenImageTransformer2DModel``): the joint sequence is ``[text, image]`` (the
  processor concatenates text first); the image part follows ``img_shapes[b]``: the first entry is
  the generated image, the rest are reference images (Qwen-Image-Layered, ``use_layer3d_rope``:
  every entry but the last is generated, the last is the condition image).
- FLUX.2 and FLUX.1 Kontext (``Flux2Transformer2DModel``, ``FluxTransformer2DModel``): the joint
  sequence is ``[txt_ids, img_ids]``; image tokens whose first id column (time) is 0 are generated,
  each run of tokens with one non-zero time value is one reference image.
- OmniGen (``OmniGenTransformer2DModel``): the sequence is ``[condition tokens, time token, output
  image]``; ``input_image_sizes[b]`` gives the reference images' ``[start, end)`` positions.
"""

from __future__ import annotations

import math

import torch

from dar.layout import TokenLayout

SUPPORTED = ("QwenImageTransformer2DModel", "Flux2Transformer2DModel", "FluxTransformer2DModel (Kontext ids)",
             "OmniGenTransformer2DModel")


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
    return tuple(layouts), n_txt + n_img


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


def _ids_row_layout(t: list, hw: list, n_txt: int) -> TokenLayout:
    gen, refs, grids = [], [], []
    for s, e, value in _runs(t):
        if value == 0:
            gen.append((n_txt + s, n_txt + e))
        else:
            refs.append((n_txt + s, n_txt + e))
            grids.append(_grid(hw, s, e))
    grids = grids if grids and all(g is not None for g in grids) else None
    return TokenLayout(ref=refs, gen=gen, image_shapes=grids)


def flux_ids(model, kw: dict, memo: dict):
    """Layouts of a FLUX.2 / FLUX.1 Kontext forward from ``img_ids`` (time column) and ``txt_ids``."""
    img_ids, txt_ids, hs = kw.get("img_ids"), kw.get("txt_ids"), kw.get("hidden_states")
    if img_ids is None or txt_ids is None or hs is None:
        return None
    if kw.get("kv_cache_mode") is not None:
        return None  # FLUX.2 KV-cache modes split the attention calls; they run unchanged (docs/diffusers.md)
    batch, n_txt, n_img = int(hs.shape[0]), int(txt_ids.shape[-2]), int(img_ids.shape[-2])
    if n_img != hs.shape[1]:
        raise ValueError(f"img_ids has {n_img} positions but hidden_states has {hs.shape[1]} tokens")
    # The ids are read on the host once per (tensor, version): pipelines build them once per call,
    # so later steps reuse the result without a device synchronisation.
    key = (id(img_ids), img_ids._version, tuple(img_ids.shape), n_txt, batch)
    if memo.get("ids_key") == key and memo.get("ids_ref") is img_ids:
        return memo["ids_value"]
    ids = img_ids if img_ids.dim() == 3 else img_ids[None]
    ids = ids[..., :3].detach().to("cpu", torch.float64).tolist()
    if len(ids) not in (1, batch):
        raise ValueError(f"img_ids has {len(ids)} rows but the batch has {batch}")
    rows = ids if len(ids) == batch else [ids[0]] * batch
    layouts = []
    for row in rows:
        layouts.append(_ids_row_layout([r[0] for r in row], [(r[1], r[2]) for r in row], n_txt))
    value = (tuple(layouts), n_txt + n_img) if any(lay.ref for lay in layouts) else None
    memo.update(ids_key=key, ids_ref=img_ids, ids_value=value)
    return value


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
    return tuple(layouts), seq_len


def family_of(model):
    """``(name, layout function)`` for a supported diffusers transformer, else None."""
    from diffusers.models.transformers import transformer_flux, transformer_flux2, transformer_omnigen, \
        transformer_qwenimage

    table = (
        (transformer_qwenimage.QwenImageTransformer2DModel, "qwenimage", qwenimage),
        (transformer_flux2.Flux2Transformer2DModel, "flux2", flux_ids),
        (transformer_flux.FluxTransformer2DModel, "flux", flux_ids),
        (transformer_omnigen.OmniGenTransformer2DModel, "omnigen", omnigen),
    )
    for cls, name, fn in table:
        if isinstance(model, cls):
            return name, fn
    return None
