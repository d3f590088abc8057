"""A complete tiny QwenImageEditPlusPipeline (tokenizer, processor, text encoder, VAE, transformer, all
local and random) generating from three PIL reference images with true CFG, DAR off and on."""

from __future__ import annotations

import pytest
import torch

import dar
from dar.tiny import build_tiny_qwen_image_edit_pipeline, synthetic_reference_images

NUM_LAYERS = 2
CALL = dict(prompt="put the red ball in front of the house, under the green star", negative_prompt="blurry",
            true_cfg_scale=4.0, num_inference_steps=2, height=32, width=32)
CFG = dar.DARConfig(num_samples=8, gamma=0.3, tau_high=0.6, tau_low=0.4)


@pytest.fixture(autouse=True)
def small_resize_targets(monkeypatch):
    # The pipeline resizes references to 384^2 (text encoder) and 1024^2 (VAE) whatever their size;
    # on CPU that makes each tiny step take minutes. 48^2 keeps the 3:2 reference non-square:
    # 64x64 and 64x32 pixels for the VAE, i.e. 8x8 and 4x8 (h x w) transformer tokens.
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as mod

    monkeypatch.setattr(mod, "CONDITION_IMAGE_SIZE", 56 * 56)
    monkeypatch.setattr(mod, "VAE_IMAGE_SIZE", 48 * 48)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_qwen_image_edit_pipeline(seed=0, num_layers=NUM_LAYERS)


@pytest.fixture(scope="module")
def refs():
    return synthetic_reference_images(96)  # 96x96, 144x96, 96x96


def _generate(pipe, refs):
    """Decoded PIL images and the final latents (captured at the last step, before decoding)."""
    final = {}

    def keep(pipeline, i, t, kwargs):
        final["latents"] = kwargs["latents"].clone()
        return {}

    images = pipe(image=refs, **CALL, generator=torch.Generator().manual_seed(0), callback_on_step_end=keep).images
    assert len(images) == 1 and images[0].size == (32, 32) and images[0].mode == "RGB"
    return final["latents"]


def test_dar_on_off_gamma0_and_recorder(pipe, refs, tmp_path):
    off = _generate(pipe, refs)
    rec = dar.Recorder()
    with dar.rebalanced(pipe, CFG, recorder=rec):
        on = _generate(pipe, refs)
    with dar.rebalanced(pipe, CFG, backend="reference"):
        on_ref = _generate(pipe, refs)
    with dar.rebalanced(pipe, CFG.replace(gamma=0.0)):
        zero = _generate(pipe, refs)
    again = _generate(pipe, refs)

    assert off.shape == on.shape == (1, 16, 16)  # (B, 4x4 packed tokens, 4 * z_dim)
    assert (on - off).abs().max() > 1e-3 * off.abs().max()  # DAR changes the generation
    torch.testing.assert_close(on, on_ref, rtol=1e-4, atol=1e-5)  # the torch backend matches the oracle
    torch.testing.assert_close(zero, off, rtol=0, atol=1e-5)  # gamma = 0 is DAR off
    assert torch.equal(again, off)  # leaving the context restores the pipeline exactly

    # Two denoising steps, every layer, and two rows per (step, layer): the conditional and the
    # unconditional (negative prompt) CFG passes, which the pipeline runs as separate calls.
    assert rec.steps == [0, 1] and rec.layers == list(range(NUM_LAYERS))
    for step in (0, 1):
        for layer in range(NUM_LAYERS):
            cond, uncond = rec.rows(step, layer)
            assert (cond.call, uncond.call) == (0, 1) and cond.batch_row == uncond.batch_row == 0
            # Token grids come from the pipeline's img_shapes, not from a guess.
            for entry in (cond, uncond):
                assert not entry.shapes_guessed
                assert [r.shape for r in entry.refs] == [(8, 8), (4, 8), (8, 8)]
                assert entry.num_samples == 8 and entry.frac_boosted > 0 and entry.frac_suppressed > 0
            # Different prompts, different attention.
            assert not torch.allclose(cond.refs[0].mass_before, uncond.refs[0].mass_before)
            shares = [r.total_before for r in cond.refs]
            assert all(0 < s < 1 for s in shares) and sum(shares) < 1  # text and generated keys take the rest
    table = rec.summary()
    assert len(table.splitlines()) == 2 + 2 * NUM_LAYERS * 2
    png = rec.plot_heatmaps(images=refs, path=tmp_path / "heatmaps.png", step=1, layers=[NUM_LAYERS - 1], row=1)
    assert (tmp_path / "heatmaps.png").stat().st_size > 20_000 and png.endswith("heatmaps.png")

