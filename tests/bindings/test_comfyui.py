"""The ComfyUI node pack (dar.bindings.comfyui) against the stand-in of ComfyUI's calling contract
(tests/support/standins/comfyui_like.py): layouts per model family, DAR vs the reference backend and an
independent float64 oracle, gamma = 0 bit-identical, the original MODEL unchanged, a custom attention
func honoured, an existing override chained, an unsupported model refused by name, the node."""

import warnings

import pytest
import torch

import dar
from tests.support import oracle
from dar.bindings import comfyui
from dar.bindings.comfyui import models as cmodels
from tests.support.standins import comfyui_like as cl

CFG = dar.DARConfig(gamma=0.5, num_samples=8, sampling="strided")
FAMILIES = {"Flux": cl.FluxModel, "Flux2": cl.Flux2, "QwenImage": cl.QwenImage, "Omnigen2": cl.Omnigen2}
REFS = [((6, 4), (3, 5)), ((4, 4),), ((2, 3), (5, 5), (3, 3))]


@pytest.fixture(autouse=True)
def _default_attention():
    cl.selected.clear()
    yield
    cl.selected.clear()
    cl.contract["reference_image_num_tokens"] = False


def _model(name):
    torch.manual_seed(0)
    m = FAMILIES[name](**({"patch_size": 1} if name == "Flux2" else {})).double()
    with torch.no_grad():
        m.diffusion_model.img_in(torch.zeros(1, 4 * m.diffusion_model.patch_size ** 2, dtype=torch.float64))
    return cl.ModelPatcher(m)


def _inputs(name, refs=REFS[0], hw=(5, 8), text=7):
    g = torch.Generator().manual_seed(1)
    shape = (lambda h, w: (2, 4, 1, h, w)) if name == "QwenImage" else (lambda h, w: (2, 4, h, w))
    x = torch.randn(shape(*hw), generator=g, dtype=torch.float64)
    ctx = torch.randn(2, text, 6, generator=g, dtype=torch.float64)
    rl = [torch.randn(shape(h, w), generator=g, dtype=torch.float64) for h, w in refs] if refs else None
    return x, torch.full((2,), 0.5, dtype=torch.float64), ctx, rl


def _expected(name, x, ctx, rl):
    """[text | target | refs] (FLUX, Qwen-Image) or [text | refs | target] (OmniGen2), written out here."""
    p = 1 if name == "Flux2" else 2
    text, tgt = cl.text_tokens(name, ctx.shape[1]), cl.image_tokens(x, p)
    sizes = [cl.image_tokens(r, p) for r in rl]
    at = text if name == "Omnigen2" else text + tgt
    ranges = []
    for n in sizes:
        ranges.append((at, at + n))
        at += n
    gen = (at, at + tgt) if name == "Omnigen2" else (text, text + tgt)
    return dar.TokenLayout(ref=ranges, gen=[gen]), text + tgt + sum(sizes)


def _flat(t):
    """(B, H, L, D) -> ComfyUI's attention output (B, L, H * D)."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


def _run(patcher, name, **kw):
    cl.calls.clear()
    cl.attention_calls.clear()
    x, t, ctx, rl = _inputs(name, **kw)
    with torch.no_grad():
        out = cl.forward(patcher, x, t, ctx, rl)
    return out, list(cl.attention_calls)


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("refs", REFS)
def test_rebalanced_calls_match_reference_and_float64(name, refs):
    base = _model(name)
    patched = comfyui.apply(base, CFG, backend="reference")
    x, t, ctx, rl = _inputs(name, refs=refs)
    layout, joint = _expected(name, x, ctx, rl)
    got = cmodels.spans(cmodels.family_of(patched), x, cl.F.pad(ctx, (0, 0, 505, 0)) if name == "Flux2" else ctx,
                        rl).layout
    assert (got.ref, got.gen) == (layout.ref, layout.gen)
    _, calls = _run(patched, name, refs=refs)
    _, plain = _run(base, name, refs=refs)
    assert len(calls) == len(plain)
    rebalanced = 0
    for (q, k, v, out), (pq, pk, pv, pout) in zip(calls, plain):
        if q.shape[2] != joint:  # OmniGen2's refiner attends over the target alone: plain, bit for bit
            assert name == "Omnigen2" and torch.equal(out, pout)
            continue
        rebalanced += 1
        torch.testing.assert_close(out, _flat(dar.dar_attention(q, k, v, layout, CFG, backend="reference")),
                                   rtol=1e-9, atol=1e-9)
        want = _flat(torch.from_numpy(oracle.dar_float64(q, k, v, layout, CFG)[0]))
        torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    assert rebalanced == 2
    assert (calls[-1][3] - plain[-1][3]).abs().max() > 1e-6


@pytest.mark.parametrize("name", list(FAMILIES))
def test_gamma_zero_bit_identical_and_original_unchanged(name):
    base = _model(name)
    before = repr(base.model_options)
    plain, plain_calls = _run(base, name)
    zero, zero_calls = _run(comfyui.apply(base, CFG.replace(gamma=0.0)), name)
    assert torch.equal(plain, zero) and all(torch.equal(a[3], b[3]) for a, b in zip(plain_calls, zero_calls))
    on, _ = _run(comfyui.apply(base, CFG), name)
    assert not torch.equal(on, plain)
    again, _ = _run(base, name)
    assert torch.equal(plain, again) and repr(base.model_options) == before
    assert "optimized_attention_override" not in base.model_options["transformer_options"]


@pytest.mark.parametrize("name", ["Flux", "Omnigen2"])
def test_forward_without_references_stays_plain(name):
    base = _model(name)
    plain, _ = _run(base, name, refs=())
    out, _ = _run(comfyui.apply(base, CFG), name, refs=())
    assert torch.equal(plain, out)


def test_custom_func_honoured():
    """The attention ComfyUI selected (``func``) runs the rebalanced attention: DAR only adds the key weights."""
    seen = []

    def my_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                     **kw):
        seen.append(k.shape)
        return cl.raw_attention_pytorch(q, k, v, heads, mask, attn_precision, skip_reshape, skip_output_reshape, **kw)

    cl.selected["func"] = my_attention
    base = _model("QwenImage")
    x, t, ctx, rl = _inputs("QwenImage")
    layout, joint = _expected("QwenImage", x, ctx, rl)
    _, calls = _run(comfyui.apply(base, CFG, backend="reference"), "QwenImage")
    # only my_attention ran (at most two kernel calls per attention call: rebalanced rows, plain rows)
    assert len(calls) == 2 and 2 <= len(seen) <= 4 and all(s[2] == joint for s in seen) and len(cl.calls) == len(seen)
    q, k, v, out = calls[0]
    want = _flat(dar.dar_attention(q, k, v, layout, CFG, backend="reference"))
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", ["key_scale", "prob_scale"])
def test_existing_override_chained(mode):
    """An override set by another node (e.g. a Sage patch) still decides the kernel; DAR rebalances through it."""
    used = []

    def other_node(func, *args, **kwargs):
        used.append(args[1].shape)
        return func(*args, **kwargs)

    base = _model("Flux")
    sage = base.clone()
    sage.model_options["transformer_options"]["optimized_attention_override"] = other_node
    cfg = CFG.replace(mode=mode)
    patched = comfyui.apply(sage, cfg, backend="reference")
    assert sage.model_options["transformer_options"]["optimized_attention_override"] is other_node
    x, t, ctx, rl = _inputs("Flux")
    layout, joint = _expected("Flux", x, ctx, rl)
    _, calls = _run(patched, "Flux")
    assert used and all(s[2] == joint + (1 if mode == "prob_scale" else 0) or s[2] == joint for s in used)
    for q, k, v, out in calls:
        torch.testing.assert_close(out, _flat(dar.dar_attention(q, k, v, layout, cfg, backend="reference")),
                                   rtol=1e-9, atol=1e-9)
    # DAR applied twice: the second replaces the first and still chains the other node's override
    twice = comfyui.apply(patched, cfg.replace(gamma=0.0))
    used.clear()
    plain, _ = _run(sage, "Flux")
    out, _ = _run(twice, "Flux")
    assert torch.equal(plain, out) and used


def test_unsupported_model_refused_by_name():
    with pytest.raises(ValueError, match=r"SDXL \(diffusion model UNetModel\) is not supported"):
        comfyui.apply(cl.ModelPatcher(cl.SDXL()), CFG)
    odd = cl.ModelPatcher(cl.FluxModel())
    odd.model.diffusion_model = cl.UNetModel()
    with pytest.raises(ValueError, match="Flux.*not ComfyUI's Flux"):
        comfyui.apply(odd, CFG)
    with pytest.raises(TypeError, match="ModelPatcher"):
        comfyui.apply(torch.nn.Linear(2, 2), CFG)
    with pytest.raises(ValueError, match="backend"):
        comfyui.apply(_model("Flux"), CFG, backend="nope")


def test_layer_and_step_schedules():
    base = _model("Flux")
    x, t, ctx, rl = _inputs("Flux")
    layout, joint = _expected("Flux", x, ctx, rl)
    sample_sigmas = torch.tensor([1.0, 0.5, 0.25, 0.0])
    for layers, steps, sigma, on in (([1], None, 1.0, [False, True]), (None, [1], 1.0, [False, False]),
                                     (None, [1], 0.5, [True, True])):
        patched = comfyui.apply(base, CFG, backend="reference", layers=layers, steps=steps)
        cl.attention_calls.clear()
        with torch.no_grad():
            cl.forward(patched, x, t, ctx, rl, sigmas=torch.tensor([sigma]), sample_sigmas=sample_sigmas)
        for (q, k, v, out), rebalance in zip(cl.attention_calls, on):
            want = _flat(dar.dar_attention(q, k, v, layout, CFG, backend="reference")) if rebalance else \
                cl.raw_attention_pytorch(q, k, v, 4, skip_reshape=True)
            torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)


def test_node():
    node = comfyui.NODE_CLASS_MAPPINGS["DARRebalance"]
    assert comfyui.NODE_DISPLAY_NAME_MAPPINGS["DARRebalance"] == "DAR: Dynamic Attention Rebalancing"
    inputs = node.INPUT_TYPES()["required"]
    assert set(inputs) == {"model", "gamma", "tau_high", "tau_low", "num_samples", "mode", "thresholds", "normalize",
                           "layers", "steps", "backend"}
    base = _model("Flux")
    (patched,) = getattr(node(), node.FUNCTION)(base, 0.5, 0.7, 0.3, 8, "key_scale", "minmax", "joint", "0-1", "",
                                                "reference")
    assert patched is not base and "optimized_attention_override" in patched.model_options["transformer_options"]
    with pytest.raises(ValueError, match="layers"):
        node().patch(base, 0.5, 0.7, 0.3, 8, "key_scale", "minmax", "joint", "3-1", "", "auto")
    with pytest.raises(ValueError, match="SDXL"):
        node().patch(cl.ModelPatcher(cl.SDXL()), 0.5, 0.7, 0.3, 8, "key_scale", "minmax", "joint", "", "", "auto")


def test_reference_image_num_tokens_cross_checked():
    """Newer ComfyUI puts the per-reference token counts into transformer_options: equal counts rebalance,
    different ones warn once and run unchanged (never rebalance on spans that disagree with the model)."""
    base = _model("Flux")
    x, t, ctx, rl = _inputs("Flux")
    layout, joint = _expected("Flux", x, ctx, rl)
    counts = [b - a for a, b in layout.ref]
    plain, _ = _run(base, "Flux")
    for given, rebalanced in ((counts, True), ([counts[0] + 1, counts[1]], False)):
        patched = comfyui.apply(base, CFG, backend="reference")
        patched.model_options["transformer_options"]["reference_image_num_tokens"] = given
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, _ = _run(patched, "Flux")
        assert torch.equal(out, plain) is not rebalanced
        said = [w for w in caught if "reference_image_num_tokens" in str(w.message)]
        assert len(said) == (0 if rebalanced else 1)


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("refs", REFS)
def test_newest_comfyui_reference_counts_agree(name, refs):
    """Newer ComfyUI's FLUX / Qwen-Image set reference_image_num_tokens themselves: DAR's counts equal them for
    any number and size of references, so the pinned and the newest contract rebalance alike, without a warning."""
    patched = comfyui.apply(_model(name), CFG, backend="reference")
    seen = []
    patched.model_options["transformer_options"]["optimized_attention_override"] = \
        lambda func, *a, **kw: seen.append(kw["transformer_options"].get("reference_image_num_tokens")) or func(*a, **kw)
    patched = comfyui.apply(patched, CFG, backend="reference")  # DAR chains the recording override
    outs = []
    for newest in (False, True):
        cl.contract["reference_image_num_tokens"] = newest
        seen.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outs.append(_run(patched, name, refs=refs))
        assert not [w for w in caught if "DAR" in str(w.message)]
        counts = [n for n in seen if n is not None]
        assert len(counts) == (2 * 2 if newest and name != "Omnigen2" else 0)  # 2 joint layers x 2 kernel calls
    x, _, ctx, rl = _inputs(name, refs=refs)
    layout, _ = _expected(name, x, ctx, rl)
    assert all(c == [b - a for a, b in layout.ref] for c in counts)
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a[3], b[3]) for a, b in zip(outs[0][1], outs[1][1]))


def test_dropped_wrapper_warns():
    """A ComfyUI that replaced the model_options' wrappers with the ModelPatcher's own would leave DAR's wrapper out:
    DAR cannot see the references then, and says so once instead of running plain silently."""
    base = _model("Flux")
    plain, _ = _run(base, "Flux")
    patched = comfyui.apply(base, CFG)
    patched.model_options["transformer_options"]["wrappers"] = {}  # what such a ComfyUI hands the model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = _run(patched, "Flux")
        _run(patched, "Flux")
    assert torch.equal(out, plain)
    said = [str(w.message) for w in caught if "apply_model wrapper is missing" in str(w.message)]
    assert len(said) == 1 and "FLUX.1 / Kontext" in said[0], said


def test_install_writes_the_node_pack(tmp_path):
    from dar.bindings.comfyui import install

    with pytest.raises(FileNotFoundError, match="custom_nodes"):
        install.install(tmp_path)
    (tmp_path / "custom_nodes").mkdir()
    target = install.install(tmp_path)
    namespace = {}
    exec(compile(target.read_text(), str(target), "exec"), namespace)
    assert namespace["NODE_CLASS_MAPPINGS"] is comfyui.NODE_CLASS_MAPPINGS


def test_attention_map_node():
    """DARRebalance(record_attention) then DARAttentionMap: one row per reference, before | after, as an IMAGE."""
    rebalance, amap = (comfyui.NODE_CLASS_MAPPINGS[n]() for n in ("DARRebalance", "DARAttentionMap"))
    assert comfyui.NODE_DISPLAY_NAME_MAPPINGS["DARAttentionMap"] == "DAR: Attention Map"
    base = _model("Flux")
    (patched,) = rebalance.patch(base, 0.5, 0.7, 0.3, 8, "key_scale", "minmax", "joint", "", "", "reference",
                                 record_attention=True)
    x, t, ctx, rl = _inputs("Flux")
    with torch.no_grad():
        cl.forward(patched.clone(), x, t, ctx, rl, sigmas=torch.tensor([1.0]), sample_sigmas=torch.tensor([1.0, 0.0]))
    recorder = comfyui.patch.recorder_of(patched)
    assert recorder is not None and recorder.steps == [0] and recorder.layers == [0, 1]
    maps = recorder.reference_maps()
    assert [m["shape"] for m in maps] == [(3, 2), (2, 3)]
    (image,) = amap.render(patched, {"samples": x}, "", "", 64)
    assert image.dim() == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    assert 0 <= float(image.min()) and float(image.max()) <= 1 and float(image.max()) > 0
    assert not recorder.entries  # cleared for the next run
    with pytest.raises(ValueError, match="record_attention"):
        amap.render(base, {"samples": x})
