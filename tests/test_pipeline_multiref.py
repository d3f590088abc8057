"""Multi-reference diffusers pipelines, run end to end with DAR: tiny random components, CPU.

Each case runs the pipeline's own ``__call__`` (its image preprocessing, ids, masks, latents, KV
cache and denoising loop); only the text encoders are stood in for by fixed embeddings. The
transformers use the real attention head size with one head and one block of each kind. Per case:

- the layout of every attention call is written out here from the pipeline's token order (not
  taken from the binding), and every rebalanced call's output equals ``dar_attention(backend=
  "reference")`` on the q/k/v captured around the interceptor with that layout;
- the recorder's counts say how many calls were rebalanced / passed through, and why;
- gamma = 0 is bit-identical to DAR off, a tiny gamma is within rounding of it, gamma = 0.5 is not;
- after ``disable`` the pipeline's output is bit-identical to never enabling DAR.
"""

from __future__ import annotations

import contextlib

import numpy as np
import PIL.Image
import pytest
import torch

import dar
from dar import TokenLayout
from test_diffusers_binding import capture, plain, reference

CFG = dar.DARConfig(gamma=0.5, num_samples=8)
HEAD_DIM = 128  # FLUX.1 / FLUX.2 attention head size


def _image(h: int, w: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def _vae_kl(cls, **extra):
    # Three blocks: 4x spatial compression; the pipelines pack 2x2 latent patches into one token.
    return cls(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
               block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
               sample_size=32, **extra).eval()


def verify(run, pipe, namespaces, expected: dict, counts: dict):
    """The checks of the module docstring. ``run()`` runs the pipeline with fixed seeds and returns
    the final latents; ``namespaces``: the processors' module globals (one or a list); ``expected``:
    {(Lq, Lk): layouts}; ``counts``: the recorder's expected ``rebalanced`` count and pass reasons."""
    base = run()
    rec = dar.Recorder()
    with dar.rebalanced(pipe, CFG, recorder=rec), contextlib.ExitStack() as stack:
        calls = []
        for ns in namespaces if isinstance(namespaces, list) else [namespaces]:
            calls.append(stack.enter_context(capture(type("Case", (), {"namespace": ns,
                                                                       "name": "dispatch_attention_fn"}))))
        on = run()
    calls = [c for group in calls for c in group]
    got = rec.call_counts()
    assert got.rebalanced == counts["rebalanced"] and got.reasons == counts.get("passed", {}), str(got)
    rebalanced = [c for c in calls if (c.q.shape[2], c.k.shape[2]) in expected]
    assert len(rebalanced) == counts["rebalanced"]
    for c in rebalanced:
        want = reference(c, expected[(c.q.shape[2], c.k.shape[2])])
        torch.testing.assert_close(c.out, want, rtol=2e-5, atol=2e-5)
        assert (want - plain(c)).abs().max() > 1e-4  # the call really was rebalanced
    for c in calls:
        if (c.q.shape[2], c.k.shape[2]) not in expected:
            torch.testing.assert_close(c.out, plain(c), rtol=1e-5, atol=1e-6)
    assert (on - base).abs().max() > 1e-4
    with dar.rebalanced(pipe, CFG.replace(gamma=0.0)):
        assert torch.equal(run(), base)
    with dar.rebalanced(pipe, CFG.replace(gamma=1e-6)):
        torch.testing.assert_close(run(), base, rtol=1e-4, atol=1e-5)
    assert torch.equal(run(), base)  # disabled again: exactly the original pipeline


# ---- FLUX.2 [klein] with its reference KV cache ----------------------------------------------------------

def test_flux2_klein_kv_pipeline():
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    pytest.importorskip("diffusers.pipelines.flux2.pipeline_flux2_klein_kv")
    from diffusers.models.transformers import transformer_flux2
    from diffusers.pipelines.flux2.pipeline_flux2_klein_kv import Flux2KleinKVPipeline

    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(in_channels=16, num_layers=1, num_single_layers=1,
                                          attention_head_dim=HEAD_DIM, num_attention_heads=1, joint_attention_dim=32,
                                          timestep_guidance_channels=32, axes_dims_rope=(32, 32, 32, 32),
                                          guidance_embeds=False).eval()
    vae = _vae_kl(AutoencoderKLFlux2)
    pipe = Flux2KleinKVPipeline(FlowMatchEulerDiscreteScheduler(), vae, None, None, transformer)
    refs = [_image(64, 96, 1), _image(64, 64, 2)]
    prompt = torch.randn(1, 6, 32)

    def run():
        return pipe(image=refs, prompt_embeds=prompt, height=64, width=64, num_inference_steps=3,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).images

    # Tokens (8 px per token side): text 6; references 64x96 and 64x64 px -> 8x12 and 8x8 tokens; target 8x8.
    # Step 0 ("extract") runs [text, references, target]: the text and target queries attend to all
    # keys in one call, the references to themselves in another. Steps 1-2 ("cached") run queries
    # [text, target] against keys [text, cached references, target]. Both calls have the same layout.
    layout = TokenLayout(ref=[(6, 102), (102, 166)], gen=[(6, 70)], image_shapes=[(8, 12), (8, 8)])
    verify(run, pipe, vars(transformer_flux2), {(70, 230): [layout]},
           {"rebalanced": 2 * 3, "passed": {"reference self-attention of the KV-cache extract pass": 2}})


def test_flux2_kv_cache_filled_without_dar_warns():
    """A cached forward whose KV cache DAR did not see being filled cannot know the references: it
    warns (naming the model and why) instead of silently running plain."""
    from diffusers import Flux2Transformer2DModel
    kv = pytest.importorskip("diffusers.pipelines.flux2.pipeline_flux2_klein_kv")

    torch.manual_seed(0)
    model = Flux2Transformer2DModel(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                    num_attention_heads=1, joint_attention_dim=16, timestep_guidance_channels=16,
                                    axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False).eval()
    kv.Flux2KleinKVPipeline._set_kv_attn_processors(type("P", (), {"transformer": model})())
    ids = torch.cat([torch.tensor([[10, i, j, 0] for i in range(2) for j in range(2)]),
                     torch.tensor([[0, i, j, 0] for i in range(2) for j in range(2)])])[None]
    common = dict(timestep=torch.tensor([0.5]), encoder_hidden_states=torch.randn(1, 3, 16),
                  txt_ids=torch.zeros(1, 3, 4), return_dict=False)
    with torch.no_grad():
        _, cache = model(hidden_states=torch.randn(1, 8, 8), img_ids=ids, kv_cache_mode="extract", num_ref_tokens=4,
                         **common)
        with dar.rebalanced(model, CFG):
            with pytest.warns(UserWarning, match="Flux2Transformer2DModel.*cached reference images are unknown"):
                model(hidden_states=torch.randn(1, 4, 8), img_ids=ids[:, 4:], kv_cache=cache, kv_cache_mode="cached",
                      **common)


# ---- VisualCloze (a FLUX.1 Fill grid) -------------------------------------------------------------------

def _grid_layout(sizes, targets, n_txt, per):
    """Expected VisualCloze layout from the processor's cell sizes (pixels): each grid row is one
    token block in raster order over the row's concatenated width; the generated cells are the
    ``targets`` of the last row, and every run of other tokens of one row is one reference range."""
    kinds, hw, offset = [], [], n_txt
    for r, row in enumerate(sizes):
        h = row[0][0] // per
        widths = [w // per for _, w in row]
        for i in range(h):
            for c, w in enumerate(widths):
                is_gen = r == len(sizes) - 1 and targets[c]
                kinds += [("gen",) if is_gen else ("ref", r)] * w
                hw += [(i, j) for j in range(sum(widths[:c]), sum(widths[:c + 1]))]
    gen, ref, shapes = [], [], []
    start = 0
    for t in range(1, len(kinds) + 1):
        if t == len(kinds) or kinds[t] != kinds[start]:
            rng = (offset + start, offset + t)
            if kinds[start] == ("gen",):
                gen.append(rng)
            else:
                rows = {a for a, _ in hw[start:t]}
                ref.append(rng)
                shapes.append((len(rows), (t - start) // len(rows)))
            start = t
    return TokenLayout(ref=ref, gen=gen, image_shapes=shapes)


def test_visualcloze_pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    pytest.importorskip("diffusers.pipelines.visualcloze")
    from diffusers.models.transformers import transformer_flux
    from diffusers.pipelines.visualcloze.pipeline_visualcloze_generation import VisualClozeGenerationPipeline

    torch.manual_seed(0)
    vae = _vae_kl(AutoencoderKL, shift_factor=0.1, scaling_factor=0.5)
    # FLUX.1 Fill: [noisy latents (16), masked-image latents (16), mask (4 x 4 pixels x 2 x 2 packed)] per token.
    transformer = FluxTransformer2DModel(in_channels=16 + 16 + 64, out_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=HEAD_DIM, num_attention_heads=1, joint_attention_dim=32,
                                         pooled_projection_dim=16, axes_dims_rope=(16, 56, 56),
                                         guidance_embeds=True).eval()
    pipe = VisualClozeGenerationPipeline(FlowMatchEulerDiscreteScheduler(), vae, None, None, None, None, transformer,
                                         resolution=32)
    # The text encoders are stood in for by fixed embeddings (the pipeline rejects prompt_embeds
    # without prompts); every image goes through the pipeline's own processing.
    prompt, pooled = torch.randn(1, 5, 32), torch.randn(1, 16)
    pipe.encode_prompt = lambda **kw: (prompt, pooled, torch.zeros(5, 3))
    # One in-context example row and the query row, whose second cell is generated.
    grid = [[_image(32, 32, 1), _image(32, 32, 2)], [_image(48, 32, 3), None]]

    def run():
        return pipe(task_prompt="task", content_prompt="content", image=grid, num_inference_steps=2,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).images

    processed = pipe.image_processor.preprocess("task", "content", grid, vae_scale_factor=pipe.vae_scale_factor)
    sizes, targets = processed["image_size"][0], processed["target_position"][0]
    assert targets == [0, 1]
    per = 2 * pipe.vae_scale_factor  # pixels per token side: the VAE's factor times the 2x2 packing
    layout = _grid_layout(sizes, targets, 5, per)
    assert layout.gen and len(layout.ref) >= 2 and layout.ref[0][1] - layout.ref[0][0] == 4 * 8
    seq = 5 + sum((row[0][0] // per) * sum(w // per for _, w in row) for row in sizes)
    verify(run, pipe, vars(transformer_flux), {(seq, seq): [layout]}, {"rebalanced": 2 * 2})


# ---- Bria Fibo Edit (the FLUX id rule) -----------------------------------------------------------------

def test_bria_fibo_edit_ids():
    """Fibo Edit's ids (the pipeline's own helpers): the target on time plane 0, reference k on plane k,
    ids 2-D and shared by the classifier-free-guidance batch; the sequence is [text, target, refs]."""
    from diffusers.models.transformers import transformer_bria, transformer_bria_fibo
    BriaFiboTransformer2DModel = getattr(transformer_bria_fibo, "BriaFiboTransformer2DModel", None)
    if BriaFiboTransformer2DModel is None:
        pytest.skip("this diffusers has no Bria Fibo")
    BriaFiboEditPipeline = pytest.importorskip("diffusers.pipelines.bria_fibo.pipeline_bria_fibo_edit").BriaFiboEditPipeline

    torch.manual_seed(0)
    model = BriaFiboTransformer2DModel(in_channels=16, num_layers=1, num_single_layers=1,
                                       attention_head_dim=HEAD_DIM, num_attention_heads=1, joint_attention_dim=32,
                                       text_encoder_dim=16).eval()
    prep = BriaFiboEditPipeline._prepare_latent_image_ids
    target = prep(1, 4, 4, "cpu", torch.float32)
    refs = []
    for index, (h, w) in enumerate([(4, 6), (2, 4)], start=1):  # as prepare_reference_latents numbers them
        ids = prep(1, h, w, "cpu", torch.float32)
        ids[..., 0] = index
        refs.append(ids)
    img_ids = torch.cat([target, *refs], dim=0)
    n_txt = 5
    kwargs = dict(hidden_states=torch.randn(2, 48, 16), encoder_hidden_states=torch.randn(2, n_txt, 32),
                  text_encoder_layers=[torch.randn(2, n_txt, 16)] * 2, timestep=torch.tensor([0.5, 0.5]),
                  txt_ids=torch.zeros(n_txt, 3), img_ids=img_ids, return_dict=False)

    def run():
        with torch.no_grad():
            return model(**kwargs)[0]

    layout = TokenLayout(ref=[(21, 45), (45, 53)], gen=[(5, 21)], image_shapes=[(4, 6), (2, 4)])
    # The single-stream blocks use Bria's processor, from another module.
    verify(run, model, [vars(transformer_bria_fibo), vars(transformer_bria)], {(53, 53): [layout] * 2}, {"rebalanced": 2})


# ---- Qwen-Image 2.1 (block-causal prefill and KV cache: Lq != Lk) --------------------------------------

def test_qwenimage21_kv_cache():
    """Inputs laid out as QwenImage21Pipeline lays them out: the vision-language sequence holds text and
    one slot per 2x2 latent tokens of each condition image; the target's slots are appended; the
    denoising loop runs step 0 with kv_cache_mode="extract" and later steps with "cached"."""
    mod = pytest.importorskip("diffusers.models.transformers.transformer_qwenimage21", reason="this diffusers has no Qwen-Image 2.1")
    if not hasattr(mod, "QwenImage21Transformer2DModel"):
        pytest.skip("this diffusers has no Qwen-Image 2.1")

    torch.manual_seed(0)
    model = mod.QwenImage21Transformer2DModel(in_channels=16, out_channels=16, num_layers=2, attention_head_dim=HEAD_DIM,
                                              num_attention_heads=1, context_in_dim=32).eval()
    shapes = [(1, 4, 4), (1, 4, 6), (1, 4, 4)]  # two condition images, then the target
    # VLM sequence: text 3, image 1 (16 tokens = 4 slots), text 2, image 2 (6 slots), text 5; then the
    # pipeline appends the target's 4 slots.
    slots = [0] * 3 + [1] * 4 + [0] * 2 + [1] * 6 + [0] * 5
    img_mask = torch.tensor([slots + [1] * 4] * 2, dtype=torch.bool)
    text_mask = torch.ones(2, len(slots), dtype=torch.bool)
    text_mask[1, -2:] = False  # padded prompt in row 1
    inputs = dict(hidden_states=torch.randn(2, 16 + 24 + 16, 16), encoder_hidden_states=torch.randn(2, len(slots), 32),
                  img_shapes=[shapes] * 2, img_mask=img_mask, encoder_hidden_states_mask=text_mask, return_dict=False)

    def run():
        cache, outs = mod.QwenImage21KVCache(2), []
        with torch.no_grad():
            for step, mode in enumerate(["extract", "cached", "cached"]):
                outs.append(model(timestep=torch.tensor([0.9 - 0.3 * step] * 2), kv_cache=cache, kv_cache_mode=mode,
                                  **inputs)[0][:, -16:])
        return torch.cat(outs)

    # Joint sequence: text 3 | cond 1 [3, 19) | text 2 | cond 2 [21, 45) | text 5 | target [50, 66).
    # The target call: queries = the 16 target tokens, keys = all 66 (prefill or cache + target).
    layout = TokenLayout(ref=[(3, 19), (21, 45)], gen=[(0, 16)], image_shapes=[(4, 4), (4, 6)])
    verify(run, model, vars(mod), {(16, 66): [layout] * 2},
           {"rebalanced": 2 * 3,
            "passed": {"block-causal prefill of text / condition tokens (no generated queries)": 2 * 5}})


# ---- JoyImage Edit Plus ([target, references, text]) ----------------------------------------------------

def test_joyimage_edit_plus():
    """shape_list and the padded patch tensor as JoyImageEditPlusPipeline.prepare_latents builds them
    (target first, then each reference, rows padded to the longest), doubled for classifier-free
    guidance as the pipeline does."""
    mod = pytest.importorskip("diffusers.models.transformers.transformer_joyimage_edit_plus", reason="this diffusers has no JoyImage Edit Plus")
    if not hasattr(mod, "JoyImageEditPlusTransformer3DModel"):
        pytest.skip("this diffusers has no JoyImage Edit Plus")

    torch.manual_seed(0)
    model = mod.JoyImageEditPlusTransformer3DModel(in_channels=4, hidden_size=HEAD_DIM, num_attention_heads=1,
                                                   text_dim=32, num_layers=1, rope_dim_list=[16, 56, 56]).eval()
    shape_list = [[(1, 4, 4), (1, 4, 6), (1, 2, 4)], [(1, 4, 4), (1, 4, 4)]]  # row 1 has one reference
    shapes = shape_list * 2  # CFG: conditional rows, then unconditional rows
    n_img, n_txt = 16 + 24 + 8, 5
    text_mask = torch.ones(4, n_txt, dtype=torch.long)
    text_mask[2:, 3:] = 0  # shorter negative prompt
    kwargs = dict(hidden_states=torch.randn(4, n_img, 4, 1, 2, 2), timestep=torch.tensor([500.0] * 4),
                  encoder_hidden_states=torch.randn(4, n_txt, 32), encoder_hidden_states_mask=text_mask,
                  shape_list=shapes, return_dict=False)

    def run():
        with torch.no_grad():
            return model(**kwargs)[0]

    full = TokenLayout(ref=[(16, 40), (40, 48)], gen=[(0, 16)], image_shapes=[(4, 6), (2, 4)])
    short = TokenLayout(ref=[(16, 32)], gen=[(0, 16)], image_shapes=[(4, 4)])  # patches 32..48 are padding
    verify(run, model, vars(mod), {(n_img + n_txt, n_img + n_txt): [full, short, full, short]}, {"rebalanced": 1})


# ---- FLUX.3 (references on the L id axis) --------------------------------------------------------------

def test_flux3_references():
    """Ids from the FLUX.3 modular pipeline's own helpers: the image on l = 0, reference k on
    l = -(1 + k); text ids advance along l. Per-mode blocks attend within one kind of token."""
    mod = pytest.importorskip("diffusers.models.transformers.transformer_flux3", reason="this diffusers has no FLUX.3")
    if not hasattr(mod, "Flux3Transformer2DModel"):
        pytest.skip("this diffusers has no FLUX.3")
    before = pytest.importorskip("diffusers.modular_pipelines.flux3.before_denoise")

    torch.manual_seed(0)
    model = mod.Flux3Transformer2DModel(in_channels=8, cond_in_channels=8, num_layers=1, num_single_layers=1,
                                        attention_head_dim=HEAD_DIM, num_attention_heads=1, joint_attention_dim=32,
                                        timestep_channels=32).eval()
    n_txt = 5
    txt_ids = before.Flux3TextRoPEInputsStep._prepare_text_ids(torch.zeros(1, n_txt, 1))
    img_ids = before._prepare_image_ids(4, 4, 1.0)
    cond_ids = torch.cat([before._prepare_image_ids(h, w, 1.0, l_coord=-(1 + k))
                          for k, (h, w) in enumerate([(4, 6), (2, 4)])])
    kwargs = dict(hidden_states=torch.randn(2, 16, 8), encoder_hidden_states=torch.randn(2, n_txt, 32),
                  timestep=torch.tensor([0.5, 0.5]), img_ids=img_ids, txt_ids=txt_ids,
                  image_cond_hidden_states=torch.randn(2, 32, 8), image_cond_ids=cond_ids, return_dict=False)

    def run():
        with torch.no_grad():
            return model(**kwargs)[0]

    layout = TokenLayout(ref=[(21, 45), (45, 53)], gen=[(5, 21)], image_shapes=[(4, 6), (2, 4)])
    verify(run, model, vars(mod), {(53, 53): [layout] * 2},
           {"rebalanced": 1, "passed": {"per-mode block of the reference tokens (no generated queries)": 1,
                                        "per-mode block of the image tokens (no reference keys)": 1,
                                        "per-mode block of the text tokens": 1}})
