"""Tiny, local, random-weight Qwen-Image-Edit components for the demo and the tests (nothing downloaded).

`build_tiny_qwen_image_edit_pipeline` assembles a complete ``QwenImageEditPlusPipeline`` (tokenizer
trained in memory, Qwen2-VL processor, Qwen2.5-VL text encoder, Qwen-Image VAE, transformer and
scheduler) small enough to run CFG steps on CPU in about a second. `small_image_sizes` lowers the
pipeline's fixed resize targets, which otherwise blow every reference image up to 1024x1024.
`synthetic_reference_images` draws three distinct reference images.

Random weights exercise the mechanism (token layouts, masks, CFG, DAR on/off); they say nothing
about image quality.
"""

from __future__ import annotations

import contextlib

import torch

# The special tokens the Qwen-Image-Edit prompt template and the Qwen2-VL processor use.
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>")

_CORPUS = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image. Generate a new image that "
    "meets the user's requirements while maintaining consistency with the original input where appropriate.",
    "system user assistant Picture 1: Picture 2: Picture 3: Picture 4:",
    "Put the red ball from picture 1 next to the blue box from picture 2 on the green field of picture 3.",
    "a photo of a cat, a dog and a person in a garden; blurry, low quality, distorted",
)


def build_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer with the Qwen special tokens, trained in memory on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(QWEN_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(_CORPUS) * 4, trainer)
    return Qwen2TokenizerFast(tokenizer_object=tok, unk_token="<|endoftext|>", eos_token="<|im_end|>",
                              pad_token="<|endoftext|>")


def build_tiny_processor(tokenizer, patch_size: int = 14, merge_size: int = 2):
    """Qwen2VLProcessor with an image processor that keeps condition images small."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    unit = patch_size * merge_size
    image_processor = Qwen2VLImageProcessor(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
                                            min_pixels=unit * unit, max_pixels=4 * unit * unit)
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor())


def build_tiny_text_encoder(tokenizer, hidden_size: int = 32, seed: int = 0, patch_size: int = 14):
    """A 2-layer Qwen2.5-VL whose special-token ids match ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    heads, head_dim = 2, hidden_size // 2
    # mrope_section splits the rotary half-dimension over (time, height, width): it must sum to head_dim / 2.
    third = head_dim // 2 // 3
    mrope = [head_dim // 2 - 2 * third, third, third]
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=1,
                         max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
                         bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>")),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, patch_size=patch_size,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden_size,
                           fullatt_block_indexes=[0], window_size=112),
        **ids,
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_tiny_vae(z_dim: int = 4, seed: int = 0):
    """AutoencoderKLQwenImage with 4x spatial compression and a few channels."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=4 * z_dim, z_dim=z_dim, dim_mult=[1, 2, 4], num_res_blocks=1,
                                  temperal_downsample=[False, True],
                                  latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim).eval()


def build_tiny_transformer(*, z_dim: int = 4, text_dim: int = 32, num_layers: int = 2, num_heads: int = 2,
                           head_dim: int = 16, seed: int = 0):
    """QwenImageTransformer2DModel from a configuration, seeded random weights."""
    from diffusers import QwenImageTransformer2DModel

    # The rotary axes (frame, height, width) must fill the head dim.
    third = head_dim // 8 * 3
    axes = (head_dim - 2 * third, third, third)
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=4 * z_dim, out_channels=z_dim,
                                       num_layers=num_layers, attention_head_dim=head_dim,
                                       num_attention_heads=num_heads, joint_attention_dim=text_dim,
                                       axes_dims_rope=axes).eval()


def build_tiny_qwen_image_edit_pipeline(seed: int = 0, *, num_layers: int = 2, num_heads: int = 2,
                                        head_dim: int = 16):
    """A complete random-weight QwenImageEditPlusPipeline; use it inside `small_image_sizes`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline

    tokenizer = build_tiny_tokenizer()
    z_dim, text_dim = 4, 32
    pipe = QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=build_tiny_vae(z_dim, seed),
        text_encoder=build_tiny_text_encoder(tokenizer, text_dim, seed),
        tokenizer=tokenizer,
        processor=build_tiny_processor(tokenizer),
        transformer=build_tiny_transformer(z_dim=z_dim, text_dim=text_dim, num_layers=num_layers,
                                           num_heads=num_heads, head_dim=head_dim, seed=seed),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def small_image_sizes(condition_area: int = 56 * 56, vae_area: int = 32 * 32):
    """Temporarily lower the areas QwenImageEditPlusPipeline resizes reference images to.

    The pipeline resizes every reference to 384x384 for the text encoder and 1024x1024 for the VAE
    whatever its input size; at those sizes one tiny CPU step takes minutes.
    """
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as mod

    saved = mod.CONDITION_IMAGE_SIZE, mod.VAE_IMAGE_SIZE
    mod.CONDITION_IMAGE_SIZE, mod.VAE_IMAGE_SIZE = condition_area, vae_area
    try:
        yield
    finally:
        mod.CONDITION_IMAGE_SIZE, mod.VAE_IMAGE_SIZE = saved


def synthetic_reference_images(size: int = 256):
    """Three distinct PIL reference images: a red disc, a blue house (3:2 landscape) and a green star.

    Distinct colours and shapes make it easy to see, in the heatmaps, which image and which part of
    it the generated queries attend to.
    """
    import math

    from PIL import Image, ImageDraw

    s = int(size)
    if s < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    out = []

    disc = Image.new("RGB", (s, s), (236, 230, 214))
    d = ImageDraw.Draw(disc)
    d.ellipse((s * 0.18, s * 0.22, s * 0.72, s * 0.76), fill=(214, 38, 38), outline=(90, 10, 10), width=max(1, s // 64))
    d.rectangle((0, s * 0.86, s, s), fill=(120, 84, 50))  # a table edge
    out.append(disc)

    w = s * 3 // 2
    house = Image.new("RGB", (w, s), (176, 214, 240))
    d = ImageDraw.Draw(house)
    d.rectangle((0, s * 0.8, w, s), fill=(96, 160, 72))
    d.rectangle((w * 0.5, s * 0.42, w * 0.85, s * 0.8), fill=(40, 70, 190))
    d.polygon([(w * 0.46, s * 0.44), (w * 0.675, s * 0.18), (w * 0.89, s * 0.44)], fill=(150, 30, 40))
    d.rectangle((w * 0.64, s * 0.6, w * 0.71, s * 0.8), fill=(250, 220, 90))
    d.ellipse((w * 0.08, s * 0.08, w * 0.2, s * 0.26), fill=(255, 214, 0))  # sun
    out.append(house)

    star = Image.new("RGB", (s, s), (30, 30, 46))
    d = ImageDraw.Draw(star)
    cx, cy, r_out, r_in = s * 0.5, s * 0.52, s * 0.4, s * 0.16
    pts = [(cx + (r_out if i % 2 == 0 else r_in) * math.sin(i * math.pi / 5),
            cy - (r_out if i % 2 == 0 else r_in) * math.cos(i * math.pi / 5)) for i in range(10)]
    d.polygon(pts, fill=(60, 200, 90))
    out.append(star)
    return out


__all__ = ["QWEN_SPECIAL_TOKENS", "build_tiny_processor", "build_tiny_qwen_image_edit_pipeline", "build_tiny_text_encoder",
           "build_tiny_tokenizer", "build_tiny_transformer", "build_tiny_vae", "small_image_sizes",
           "synthetic_reference_images"]
