"""BAGEL through the stand-in model (tests/support/standins/bagel_like.py): reference keys tracked as the context is
written into the KV cache (VAE and ViT tokens, CFG copies included), denoising calls rebalanced and matching
the reference backend on the captured packed q/k/v; disable / gamma = 0 exact; steps; Recorder; errors."""

import warnings

import pytest
import torch

import dar
from dar.bindings import bagel
from tests.support.standins import bagel_like
from tests.support.standins.flash_attn_like import flash_attn_varlen_func as flash_stub

CFG = dar.DARConfig(gamma=0.5, num_samples=4, sampling="strided")
TEXT, PROMPT = [3, 4], [5, 2]
IMAGES = [[(2, 3), (3, 3)], [(2, 2), (2, 4)]]  # two reference images per sequence (token grids)
GEN = [(2, 2), (3, 2)]


def _model():
    torch.manual_seed(0)
    return bagel_like.Bagel().eval()


def _contexts(model):
    ctx = bagel_like.Context(model, 2)
    ctx.add_text(TEXT)
    for i, grids in enumerate(IMAGES):
        ctx.add_image(grids, seed=i)
    cfg_text = ctx.branch()  # the text-free CFG branch (a deepcopy): references, no prompt
    ctx.add_text(PROMPT, seed=1)
    cfg_img = bagel_like.Context(model, 2)  # the image-free CFG branch: text only
    cfg_img.add_text(TEXT)
    cfg_img.add_text(PROMPT, seed=1)
    return ctx, cfg_text, cfg_img


def _generate(model, ctx, cfg_text, cfg_img, steps=3):
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(sum(h * w for h, w in GEN), 4, generator=g)
    return model.generate_image(noise, num_timesteps=steps, cfg_text_scale=2.0, cfg_img_scale=1.5,
                                **ctx.generation_inputs(GEN), **cfg_text.generation_inputs(GEN, "cfg_text_"),
                                **cfg_img.generation_inputs(GEN, "cfg_img_"))


def _expected_layouts():
    """Per sequence: after its text, each image is [start, VAE tokens, end] then [start, ViT tokens, end]."""
    out = []
    for n in range(2):
        at, refs, shapes = TEXT[n], [], []
        for grids in IMAGES:
            h, w = grids[n]
            for _ in ("vae", "vit"):
                refs.append((at + 1, at + 1 + h * w))
                shapes.append((h, w))
                at += h * w + 2
        h, w = GEN[n]
        out.append(dar.TokenLayout(ref=refs, gen=[(1, 1 + h * w)], image_shapes=shapes))
    return out


def _capture(model):
    calls = []
    for layer in model.language_model.model.layers:
        layer.self_attn.calls = calls
    return calls


def test_recognised_by_class_and_routed():
    model = _model()
    assert bagel.is_bagel(model) and not bagel.is_bagel(torch.nn.Linear(2, 2))

    class Inferencer:  # BAGEL's InterleaveInferencer holds the model as .model
        pass

    inf = Inferencer()
    inf.model = model
    handle = dar.enable(inf, CFG)
    assert bagel.is_enabled(model) and handle.layer_names == [[f"layers.{i}.self_attn" for i in range(2)]]
    assert bagel_like.flash_attn_varlen_func is not flash_stub
    handle.disable()
    assert not bagel.is_enabled(model) and bagel_like.flash_attn_varlen_func is flash_stub
    assert not any(name in vars(model) for name in ("forward_cache_update_vae", "generate_image", "_forward_flow"))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_denoising_calls_match_reference_backend(backend):
    model = _model()
    with dar.rebalanced(model, CFG, backend=backend), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the image-free branch has no references (tested below)
        ctx, cfg_text, cfg_img = _contexts(model)
        calls = _capture(model)
        _generate(model, ctx, cfg_text, cfg_img, steps=2)
    lays = _expected_layouts()
    denoise = [c for c in calls if not c["update"]]
    assert len(denoise) == 3 * 2  # conditional, text-free, image-free branches x 2 layers, one step
    for c in denoise:
        args = (c["q"], c["k"], c["v"], c["cu_q"], c["cu_k"], c["max_q"], c["max_k"])
        assert not c["causal"] and c["mode"] == "gen"
        plain = flash_stub(*args)
        if c["cache"] is cfg_img.cache:
            assert torch.equal(c["out"], plain)
            continue
        expected = dar.dar_attention_varlen(*args, lays, CFG, backend="reference")
        torch.testing.assert_close(c["out"], expected, rtol=2e-5, atol=2e-5)
        assert (c["out"] - plain).abs().max() > 1e-4
    for c in calls:  # cache writes are never rebalanced
        if c["update"]:
            assert torch.equal(c["out"], flash_stub(c["q"], c["k"], c["v"], c["cu_q"], c["cu_k"], c["max_q"],
                                                    c["max_k"], causal=c["causal"]))


def test_disable_and_gamma_zero_are_exact():
    model = _model()
    with torch.no_grad():
        off = _generate(model, *_contexts(model))
        with dar.rebalanced(model, CFG.replace(gamma=0.0)), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zero = _generate(model, *_contexts(model))
        with dar.rebalanced(model, CFG), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            on = _generate(model, *_contexts(model))
        after = _generate(model, *_contexts(model))
    assert torch.equal(off, zero) and torch.equal(off, after)
    assert (off - on).abs().max() > 1e-5


def test_steps_recorder_and_image_free_branch():
    model = _model()
    rec = dar.Recorder()
    with dar.rebalanced(model, CFG, steps=[1], recorder=rec), torch.no_grad(), \
            warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        _generate(model, *_contexts(model), steps=4)
    assert rec.steps == [1] and rec.layers == [0, 1]
    rows = rec.rows(1, 0)  # conditional and text-free branches, two sequences each
    assert [(r.call, r.batch_row) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [ref.shape for ref in rows[1].refs] == [(3, 3), (3, 3), (2, 4), (2, 4)]
    said = [w for w in got if "no reference-image tokens" in str(w.message)]
    assert len(said) == 1 and "Bagel" in str(said[0].message)


def test_cache_written_before_enable_raises_naming_layout_fn():
    model = _model()
    contexts = _contexts(model)
    with dar.rebalanced(model, CFG), torch.no_grad(), pytest.raises(ValueError, match="layout_fn"):
        _generate(model, *contexts)


def test_user_layout_fn():
    model = _model()
    lays = _expected_layouts()
    seen = []

    def layout_fn(module, kw):
        seen.append(kw["mode"])
        return lays if kw["past_key_values"].seq_lens > 30 else None

    contexts = _contexts(model)  # written before enable: layout_fn takes over
    with dar.rebalanced(model, CFG, layout_fn=layout_fn), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calls = _capture(model)
        _generate(model, *contexts, steps=2)
    assert set(seen) == {"gen"}
    c = next(c for c in calls if c["cache"] is contexts[0].cache)
    args = (c["q"], c["k"], c["v"], c["cu_q"], c["cu_k"], c["max_q"], c["max_k"])
    torch.testing.assert_close(c["out"], dar.dar_attention_varlen(*args, lays, CFG, backend="reference"),
                               rtol=2e-5, atol=2e-5)


def test_rejects_flex_backend():
    with pytest.raises(ValueError, match="backend"):
        dar.enable(_model(), CFG, backend="flex")


def test_disable_restores_the_users_own_wrappers():
    """Issue 22 item 5: wrappers the user set on the instance before enable are back, the very same objects,
    after disable; one set on top of DAR's after enable stays and DAR's beneath it passes calls through."""
    model = _model()
    names = ("forward_cache_update_vae", "forward_cache_update_vit", "generate_image", "_forward_flow")
    seen = []
    for name in names[:3]:
        inner = getattr(model, name)

        def user_wrapper(*args, _inner=inner, _name=name, **kwargs):
            seen.append(_name)
            return _inner(*args, **kwargs)

        setattr(model, name, user_wrapper)
    before = {name: vars(model).get(name) for name in names}
    with torch.no_grad():
        off = _generate(model, *_contexts(model))
        handle = dar.enable(model, CFG)
        flow = model._forward_flow

        def on_top(*args, **kwargs):  # set after enable, over DAR's wrapper
            return flow(*args, **kwargs)

        model._forward_flow = on_top
        handle.disable()
        assert {name: vars(model).get(name) for name in names[:3]} == {n: before[n] for n in names[:3]}
        assert vars(model)["_forward_flow"] is on_top
        seen.clear()
        after = _generate(model, *_contexts(model))
    assert torch.equal(off, after)
    assert set(seen) == set(names[:3])
