"""Named benchmark shapes: the joint attention of real multi-image composition models, and a sweep.

Every shape is self-attention over one joint sequence laid out as ``[text, generated image,
reference image 1, ..., reference image n]`` (the order Qwen-Image-Edit and FLUX.2 use: text first,
then the noise latents with the reference latents appended) or, with ``refs_first``, as ``[text,
references, generated image]`` (OmniGen2, BAGEL), so ``Lq == Lk``. The ``dar-varlen-*``
implementations run the same tokens through the packed API, one sequence per batch row.
"""

from __future__ import annotations

import dataclasses
import fnmatch

import torch

from ..layout import TokenLayout

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# A 1024x1024 image is 64x64 = 4096 tokens in both models (VAE /8 or /16, then 2x2 or 1x1 patches).
IMAGE_1024 = 64 * 64


@dataclasses.dataclass(frozen=True)
class Shape:
    """One attention call: ``q (B, Hq, L, D)``, ``k, v (B, Hkv, L, D)`` and its token layout."""

    name: str
    family: str  # "qwen-image-edit", "flux2", "sweep", "cpu", "quick" or "quick-model"
    batch: int
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: str  # a key of DTYPES
    text: int  # text tokens at the start
    gen: int  # generated-image tokens after the text
    refs: tuple[int, ...]  # tokens of each reference image, after the generated image
    note: str = ""
    refs_first: bool = False  # [text, references, generated image] (OmniGen2, BAGEL) instead

    @property
    def seq(self) -> int:
        return self.text + self.gen + sum(self.refs)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def gqa(self) -> bool:
        return self.heads_q != self.heads_kv

    @property
    def flops(self) -> int:
        """Nominal attention FLOPs ``4 * B * Hq * Lq * Lk * D`` (QK^T and PV), DAR's scoring not counted."""
        return 4 * self.batch * self.heads_q * self.seq * self.seq * self.head_dim

    def layout(self) -> TokenLayout:
        start = self.text if self.refs_first else self.text + self.gen
        gen_start = self.text + sum(self.refs) if self.refs_first else self.text
        ref = []
        for n in self.refs:
            ref.append((start, start + n))
            start += n
        side = [int(round(n ** 0.5)) for n in self.refs]
        shapes = [(s, s) for s in side] if all(s * s == n for s, n in zip(side, self.refs)) else None
        return TokenLayout(ref=ref, gen=[(gen_start, gen_start + self.gen)], image_shapes=shapes)

    def describe(self) -> dict:
        lay = self.layout()
        return {
            "name": self.name, "family": self.family, "batch": self.batch, "heads_q": self.heads_q,
            "heads_kv": self.heads_kv, "head_dim": self.head_dim, "dtype": self.dtype, "seq": self.seq,
            "text": self.text, "gen": self.gen, "refs": list(self.refs), "flops": self.flops,
            "layout": {"ref": [list(r) for r in lay.ref], "gen": [list(g) for g in lay.gen]}, "note": self.note,
            "refs_first": self.refs_first,
        }


def qwen_image_edit(num_refs: int) -> Shape:
    # Qwen-Image-Edit(-2509): 60 MMDiT blocks, 24 heads x 128; ~200 prompt tokens; true CFG runs the
    # conditional and unconditional branch as a batch of 2; each 1024^2 image is 64x64 latent tokens.
    return Shape(f"qwen-edit-{num_refs}ref", "qwen-image-edit", batch=2, heads_q=24, heads_kv=24, head_dim=128,
                 dtype="bf16", text=200, gen=IMAGE_1024, refs=(IMAGE_1024,) * num_refs,
                 note=f"Qwen-Image-Edit joint attention, 1024^2 output + {num_refs} reference(s), CFG batch 2")


def flux2(num_refs: int) -> Shape:
    # FLUX.2 [dev]: diffusers Flux2Transformer2DModel defaults are 48 heads x 128; 512 text tokens
    # (max_sequence_length); guidance-distilled, so batch 1; reference latents appended after the noise.
    return Shape(f"flux2-{num_refs}ref", "flux2", batch=1, heads_q=48, heads_kv=48, head_dim=128, dtype="bf16",
                 text=512, gen=IMAGE_1024, refs=(IMAGE_1024,) * num_refs,
                 note=f"FLUX.2 joint attention, 1024^2 output + {num_refs} reference(s)")


def omnigen2(num_refs: int) -> Shape:
    # OmniGen2: hidden 2520, 21 query heads, 7 KV heads -> head dim 120; its main layers attend over
    # [text, references, target]; a 1024^2 image is (1024/8/2)^2 = 4096 tokens; CFG passes are separate
    # transformer calls (batch 1). ~256 text tokens from its Qwen2.5-VL encoder.
    return Shape(f"omnigen2-{num_refs}ref", "omnigen2", batch=1, heads_q=21, heads_kv=7, head_dim=120, dtype="bf16",
                 text=256, gen=IMAGE_1024, refs=(IMAGE_1024,) * num_refs, refs_first=True,
                 note=f"OmniGen2 joint attention (D=120, GQA 21/7), 1024^2 output + {num_refs} reference(s)")


def bagel_packed(num_refs: int) -> Shape:
    # BAGEL-like packed batch: Qwen2-7B attention (28 query heads, 4 KV heads, D = 128); 4 sequences, each
    # [prompt, per reference its VAE tokens (1024^2 / 16^2 = 4096) and ViT tokens (980^2 / 14^2 = 4900),
    # generated image 4096]. Self-attention over the whole sequence (BAGEL's denoising call has only the
    # generated tokens as queries; the harness times Lq == Lk). Run with dar-varlen-* to time it packed.
    return Shape(f"bagel-{num_refs}ref-x4", "bagel", batch=4, heads_q=28, heads_kv=4, head_dim=128, dtype="bf16",
                 text=64, gen=IMAGE_1024, refs=(IMAGE_1024, 70 * 70) * num_refs, refs_first=True,
                 note=f"BAGEL-like packed batch of 4 sequences with {num_refs} reference(s) (VAE + ViT tokens)")


def sweep_shape(seq: int, head_dim: int, dtype: str, gqa: bool, family: str = "sweep", heads: int = 16,
                batch: int = 1) -> Shape:
    """L tokens: 1/16 text, then half of the rest generated, the remainder two equal references."""
    text = seq // 16
    gen = (seq - text) // 2
    r0 = (seq - text - gen) // 2
    refs = (r0, seq - text - gen - r0)
    hkv = heads // 4 if gqa else heads
    name = f"{family}-L{seq}-d{head_dim}-{dtype}-{'gqa' if gqa else 'mha'}"
    return Shape(name, family, batch=batch, heads_q=heads, heads_kv=hkv, head_dim=head_dim, dtype=dtype,
                 text=text, gen=gen, refs=refs)


SWEEP_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)


def _build_presets() -> dict[str, list[Shape]]:
    presets = {
        "qwen-edit": [qwen_image_edit(n) for n in (1, 2, 3)],
        "flux2": [flux2(n) for n in (1, 2, 3, 4)],
        "omnigen2": [omnigen2(n) for n in (1, 2, 3)],
        "bagel": [bagel_packed(n) for n in (1, 2)],
        "sweep": [sweep_shape(L, d, dt, g) for d in (64, 128) for dt in ("fp16", "bf16") for g in (False, True)
                  for L in SWEEP_LENGTHS],
        # Tiny CPU shapes for the smoke run (the triton backend runs under Triton's interpreter
        # there, seconds per call): one model-like layout, a two-point MHA line, GQA, bf16.
        "quick": [
            Shape("quick-qwen-2ref", "quick-model", batch=2, heads_q=2, heads_kv=2, head_dim=16, dtype="fp32", text=4,
                  gen=36, refs=(36, 36), note="Qwen-Image-Edit-like layout (text, 6x6 output, two 6x6 refs), tiny"),
            sweep_shape(64, 16, "fp32", False, family="quick", heads=2),
            sweep_shape(128, 16, "fp32", False, family="quick", heads=2),
            sweep_shape(64, 16, "fp32", True, family="quick", heads=4),
            sweep_shape(64, 32, "bf16", False, family="quick", heads=2),
        ],
    }
    # Issue 14's CPU measurement: B 1, 8 heads x 64, fp32, text 128 + generated image + 3 references
    # of the same size (1024 tokens each: L 4224; 2048 each: L 8320).
    presets["cpu"] = [
        Shape(f"cpu-L{128 + 4 * n}", "cpu", batch=1, heads_q=8, heads_kv=8, head_dim=64, dtype="fp32", text=128,
              gen=n, refs=(n,) * 3, note="issue 14's CPU shape: text 128, generated image, 3 references")
        for n in (1024, 2048)
    ]
    presets["models"] = presets["qwen-edit"] + presets["flux2"] + presets["omnigen2"] + presets["bagel"]
    presets["all"] = presets["models"] + presets["sweep"]
    return presets


PRESETS = _build_presets()
ALL_SHAPES = {s.name: s for group in PRESETS.values() for s in group}


def resolve(names: list[str]) -> list[Shape]:
    """Shapes from preset names, shape names or shell-style patterns over shape names (in order, no repeats)."""
    out: list[Shape] = []
    for name in names:
        if name in PRESETS:
            found = PRESETS[name]
        elif name in ALL_SHAPES:
            found = [ALL_SHAPES[name]]
        else:
            found = [s for n, s in ALL_SHAPES.items() if fnmatch.fnmatchcase(n, name)]
        if not found:
            raise ValueError(f"--preset {name!r} matches no preset or shape; presets are {sorted(PRESETS)}, "
                             f"shapes look like {sorted(ALL_SHAPES)[:3]}... (see `dar bench --list`)")
        out.extend(s for s in found if s not in out)
    return out
