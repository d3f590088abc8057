"""OmniGen2 through the stand-in transformer (tests/support/standins/omnigen2_like.py): both attention paths
(flash varlen and SDPA) rebalanced with the layout read from the forward, matching the reference backend
on the captured q/k/v; refiners untouched; disable / gamma = 0 exact; Recorder."""

import warnings

import pytest
import torch

import dar
from dar.bindings import omnigen2
from tests.support.standins import omnigen2_like
from tests.support.standins.flash_attn_like import flash_attn_varlen_func as flash_stub

CFG = dar.DARConfig(gamma=0.5, num_samples=8, sampling="strided")
REFS, TARGET, CAPS = ((8, 8), (4, 8)), (8, 8), (5, 3)  # latents (H, W), patch 2: 16 + 8 reference tokens, 16 target


def _model(flash: bool):
    torch.manual_seed(0)
    return omnigen2_like.OmniGen2Transformer2DModel(flash=flash).eval()


def _expected_layouts(caps=CAPS):
    out = []
    for c in caps:
        out.append(dar.TokenLayout(ref=[(c, c + 16), (c + 16, c + 24)], gen=[(c + 24, c + 40)],
                                   image_shapes=[(4, 4), (2, 4)]))
    return out


def _capture(model, stages=("layers", "context_refiner", "noise_refiner", "ref_image_refiner")):
    calls = {}
    for stage in stages:
        for proc in model.processors(stage):
            proc.calls = calls.setdefault(stage, [])
    return calls


def test_recognised_by_class_name_without_importing_omnigen2():
    import sys

    model = _model(True)
    assert omnigen2.is_transformer(model) and not omnigen2.is_transformer(torch.nn.Linear(2, 2))
    with dar.rebalanced(model, CFG) as handle:
        assert handle.models == [model]
    assert "omnigen2" not in sys.modules


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("flash", [True, False])
def test_joint_layers_match_reference_backend(flash, backend):
    model = _model(flash)
    kw = omnigen2_like.inputs(REFS, TARGET, CAPS)
    calls = _capture(model)
    with dar.rebalanced(model, CFG, backend=backend), torch.no_grad():
        model(**kw)
    lays = _expected_layouts()
    assert len(calls["layers"]) == 2
    for c in calls["layers"]:
        if flash:
            expected = dar.dar_attention_varlen(c["q"], c["k"], c["v"], c["cu"], c["cu"], c["max"], c["max"], lays, CFG,
                                                c["scale"], backend="reference")
            plain = flash_stub(c["q"], c["k"], c["v"], c["cu"], c["cu"], c["max"], c["max"], softmax_scale=c["scale"])
        else:
            expected = dar.dar_attention(c["q"], c["k"], c["v"], lays, CFG, c["mask"], c["scale"], backend="reference")
            plain = torch.nn.functional.scaled_dot_product_attention(c["q"], c["k"], c["v"], attn_mask=c["mask"],
                                                                     scale=c["scale"])
        torch.testing.assert_close(c["out"], expected, rtol=2e-5, atol=2e-5)
        assert (c["out"] - plain).abs().max() > 1e-4  # DAR changed the joint layers
    for stage in ("context_refiner", "noise_refiner", "ref_image_refiner"):  # one segment each: unchanged
        for c in calls[stage]:
            if flash:
                plain = flash_stub(c["q"], c["k"], c["v"], c["cu"], c["cu"], c["max"], c["max"], softmax_scale=c["scale"])
            else:
                plain = torch.nn.functional.scaled_dot_product_attention(c["q"], c["k"], c["v"], attn_mask=c["mask"],
                                                                         scale=c["scale"])
            assert torch.equal(c["out"], plain)


@pytest.mark.parametrize("flash", [True, False])
def test_disable_and_gamma_zero_are_exact(flash):
    from tests.support.standins import omnigen2_like as mod

    model = _model(flash)
    kw = omnigen2_like.inputs(REFS, TARGET, CAPS)
    original = (mod.flash_attn_varlen_func, mod.F)
    with torch.no_grad():
        off = model(**kw)
        with dar.rebalanced(model, CFG.replace(gamma=0.0)):
            zero = model(**kw)
        assert (mod.flash_attn_varlen_func, mod.F) == original
        with dar.rebalanced(model, CFG):
            assert mod.flash_attn_varlen_func is not original[0] if flash else mod.F is not original[1]
            on = model(**kw)
        after = model(**kw)
    assert (mod.flash_attn_varlen_func, mod.F) == original
    assert all(torch.equal(a, b) for a, b in zip(off, zero)) and all(torch.equal(a, b) for a, b in zip(off, after))
    assert any((a - b).abs().max() > 1e-5 for a, b in zip(off, on))


def test_flash_and_sdpa_paths_agree_with_dar():
    kw = omnigen2_like.inputs(REFS, TARGET, CAPS)
    outs = []
    for flash in (True, False):
        model = _model(flash)
        with dar.rebalanced(model, CFG, backend="torch"), torch.no_grad():
            outs.append(model(**kw))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_forward_without_references_runs_unchanged_and_says_so():
    model = _model(True)
    kw = omnigen2_like.inputs(None, TARGET, CAPS)
    with torch.no_grad():
        off = model(**kw)
        with dar.rebalanced(model, CFG), warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            on = model(**kw)
            model(**kw)
    assert all(torch.equal(a, b) for a, b in zip(off, on))
    said = [w for w in got if "no reference-image tokens" in str(w.message)]
    assert len(said) == 1 and "OmniGen2Transformer2DModel" in str(said[0].message)


def test_recorder_sees_each_sequence():
    model = _model(True)
    rec = dar.Recorder()
    with dar.rebalanced(model, CFG, recorder=rec), torch.no_grad():
        model(**omnigen2_like.inputs(REFS, TARGET, CAPS))
    assert rec.layers == [3, 4]  # attention modules in named_modules order: 3 refiners, then the 2 layers
    entries = rec.rows(0, 3)
    assert len(entries) == 2 and [r.shape for r in entries[0].refs] == [(4, 4), (2, 4)]
    assert entries[0].num_samples == 8
    counts = rec.call_counts()
    assert counts.rebalanced == 2 and counts.passed == 3  # one packed call per joint layer


def test_layers_filter_and_flex_backend():
    model = _model(True)
    kw = omnigen2_like.inputs(REFS, TARGET, CAPS)
    calls = _capture(model, ("layers",))
    with dar.rebalanced(model, CFG, layers=[-1]), torch.no_grad():
        model(**kw)
    c = calls["layers"][0]
    plain = flash_stub(c["q"], c["k"], c["v"], c["cu"], c["cu"], c["max"], c["max"], softmax_scale=c["scale"])
    assert torch.equal(c["out"], plain)
    with dar.rebalanced(model, CFG, backend="flex"), torch.no_grad(), pytest.raises(ValueError, match="backend"):
        model(**kw)


class _Scheduler:
    def set_timesteps(self, n, device=None):
        self.timesteps = torch.linspace(1, 0, n)

    def step(self, pred, t, latents, return_dict=False):
        return (latents,)


class _Pipeline:
    """The shape of OmniGen2Pipeline as the binding sees it: components with a transformer and a scheduler."""

    def __init__(self, transformer):
        self.transformer, self.scheduler = transformer, _Scheduler()

    @property
    def components(self):
        return {"transformer": self.transformer, "scheduler": self.scheduler}

    def __call__(self, kw, steps=2):
        self.scheduler.set_timesteps(steps)
        for t in self.scheduler.timesteps:
            self.transformer(**kw)  # with the references
            self.transformer(**{**kw, "ref_image_hidden_states": None})  # the image-free CFG branch
            self.scheduler.step(None, t, None)


def test_pipeline_steps():
    model = _model(False)
    pipe = _Pipeline(model)
    rec = dar.Recorder()
    with dar.rebalanced(pipe, CFG, steps=[1], recorder=rec), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe(omnigen2_like.inputs(REFS, TARGET, CAPS))
    assert rec.steps == [1]
