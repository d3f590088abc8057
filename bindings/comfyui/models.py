"""Which ComfyUI models DAR supports, and where their reference tokens sit in one forward.

Facts from ComfyUI's model code (read, never imported or copied; classes are recognised by name):

- ``BaseModel.apply_model(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)``
  is what the sampler calls once per batched forward; ``x`` is the noisy latent, ``c_crossattn``
  the text (FLUX.2's is already padded to 512 tokens by its ``extra_conds``), ``kwargs`` hold
  ``ref_latents`` (a list of reference latents, absent when the cond has none) and
  ``ref_latents_method``. A cond with references is never batched with one without (their
  ``ref_latents`` do not concatenate), so one layout holds for every row of the batch.
- Every image is padded to the patch size and cut into patches: ``ceil(h / p) * ceil(w / p)``
  tokens per frame (Qwen-Image's latents carry a frame axis of length 1 before ``h, w``).
- FLUX.1 / Kontext / FLUX.2 (``comfy.ldm.flux.model.Flux``) and Qwen-Image
  (``QwenImageTransformer2DModel``) attend over ``[text | target | ref 1 | ref 2 ...]`` in every
  block; Qwen-Image's ``index_timestep_zero`` doubles the timestep batch but not the tokens.
- OmniGen2 (``OmniGen2Transformer2DModel``) attends over ``[text | ref 1 | ... | target]`` in its
  main layers; its context, noise and reference refiners attend within the text, the target, or
  the references alone, so their calls are shorter than the joint sequence and stay plain.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from dar.layout import TokenLayout

# model_base class name -> (diffusion model class name, family, references before the target)
SUPPORTED = {
    "Flux": ("Flux", "FLUX.1 / Kontext", False),
    "Flux2": ("Flux", "FLUX.2", False),
    "QwenImage": ("QwenImageTransformer2DModel", "Qwen-Image / Qwen-Image-Edit", False),
    "Omnigen2": ("OmniGen2Transformer2DModel", "OmniGen2", True),
}
SUPPORTED_TEXT = "Qwen-Image(-Edit-2509/2511), FLUX.1 Kontext, FLUX.2 (dev, klein) and OmniGen2"


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # e.g. "FLUX.2"
    model_class: str  # ComfyUI's model_base class name
    patch_size: int
    refs_first: bool  # OmniGen2: references before the target


def describe(model) -> str:
    """``ModelClass (diffusion model DiffusionClass)`` for messages."""
    base = getattr(model, "model", model)
    inner = getattr(base, "diffusion_model", None)
    return f"{type(base).__name__}" + (f" (diffusion model {type(inner).__name__})" if inner is not None else "")


def family_of(model) -> Family:
    """The `Family` of a ComfyUI MODEL (a ModelPatcher, or its ``.model``); ValueError naming the model
    and the reason when DAR does not know where its reference tokens sit."""
    base = getattr(model, "model", model)
    name = type(base).__name__
    inner = getattr(base, "diffusion_model", None)
    entry = SUPPORTED.get(name)
    if entry is None:
        raise ValueError(f"DAR: {describe(model)} is not supported: DAR knows where the reference images' tokens "
                         f"sit only for {SUPPORTED_TEXT}")
    inner_name, family, refs_first = entry
    if inner is None or type(inner).__name__ != inner_name:
        raise ValueError(f"DAR: {describe(model)} is not supported: a {name} model whose diffusion model is not "
                         f"ComfyUI's {inner_name}, so its token order is unknown")
    p = getattr(inner, "patch_size", None)
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ValueError(f"DAR: {describe(model)} is not supported: its diffusion model has no integer patch_size")
    return Family(family, name, p, refs_first)


def image_tokens(latent, p: int, where: str) -> tuple[int, tuple[int, int]]:
    """Tokens of one latent ``(B, C, [T,] H, W)`` after padding to the patch size, and its (h, w) grid
    (frames folded into h)."""
    if not isinstance(latent, torch.Tensor) or latent.dim() < 4:
        raise ValueError(f"DAR: {where} must be a (B, C, [T,] H, W) latent tensor, got "
                         f"{tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__}")
    frames = math.prod(int(s) for s in latent.shape[2:-2])
    h, w = -(-int(latent.shape[-2]) // p), -(-int(latent.shape[-1]) // p)
    return frames * h * w, (frames * h, w)


@dataclasses.dataclass(frozen=True)
class Spans:
    """Where one forward's tokens sit in its joint sequence."""

    layout: TokenLayout
    joint: int  # the joint sequence's length (text + every image)
    ref_tokens: tuple[int, ...]  # per reference, in order
    text: int
    target: int


def spans(family: Family, x, c_crossattn, ref_latents) -> Spans | None:
    """The `Spans` of one ``apply_model`` call, or None for a forward without references (plain)."""
    if not ref_latents:
        return None
    if not isinstance(c_crossattn, torch.Tensor) or c_crossattn.dim() != 3:
        got = tuple(c_crossattn.shape) if isinstance(c_crossattn, torch.Tensor) else type(c_crossattn).__name__
        raise ValueError(f"DAR ({family.name}): the text conditioning must be a (B, L, C) tensor, got {got}")
    text = int(c_crossattn.shape[1])
    target, _ = image_tokens(x, family.patch_size, "the noisy latent")
    refs, grids = [], []
    for j, ref in enumerate(ref_latents):
        n, grid = image_tokens(ref, family.patch_size, f"ref_latents[{j}]")
        refs.append(n)
        grids.append(grid)
    if family.refs_first:  # [text | ref 1 | ... | target]
        at, ranges = text, []
        for n in refs:
            ranges.append((at, at + n))
            at += n
        gen = (at, at + target)
    else:  # [text | target | ref 1 | ...]
        gen = (text, text + target)
        at, ranges = gen[1], []
        for n in refs:
            ranges.append((at, at + n))
            at += n
    joint = text + target + sum(refs)
    return Spans(TokenLayout(ref=ranges, gen=[gen], image_shapes=grids), joint, tuple(refs), text, target)
