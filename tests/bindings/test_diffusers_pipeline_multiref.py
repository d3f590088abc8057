"""Multi-reference diffusers pipelines, run end to end with DAR: tiny random components, CPU.

Most cases run the pipeline's own ``__call__`` (its image preprocessing, ids, masks, latents, KV
cache and denoising loop); only the text encoders (and GLM-Image's autoregressive prior) are stood in
for by fixed embeddings or tokens. Where ``__call__`` cannot run on a CPU-sized input, the case builds
the transformer's inputs with the pipeline's own helpers (JoyImage Edit Plus, Bria Fibo Edit, FLUX.3).
The transformers use the real attention head size with one head and one or two blocks of each kind.
Per case:

- the layout of every attention call is written out here from the pipeline's token order (not
  taken from the binding), and every rebalanced call's output equals ``dar_attention(backend=
  "reference")`` on the q/k/v captured around the interceptor with that layout;
- the recorder's counts say how many calls were rebalanced / passed through, and why;
- gamma = 0 is bit-identical to DAR off, a tiny gamma is within rounding of it, gamma = 0.5 is not;
- after ``disable`` the pipeline's output is bit-identical to never enabling DAR.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

import dar
from dar import TokenLayout
from tests.bindings.test_diffusers import capture, plain, reference

# One min-max group per reference range, so the checks tell apart layouts that cover the same keys
# but split them into images differently.
CFG = dar.DARConfig(gamma=0.5, num_samples=8, normalize="per_image")
HEAD_DIM = 128  # FLUX.1 / FLUX.2 attention head size


def _image(h: int, w: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def _vae_kl(cls, blocks=3, **extra):
    # ``blocks`` blocks: 2 ** (blocks - 1) spatial compression (4x by default); the pipelines pack 2x2
    # latent patches into one token.
    return cls(down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
               block_out_channels=(8,) * blocks, layers_per_block=1, latent_channels=4, norm_num_groups=4,
               sample_size=32, **extra).eval()


def verify(run, pipe, namespaces, expected: dict, counts: dict):
    """The checks of the module docstring. ``run()`` runs the pipeline with fixed seeds and returns
    the final latents; ``namespaces``: the processors' module globals (one or a list); ``expected``:
    {(Lq, Lk): layouts, or a function of the captured call giving them}; ``counts``: the recorder's
    expected ``rebalanced`` count and pass reasons."""
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
        layouts = expected[(c.q.shape[2], c.k.shape[2])]
        want = reference(c, layouts(c) if callable(layouts) else layouts, CFG)
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


def _flux2_kv_model():
    """A tiny FLUX.2 with the Klein KV processors, and its extract / cached forwards over 4 reference
    and 4 image tokens."""
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

    def extract():
        return model(hidden_states=torch.randn(1, 8, 8), img_ids=ids, kv_cache_mode="extract", num_ref_tokens=4,
                     **common)[1]

    def cached(cache):
        return model(hidden_states=torch.randn(1, 4, 8), img_ids=ids[:, 4:], kv_cache=cache, kv_cache_mode="cached",
                     **common)

    return model, extract, cached


def test_flux2_kv_cache_filled_without_dar_warns():
    """A cached forward whose KV cache DAR did not see being filled cannot know the references: it
    warns (naming the model and why) instead of silently running plain."""
    model, extract, cached = _flux2_kv_model()
    with torch.no_grad():
        cache = extract()
        with dar.rebalanced(model, CFG):
            with pytest.warns(UserWarning, match="Flux2Transformer2DModel.*cached reference images are unknown"):
                cached(cache)


def test_flux2_kv_cache_filled_at_an_unselected_step():
    """An extract forward at a step the filter leaves out still records what the cache holds, so the
    selected cached forwards are rebalanced."""
    model, extract, cached = _flux2_kv_model()
    rec = dar.Recorder()
    with torch.no_grad(), dar.rebalanced(model, CFG, steps=[1], recorder=rec), warnings.catch_warnings():
        warnings.simplefilter("error")
        cached(extract())  # a transformer on its own: one step per forward
    assert rec.call_counts().rebalanced == 2  # the double- and the single-stream block


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

class _VLProcessor:
    """What QwenImage21Pipeline.__init__ reads from its Qwen3-VL processor (the system prompt's token
    count and the image-pad token id); prompts are encoded by the stand-in below instead."""

    tokenizer = type("Tokenizer", (), {"encode": staticmethod(lambda text: [7])})()

    def apply_chat_template(self, messages, tokenize=True, return_dict=False):
        return [[1, 2, 3]]


def test_qwenimage21_kv_cache():
    """QwenImage21Pipeline's own loop: its resizing of the condition images, VAE latents packed before
    the target's, img_shapes, the target's slots appended to img_mask, the extract step and the cached
    steps, with guidance. Only the Qwen3-VL text encoder is stood in for: its sequence is text runs
    with, for each condition image, one image-pad slot per 2x2 group of its 16 px patches (32 px),
    as Qwen3-VL merges them; the prompt batch pads its second row at the end."""
    pipeline = pytest.importorskip("diffusers.pipelines.qwenimage21.pipeline_qwenimage21",
                                   reason="this diffusers has no Qwen-Image 2.1")
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage21 import AutoencoderKLQwenImage21
    from diffusers.models.transformers import transformer_qwenimage21 as mod

    torch.manual_seed(0)
    model = mod.QwenImage21Transformer2DModel(in_channels=4, out_channels=4, num_layers=2, attention_head_dim=HEAD_DIM,
                                              num_attention_heads=1, context_in_dim=32).eval()
    # Five levels, four of them downsampling: the 16x spatial compression the pipeline assumes.
    vae = AutoencoderKLQwenImage21(base_dim=8, decoder_base_dim=8, z_dim=4, dim_mult=[1] * 5, num_res_blocks=1,
                                   temperal_downsample=[False] * 4, latents_mean=[0.1] * 4, latents_std=[0.5] * 4).eval()
    pipe = pipeline.QwenImage21Pipeline(FlowMatchEulerDiscreteScheduler(), vae, None, _VLProcessor(), model)
    refs = [_image(64, 96, 1), _image(80, 80, 2)]
    runs = {"p": (3, 2, 5), "n": (2, 2, 2)}  # text tokens before, between and after the two images
    seen = []

    def encode_prompt(image=None, prompt=None, **_):
        seen.append([im.size for im in image])
        slots = [(w // 32) * (h // 32) for w, h in (im.size for im in image)]
        a, b, c = runs[prompt[0]]
        is_image = torch.tensor([0] * a + [1] * slots[0] + [0] * b + [1] * slots[1] + [0] * c, dtype=torch.bool)
        embeds = torch.randn(len(prompt), len(is_image), 32, generator=torch.Generator().manual_seed(a))
        mask = None
        if prompt[0] == "p":  # the second prompt is 2 tokens shorter: zero-padded at the end
            mask = torch.ones(len(prompt), len(is_image), dtype=torch.long)
            mask[1, -2:] = 0
            embeds[1, -2:] = 0
        return embeds, mask, is_image.expand(len(prompt), -1)

    pipe.encode_prompt = encode_prompt

    def run():
        return pipe(prompt=["p", "p"], negative_prompt=["n", "n"], true_cfg_scale=2.0, image=refs, height=64,
                    width=64, output_resolution=96, num_inference_steps=3, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    run()
    assert seen[0] == [(128, 64), (96, 96)]  # resized to about 96 x 96 px in multiples of 32
    # 16 px per token: the images are 4x8 = 32 tokens (8 slots) and 6x6 = 36 (9 slots), the target
    # 4x4 = 16, last. Prompt: text 3 | image 1 [3, 35) | text 2 | image 2 [37, 73) | text 5 | target
    # [78, 94). Negative: text 2 | [2, 34) | text 2 | [36, 72) | text 2 | target [74, 90). The target
    # call's queries are the 16 target tokens; its keys the whole sequence (prefill) or the cache and
    # the target (later steps).
    prompt_layout = TokenLayout(ref=[(3, 35), (37, 73)], gen=[(0, 16)], image_shapes=[(4, 8), (6, 6)])
    negative_layout = TokenLayout(ref=[(2, 34), (36, 72)], gen=[(0, 16)], image_shapes=[(4, 8), (6, 6)])
    verify(run, pipe, vars(mod), {(16, 94): [prompt_layout] * 2, (16, 90): [negative_layout] * 2},
           {"rebalanced": 3 * 2 * 2,  # steps x passes x blocks
            "passed": {"block-causal prefill of text / condition tokens (no generated queries)": 2 * 2 * 5}})


# ---- JoyImage Edit Plus ([target, references, text]) ----------------------------------------------------

def test_joyimage_edit_plus():
    """Patches and shape_list from JoyImageEditPlusPipeline.prepare_latents (its resizing of each
    reference to a megapixel bucket, the VAE, target first, then each reference, rows padded to the
    longest), doubled for classifier-free guidance with the negative rows first, as its loop does.
    The VAE unshuffles 16x16 pixel blocks before one downsampling level (32x in all), so a megapixel
    reference is a few hundred tokens and encodes fast."""
    pipeline = pytest.importorskip("diffusers.pipelines.joyimage.pipeline_joyimage_edit_plus",
                                   reason="this diffusers has no JoyImage Edit Plus")
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
    from diffusers.models.transformers import transformer_joyimage_edit_plus as mod

    torch.manual_seed(0)
    model = mod.JoyImageEditPlusTransformer3DModel(in_channels=4, hidden_size=HEAD_DIM, num_attention_heads=1,
                                                   text_dim=32, num_layers=1, rope_dim_list=[16, 56, 56]).eval()
    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
                           in_channels=3 * 16 * 16, out_channels=3 * 16 * 16, patch_size=16, latents_mean=[0.1] * 4,
                           latents_std=[0.5] * 4, scale_factor_spatial=32).eval()
    pipe = pipeline.JoyImageEditPlusPipeline(FlowMatchEulerDiscreteScheduler(), vae, None, None, model, None)
    # Row 0 edits two references, row 1 one; the target is 256 x 256 px.
    refs = [[_image(32, 48, 1), _image(16, 32, 2)], [_image(32, 32, 3)]]
    with torch.no_grad():
        latents, _, shape_list = pipe.prepare_latents(2, 4, 256, 256, torch.float32, "cpu",
                                                      torch.Generator().manual_seed(0), reference_images=refs)
    # Buckets: 832x1216, 704x1408 and 1024x1024 px; 64 px per patch side.
    assert shape_list == [[(1, 4, 4), (1, 13, 19), (1, 11, 22)], [(1, 4, 4), (1, 16, 16)]]
    n_img, n_txt = 16 + 247 + 242, 5  # the longest row; row 1's patches 272..505 are padding
    assert latents.shape[1] == n_img
    text_mask = torch.ones(2, n_txt, dtype=torch.long)
    negative_mask = text_mask.clone()
    negative_mask[:, 3:] = 0  # shorter negative prompt
    kwargs = dict(hidden_states=torch.cat([latents] * 2), timestep=torch.tensor([500.0] * 4),
                  encoder_hidden_states=torch.randn(4, n_txt, 32),
                  encoder_hidden_states_mask=torch.cat([negative_mask, text_mask]), shape_list=shape_list * 2,
                  return_dict=False)

    def run():
        with torch.no_grad():
            return model(**kwargs)[0]

    two = TokenLayout(ref=[(16, 263), (263, 505)], gen=[(0, 16)], image_shapes=[(13, 19), (11, 22)])
    one = TokenLayout(ref=[(16, 272)], gen=[(0, 16)], image_shapes=[(16, 16)])
    verify(run, model, vars(mod), {(n_img + n_txt, n_img + n_txt): [two, one, two, one]}, {"rebalanced": 1})


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


# ---- GLM-Image (condition images written into a KV cache by their own forwards) --------------------------

def test_glm_image_kv_cache_pipeline():
    """GlmImagePipeline's own loop: one "write" forward per condition image and prompt, then "read"
    forwards (keys = [cached images, text, image], queries = [text, image]) and "skip" forwards for
    the unconditional pass. The vision-language prior is stood in for by fixed prior tokens (the
    pipeline takes them, and the grids, as arguments), the text encoder by fixed embeddings."""
    glm = pytest.importorskip("diffusers.pipelines.glm_image.pipeline_glm_image", reason="this diffusers has no GLM-Image")
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from diffusers.models.transformers import transformer_glm_image as mod

    torch.manual_seed(0)
    transformer = mod.GlmImageTransformer2DModel(in_channels=4, out_channels=4, num_layers=1, attention_head_dim=40,
                                                 num_attention_heads=1, text_embed_dim=32, time_embed_dim=32,
                                                 condition_dim=16, prior_vq_quantizer_codebook_size=64).eval()
    vae = _vae_kl(AutoencoderKL, blocks=2, latents_mean=[0.1] * 4, latents_std=[0.5] * 4)  # 4 px per token side
    pipe = glm.GlmImagePipeline(None, None, None, None, vae, transformer, FlowMatchEulerDiscreteScheduler())
    # Two prompts, two condition images each, in different orders: 16x24 px -> 4x6 tokens, 16x16 -> 4x4.
    images = [[_image(16, 24, 1), _image(16, 16, 2)], [_image(16, 16, 3), _image(16, 24, 4)]]
    grids = [torch.tensor([[1, 4, 6], [1, 4, 4]]), torch.tensor([[1, 4, 4], [1, 4, 6]])]
    gen = torch.Generator().manual_seed(1)
    prior_images = [torch.randint(0, 64, (40,), generator=gen) for _ in range(2)]
    prior, prompt, negative = torch.randint(0, 64, (2, 16), generator=gen), torch.randn(2, 5, 32), torch.randn(2, 5, 32)

    def run(**kw):
        return pipe(image=images, prompt_embeds=prompt, negative_prompt_embeds=negative, prior_token_ids=prior,
                    prior_token_image_ids=prior_images, source_image_grid_thw=grids, height=16, width=16,
                    num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0),
                    **kw).images

    # Each row's cache holds its images in write order; the read call's keys are [cache 40, text 5,
    # target 16] (Lk = 61) and its queries [text 5, target 16] (Lq = 21).
    rows = [TokenLayout(ref=[(0, 24), (24, 40)], gen=[(5, 21)], image_shapes=[(4, 6), (4, 4)]),
            TokenLayout(ref=[(0, 16), (16, 40)], gen=[(5, 21)], image_shapes=[(4, 4), (4, 6)])]
    verify(run, pipe, vars(mod), {(21, 61): rows},
           {"rebalanced": 2, "passed": {"condition image written into the KV cache (no generated queries)": 4,
                                        "forward without the cached condition images (kv_caches mode 'skip': the "
                                        "unconditional pass)": 2}})

    # The writes run before the step counter restarts, so a step filter may leave them out: they are
    # still recorded, and the selected read is rebalanced without a warning. Two images per prompt
    # (no guidance): rows 0-1 read the first prompt's cached images, rows 2-3 the second's.
    rec = dar.Recorder()
    with dar.rebalanced(pipe, CFG, steps=[1], recorder=rec), warnings.catch_warnings(), \
            capture(type("Case", (), {"namespace": vars(mod), "name": "dispatch_attention_fn"})) as calls:
        warnings.simplefilter("error")
        run(num_images_per_prompt=2, guidance_scale=1.0)
    assert rec.call_counts().rebalanced == 1
    plain_read, rebalanced_read = [c for c in calls if (c.q.shape[2], c.k.shape[2]) == (21, 61)]
    torch.testing.assert_close(plain_read.out, plain(plain_read), rtol=1e-5, atol=1e-6)  # step 0: filtered out
    torch.testing.assert_close(rebalanced_read.out, reference(rebalanced_read, [rows[0]] * 2 + [rows[1]] * 2, CFG),
                               rtol=2e-5, atol=2e-5)


def test_glm_image_cache_filled_without_dar_warns():
    """A read forward whose cache DAR did not see being written cannot know the images: it warns."""
    mod = pytest.importorskip("diffusers.models.transformers.transformer_glm_image", reason="this diffusers has no GLM-Image")

    torch.manual_seed(0)
    model = mod.GlmImageTransformer2DModel(in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
                                           num_attention_heads=1, text_embed_dim=8, time_embed_dim=8, condition_dim=4,
                                           prior_vq_quantizer_codebook_size=8).eval()
    caches = mod.GlmImageKVCache(1)

    def forward(mode, n_txt):
        caches.set_mode(mode)
        return model(hidden_states=torch.randn(1, 4, 4, 4), encoder_hidden_states=torch.randn(1, n_txt, 8),
                     prior_token_id=torch.zeros(1, 4, dtype=torch.long), prior_token_drop=torch.zeros(1, 4, dtype=torch.bool),
                     timestep=torch.tensor([0.5]), target_size=torch.tensor([[16.0, 16.0]]),
                     crop_coords=torch.zeros(1, 2), kv_caches=caches, return_dict=False)

    with torch.no_grad():
        forward("write", 0)
        with dar.rebalanced(model, CFG):
            with pytest.warns(UserWarning, match="GlmImageTransformer2DModel.*cached condition images are unknown"):
                forward("read", 3)


# ---- Z-Image Omni (per-sample lists of captions, images and SigLIP tokens) ------------------------------

def test_zimage_omni_pipeline():
    """ZImageOmniPipeline's own loop: per sample, lists of caption segments (one before each image and
    one after the target), of image latents (the condition images, then the target) and of SigLIP
    features (the condition images, then None for the target); guidance batches the negative prompt.
    The text encoder is stood in for by fixed caption segments (the negative's second one longer, so
    the rows differ in length and the model masks the padding)."""
    omni = pytest.importorskip("diffusers.pipelines.z_image.pipeline_z_image_omni", reason="this diffusers has no Z-Image Omni")
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from diffusers.models.transformers import transformer_z_image as mod
    from transformers import Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel

    torch.manual_seed(0)
    # The real head size (3840 / 30 = 128, RoPE axes 32 + 48 + 48) with one head.
    transformer = mod.ZImageTransformer2DModel(in_channels=4, dim=128, n_layers=1, n_refiner_layers=1, n_heads=1,
                                               n_kv_heads=1, cap_feat_dim=32, siglip_feat_dim=16,
                                               axes_dims=[32, 48, 48], axes_lens=[256, 64, 64]).eval()
    # diffusers < 0.39 leaves the padding tokens uninitialised (torch.empty), so a run could read NaN
    # from them; later releases start them at zero, as here.
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if name.endswith("pad_token"):
                param.zero_()
    siglip = Siglip2VisionModel(Siglip2VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, patch_size=16, num_patches=16)).eval()
    processor = Siglip2ImageProcessor(patch_size=16, max_num_patches=16)
    # Four blocks (8x spatial compression): the pipeline takes images of at least 64 px a side. It
    # encodes in bfloat16.
    vae = _vae_kl(AutoencoderKL, blocks=4, shift_factor=0.1, scaling_factor=0.5).to(torch.bfloat16)
    pipe = omni.ZImageOmniPipeline(FlowMatchEulerDiscreteScheduler(), vae, None, None, transformer, siglip, processor)
    refs = [_image(64, 96, 1), _image(64, 64, 2)]
    prompt = [[torch.randn(n, 32) for n in (3, 4, 5, 6)]]
    negative = [[torch.randn(n, 32) for n in (3, 40, 5, 6)]]

    def run():
        return pipe(image=refs, prompt_embeds=prompt, negative_prompt_embeds=negative, height=64, width=64,
                    num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0)).images

    # Every item is padded to 32 tokens. Captions: 4 x 32 (the negative's: 32 + 64 + 32 + 32). Images
    # (16 px per token side): 64x96 -> 4x6 = 24, 64x64 -> 4x4 = 16, the target 16. SigLIP (16 px
    # patches, as its processor sizes them, up to 16 patches): SIG below, each padded to 32, the
    # target's a 32-token placeholder.
    sig = [tuple(int(x) for x in processor(images=[im], return_tensors="pt").spatial_shapes[0]) for im in refs]
    assert sig == [(3, 5), (4, 4)]

    def row(cap):
        # [captions | ref 1: 24 + 8 padding | ref 2: 16 + 16 | target: 16 + 16 | SigLIP 1: 15 + 17 | SigLIP 2: 16 + 16 | 32]
        return TokenLayout(ref=[(cap, cap + 24), (cap + 32, cap + 48), (cap + 96, cap + 111), (cap + 128, cap + 144)],
                           gen=[(cap + 64, cap + 80)], image_shapes=[(4, 6), (4, 4), (3, 5), (4, 4)])

    refiners = "refiner layer before the joint layers (DAR rebalances the joint layers)"
    verify(run, pipe, vars(mod), {(160 + 192, 160 + 192): [row(128), row(160)]},
           {"rebalanced": 1, "passed": {refiners: 3}})


# ---- Bria Fibo 2.0 ([gist, image, context images] or [image, context images, gist]) ---------------------

def test_bria_fibo2_edit_pipeline():
    """BriaFibo2Pipeline's own loop and image preprocessing, editing two images. The text encoder is
    stood in for by fixed embeddings: two prompts of different lengths (so their gist counts differ
    and the gist goes last) and an unpadded negative prompt (gist first), run as separate passes."""
    fibo2 = pytest.importorskip("diffusers.pipelines.bria_fibo2.pipeline_bria_fibo2", reason="this diffusers has no Fibo 2.0")
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler
    from diffusers.models.transformers import transformer_bria_fibo2 as mod

    torch.manual_seed(0)
    # The real head size (3584 / 28 = 128) with one head; block 1 reads the text (an injection block).
    # Gist counts 4..8 for texts of 4..12 tokens, in steps of 4.
    transformer = mod.BriaFibo2Transformer2DModel(in_channels=4, dim=128, n_layers=2, n_refiner_layers=1, n_heads=1,
                                                  cap_feat_dim=32, injection_layer_ids=(1,), perceiver_num_layers=1,
                                                  min_num_gist_tokens=4, max_num_gist_tokens=8, gist_step=4,
                                                  gist_min_text_len=4, gist_max_text_len=12).eval()
    pipe = fibo2.BriaFibo2Pipeline(transformer, FlowMatchEulerDiscreteScheduler(), _vae_kl(AutoencoderKLFlux2), None,
                                   None)
    pipe.default_sample_size = 12  # the area the images to edit are cropped to: (12 * 4 px) ** 2
    refs = [_image(48, 72, 1), _image(40, 40, 2)]
    prompt, negative = torch.randn(2, 2, 12, 32), torch.randn(2, 2, 6, 32)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 4:] = False  # the second prompt has 4 tokens: 4 gist tokens against the first one's 8

    def run():
        return pipe(image=refs, prompt_embeds=prompt, prompt_embeds_mask=mask, negative_prompt_embeds=negative,
                    height=32, width=32, num_inference_steps=1, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    crops, _ = pipe.image_processor.preprocess(refs, height=32, width=32, area=(12 * pipe.vae_scale_factor) ** 2)
    assert [tuple(c.shape[-2:]) for c in crops] == [(40, 56), (48, 48)]
    # 8 px per token side: target 32x32 -> 16 tokens, the crops 5x7 = 35 and 6x6 = 36, 8 gist tokens.
    gist_last = TokenLayout(ref=[(16, 51), (51, 87)], gen=[(0, 16)], image_shapes=[(5, 7), (6, 6)])
    gist_first = TokenLayout(ref=[(24, 59), (59, 95)], gen=[(8, 24)], image_shapes=[(5, 7), (6, 6)])
    # The prompt's pass masks the padded gist tokens; the negative's has no mask.
    verify(run, pipe, vars(mod), {(95, 95): lambda c: [gist_last if c.attn_mask is not None else gist_first] * 2},
           {"rebalanced": 2 * 2,  # passes x joint layers
            "passed": {"refiner layer before the joint layers (DAR rebalances the joint layers)": 2,
                       "Perceiver: the gist tokens read the text": 2,
                       "Perceiver: self-attention of the gist tokens": 2,
                       "cross-attention of an injection block to the text (no reference keys)": 2}})


def test_bria_fibo2_text_as_long_as_the_sequence_warns():
    """When the text has exactly as many tokens as the joint sequence, an injection block's
    cross-attention to it has the joint call's shape and cannot be told apart: the forward warns,
    naming the model and why, and runs unchanged."""
    mod = pytest.importorskip("diffusers.models.transformers.transformer_bria_fibo2", reason="this diffusers has no Fibo 2.0")

    torch.manual_seed(0)
    model = mod.BriaFibo2Transformer2DModel(in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=1,
                                            cap_feat_dim=8, injection_layer_ids=(1,), perceiver_num_layers=1,
                                            min_num_gist_tokens=4, max_num_gist_tokens=8, gist_step=4,
                                            gist_min_text_len=4, gist_max_text_len=12, axes_dims=(8, 12, 12)).eval()
    # 16 text tokens -> 8 gist tokens; 4 image and 4 context tokens: a joint sequence of 16.
    kwargs = dict(hidden_states=torch.randn(1, 4, 4, 4), timestep=torch.tensor([0.5]),
                  encoder_hidden_states=torch.randn(1, 2, 16, 8), context_latents=[torch.randn(1, 4, 4, 4)],
                  return_dict=False)
    with torch.no_grad():
        base = model(**kwargs)[0]
        with dar.rebalanced(model, CFG):
            with pytest.warns(UserWarning, match="BriaFibo2Transformer2DModel.*cannot be told apart"):
                out = model(**kwargs)[0]
    assert torch.equal(out, base)
