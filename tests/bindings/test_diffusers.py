"""dar.enable / dar.disable on diffusers transformers: tiny random-weight models, CPU, nothing downloaded.

Each family case builds a tiny model from a configuration, inputs that mimic what its pipeline passes
(CFG-style batch of 2 with padded text, several reference images, rows with different reference
counts) and the token layout written out by hand here, independently of the binding's layout code.
Attention calls are captured by wrapping the processor module's attention name in the test itself
(around whatever is installed), so the checks do not trust the binding's own bookkeeping.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import types

import pytest
import torch
from diffusers import (FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel, FluxTransformer2DModel,
                       OmniGenTransformer2DModel, QwenImageTransformer2DModel, SD3Transformer2DModel)
from diffusers.models import attention_dispatch, attention_processor
from diffusers.models.transformers import (transformer_flux, transformer_flux2, transformer_omnigen,
                                           transformer_qwenimage)
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import retrieve_timesteps

import dar
from dar import TokenLayout
from dar.bindings import diffusers as dd
from dar.bindings.diffusers import intercept

CFG = dar.DARConfig(gamma=0.5, num_samples=8)
DISPATCH_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@dataclasses.dataclass
class Case:
    model: torch.nn.Module
    kwargs: dict
    layouts: tuple  # expected TokenLayout per batch row, written by hand
    seq_len: int
    namespace: dict  # the processors' module globals
    name: str  # "dispatch_attention_fn" or "F"


def _qwen(seed=0, num_layers=2):
    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=num_layers,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                        axes_dims_rope=(4, 6, 6)).eval()
    # Row 0: target 4x4, references 4x4 and 2x4. Row 1: target 4x4, one 4x6 reference (same token count).
    shapes = [[(1, 4, 4), (1, 4, 4), (1, 2, 4)], [(1, 4, 4), (1, 4, 6)]]
    text_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])  # padded text in row 1
    kwargs = dict(hidden_states=torch.randn(2, 40, 16), encoder_hidden_states=torch.randn(2, 7, 16),
                  encoder_hidden_states_mask=text_mask, timestep=torch.tensor([0.5, 0.5]), img_shapes=shapes,
                  return_dict=False)
    layouts = (TokenLayout(ref=[(23, 39), (39, 47)], gen=[(7, 23)], image_shapes=[(4, 4), (2, 4)]),
               TokenLayout(ref=[(23, 47)], gen=[(7, 23)], image_shapes=[(4, 6)]))
    return Case(model, kwargs, layouts, 47, vars(transformer_qwenimage), "dispatch_attention_fn")


def _flux2(seed=0):
    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                    timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4),
                                    guidance_embeds=False).eval()

    def grid(t, h, w):
        return torch.tensor([[t, i, j, 0] for i in range(h) for j in range(w)])

    txt = torch.stack([torch.tensor([[0, 0, 0, n] for n in range(5)])] * 2)
    # Row 0: target, two references (time 10 and 20). Row 1: target and one reference of 24 tokens.
    img = torch.stack([torch.cat([grid(0, 4, 4), grid(10, 4, 4), grid(20, 2, 4)]),
                       torch.cat([grid(0, 4, 4), grid(10, 4, 6)])])
    kwargs = dict(hidden_states=torch.randn(2, 40, 8), encoder_hidden_states=torch.randn(2, 5, 16),
                  timestep=torch.tensor([0.5, 0.5]), img_ids=img, txt_ids=txt, return_dict=False)
    layouts = (TokenLayout(ref=[(21, 37), (37, 45)], gen=[(5, 21)], image_shapes=[(4, 4), (2, 4)]),
               TokenLayout(ref=[(21, 45)], gen=[(5, 21)], image_shapes=[(4, 6)]))
    return Case(model, kwargs, layouts, 45, vars(transformer_flux2), "dispatch_attention_fn")


def _kontext(seed=0):
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=8, axes_dims_rope=(4, 6, 6)).eval()

    def grid(t, h, w):
        return torch.tensor([[t, i, j] for i in range(h) for j in range(w)], dtype=torch.float32)

    # FLUX.1 Kontext: 2-D ids shared by the batch, the reference image has time coordinate 1.
    kwargs = dict(hidden_states=torch.randn(2, 32, 8), encoder_hidden_states=torch.randn(2, 5, 16),
                  pooled_projections=torch.randn(2, 8), timestep=torch.tensor([0.5, 0.5]),
                  img_ids=torch.cat([grid(0, 4, 4), grid(1, 4, 4)]), txt_ids=torch.zeros(5, 3), return_dict=False)
    layouts = (TokenLayout(ref=[(21, 37)], gen=[(5, 21)], image_shapes=[(4, 4)]),) * 2
    return Case(model, kwargs, layouts, 37, vars(transformer_flux), "dispatch_attention_fn")


def _omnigen(seed=0):
    torch.manual_seed(seed)
    model = OmniGenTransformer2DModel(in_channels=4, patch_size=2, hidden_size=32, num_attention_heads=2,
                                      num_key_value_heads=2, intermediate_size=32, num_layers=2, pad_token_id=0,
                                      vocab_size=64, rope_scaling={"short_factor": [1.0] * 8, "long_factor": [1.0] * 8},
                                      pos_embed_max_size=16, time_step_dim=16).eval()
    n_cond, n_out = 30, 16
    seq = n_cond + 1 + n_out
    # Condition tokens are causal, the output image attends bidirectionally (as OmniGen's processor builds it).
    mask = torch.tril(torch.ones(2, seq, seq))
    mask[:, -n_out - 1:, -n_out - 1:] = 1
    kwargs = dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([0.5, 0.5]),
                  input_ids=torch.randint(1, 64, (2, n_cond)),
                  input_img_latents=[torch.randn(1, 4, 8, 8), torch.randn(1, 4, 4, 8), torch.randn(1, 4, 8, 4)],
                  input_image_sizes={0: [[2, 18], [20, 28]], 1: [[3, 11]]}, attention_mask=mask,
                  position_ids=torch.arange(seq)[None].expand(2, -1), return_dict=False)
    # Latents in placement order: 8x8 -> 4x4 tokens, 4x8 -> 2x4, 8x4 -> 4x2 (patch size 2).
    layouts = (TokenLayout(ref=[(2, 18), (20, 28)], gen=[(31, 47)], image_shapes=[(4, 4), (2, 4)]),
               TokenLayout(ref=[(3, 11)], gen=[(31, 47)], image_shapes=[(4, 2)]))
    return Case(model, kwargs, layouts, seq, vars(transformer_omnigen), "F")


FAMILIES = {"qwenimage": _qwen, "flux2": _flux2, "flux_kontext": _kontext, "omnigen": _omnigen}


@pytest.fixture(autouse=True)
def _nothing_left_enabled():
    yield
    leftovers = [m for m in list(dd._models)]
    for m in leftovers:
        dar.disable(m)
    assert not leftovers, "a test left DAR enabled"
    assert not intercept.installed_sites()


def run(case, **overrides):
    with torch.no_grad():
        return case.model(**{**case.kwargs, **overrides})[0]


@dataclasses.dataclass
class Captured:
    q: torch.Tensor  # SDPA layout (B, H, L, D)
    k: torch.Tensor
    v: torch.Tensor
    attn_mask: torch.Tensor | None
    scale: float | None
    out: torch.Tensor  # SDPA layout


@contextlib.contextmanager
def capture(case):
    """Record every attention call of the processors' module, around whatever is installed there."""
    inner = case.namespace[case.name]
    calls: list[Captured] = []

    def record(args, kwargs, out, bhld):
        a = dict(zip(DISPATCH_ARGS, args))
        a.update(kwargs)
        t = (lambda x: x.transpose(1, 2)) if bhld else (lambda x: x)
        calls.append(Captured(t(a["query"]), t(a["key"]), t(a["value"]), a.get("attn_mask"), a.get("scale"), t(out)))

    if case.name == "F":
        proxy = types.ModuleType("test_capture_F")
        vars(proxy).update({k: v for k, v in vars(inner).items() if not k.startswith("__")})

        def sdpa(*args, **kwargs):
            out = inner.scaled_dot_product_attention(*args, **kwargs)
            record(args, kwargs, out, bhld=False)
            return out

        proxy.scaled_dot_product_attention = sdpa
        case.namespace["F"] = proxy
    else:
        def dispatch(*args, **kwargs):
            out = inner(*args, **kwargs)
            record(args, kwargs, out, bhld=True)
            return out

        case.namespace[case.name] = dispatch
    try:
        yield calls
    finally:
        case.namespace[case.name] = inner


def plain(c: Captured) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(c.q, c.k, c.v, attn_mask=c.attn_mask, scale=c.scale)


def reference(c: Captured, layouts, cfg=CFG) -> torch.Tensor:
    return dar.dar_attention(c.q, c.k, c.v, list(layouts), cfg, c.attn_mask, c.scale, backend="reference")


def dar_float64(c: Captured, layouts, cfg) -> torch.Tensor:
    """DAR written out in float64 (strided sampling, joint min-max groups, key_scale, generation rows)."""
    q, k, v = (t.double() for t in (c.q, c.k, c.v))
    scale = q.shape[-1] ** -0.5
    bias = torch.zeros(q.shape[0], 1, 1, k.shape[2], dtype=torch.float64)
    if c.attn_mask is not None:  # the Qwen processor's (B, 1, 1, Lk) key-padding mask
        assert c.attn_mask.dtype == torch.bool and c.attn_mask.shape[1:3] == (1, 1)
        bias = bias.masked_fill(~c.attn_mask, float("-inf"))
    out = torch.softmax(scale * q @ k.transpose(-1, -2) + bias, dim=-1) @ v
    for b, lay in enumerate(layouts):
        gen = [i for s, e in lay.gen for i in range(s, e)]
        allowed = torch.isfinite(bias[b, 0, 0])
        refs = [j for s, e in lay.ref for j in range(s, e) if allowed[j]]
        m = min(cfg.num_samples, len(gen))
        sampled = [gen[((2 * j + 1) * len(gen)) // (2 * m)] for j in range(m)]
        probs = torch.softmax(scale * q[b][:, sampled] @ k[b].transpose(-1, -2) + bias[b, 0], dim=-1)
        mass = probs.sum(dim=(0, 1))[refs]
        rhat = (mass - mass.min()) / (mass.max() - mass.min())
        # Hard thresholds: the case must not sit on a tie, or float32 and float64 may disagree.
        assert ((rhat - cfg.tau_high).abs().min() > 1e-4) and ((rhat - cfg.tau_low).abs().min() > 1e-4)
        w = torch.ones(k.shape[2], dtype=torch.float64)
        one = torch.ones_like(rhat)
        w[refs] = torch.where(rhat >= cfg.tau_high, one * (1 + cfg.gamma),
                              torch.where(rhat <= cfg.tau_low, one * (1 - cfg.gamma), one))
        logits = scale * q[b][:, gen] @ (k[b] * w[None, :, None]).transpose(-1, -2) + bias[b, 0]
        out[b][:, gen] = torch.softmax(logits, dim=-1) @ v[b]
    return out


# ---- issue test 1: gamma = 0 reproduces the original output ------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_gamma_zero_reproduces_original(family):
    case = FAMILIES[family]()
    base = run(case)
    with dar.rebalanced(case.model, dar.DARConfig(gamma=0.0)):
        out = run(case)
    assert (out - base).abs().max().item() <= 1e-5
    # gamma > 0 does change the output: the comparison above is not vacuous.
    with dar.rebalanced(case.model, CFG):
        assert (run(case) - base).abs().max().item() > 1e-4


# ---- issue test 2: equals dar_attention(backend="reference") on independently captured q/k/v --------------

@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_reference_on_captured_calls(family, backend):
    case = FAMILIES[family]()
    n_layers = len([m for m in case.model.modules() if getattr(m, "processor", None) is not None])
    handle = dar.enable(case.model, CFG, backend=backend)
    names = handle.layer_names[0]
    try:
        with capture(case) as calls:
            run(case)
    finally:
        dar.disable(case.model)
    joint = [c for c in calls if c.q.shape[2] == c.k.shape[2] == case.seq_len]
    assert len(joint) == n_layers == len(names)
    changed = 0
    for c in joint:
        want = reference(c, case.layouts)
        tol = 1e-6 if backend == "reference" else 2e-5
        torch.testing.assert_close(c.out, want, rtol=tol, atol=tol)
        changed += (want - plain(c)).abs().max().item() > 1e-4
    assert changed == len(joint)  # every layer was really rebalanced


def test_qwen_matches_independent_float64():
    case = _qwen()
    cfg = CFG.replace(sampling="strided")
    with dar.rebalanced(case.model, cfg):
        with capture(case) as calls:
            run(case)
    assert len(calls) == 2
    for c in calls:
        torch.testing.assert_close(c.out.double(), dar_float64(c, case.layouts, cfg), rtol=1e-4, atol=1e-5)


# ---- issue test 3: disable restores objects and bit-identical behaviour -----------------------------------

def _hook_counts(model):
    return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]


@pytest.mark.parametrize("family", FAMILIES)
def test_disable_restores_everything(family):
    case = FAMILIES[family]()
    base = run(case)
    original = case.namespace[case.name]
    processors = [getattr(m, "processor", None) for m in case.model.modules()]
    hooks = _hook_counts(case.model)
    dar.enable(case.model, CFG)
    assert case.namespace[case.name] is not original
    assert dd.is_enabled(case.model)
    run(case)
    dar.disable(case.model)
    assert case.namespace[case.name] is original
    assert [getattr(m, "processor", None) for m in case.model.modules()] == processors
    assert all(a is b for a, b in zip([getattr(m, "processor", None) for m in case.model.modules()], processors))
    assert _hook_counts(case.model) == hooks
    assert not dd.is_enabled(case.model)
    assert torch.equal(run(case), base)
    dar.disable(case.model)  # a second disable is a no-op


def test_module_globals_are_the_library_objects_after_disable():
    case = _omnigen()
    with dar.rebalanced(case.model, CFG):
        assert transformer_omnigen.F is not torch.nn.functional
        run(case)
    assert transformer_omnigen.F is torch.nn.functional
    case = _qwen()
    with dar.rebalanced(case.model, CFG):
        run(case)
    assert transformer_qwenimage.dispatch_attention_fn is attention_dispatch.dispatch_attention_fn


# ---- layouts: CFG rows with padded text, per-row and per-call reference counts ----------------------------

def test_layouts_follow_each_call():
    case = _qwen()
    # A second call with three references in row 0 and none in row 1 (all four entries of equal size).
    shapes = [[(1, 2, 5), (1, 2, 5), (1, 2, 5), (1, 2, 5)], [(1, 5, 8)]]
    other = dict(img_shapes=shapes)
    layouts = (TokenLayout(ref=[(17, 27), (27, 37), (37, 47)], gen=[(7, 17)], image_shapes=[(2, 5)] * 3),
               TokenLayout(gen=[(7, 47)]))
    with dar.rebalanced(case.model, CFG):
        with capture(case) as calls:
            run(case)
            run(case, **other)
            run(case, img_shapes=[[(1, 5, 8)]] * 2)  # no reference at all: runs unchanged
    assert len(calls) == 6
    for c in calls[:2]:
        torch.testing.assert_close(c.out, reference(c, case.layouts), rtol=2e-5, atol=2e-5)
    for c in calls[2:4]:
        torch.testing.assert_close(c.out, reference(c, layouts), rtol=2e-5, atol=2e-5)
        # row 1 has no reference: plain attention there
        torch.testing.assert_close(c.out[1], plain(c)[1], rtol=2e-5, atol=2e-5)
    for c in calls[4:]:
        assert torch.equal(c.out, plain(c))


def test_mismatched_img_shapes_raise():
    case = _qwen()
    with dar.rebalanced(case.model, CFG):
        with pytest.raises(ValueError, match="img_shapes"):
            run(case, img_shapes=[[(1, 4, 4), (1, 4, 4)]] * 2)


# ---- issue test 5: layer and step filters, errors, layout_fn ----------------------------------------------

def test_layer_filter():
    case = _qwen()
    for layers, rebalanced in (([1], [False, True]), (lambda i, name: name.startswith("transformer_blocks.0"),
                                                         [True, False]), (lambda i: True, [True, True])):
        with dar.rebalanced(case.model, CFG, layers=layers):
            with capture(case) as calls:
                run(case)
        assert len(calls) == 2
        for c, on in zip(calls, rebalanced):
            want = reference(c, case.layouts) if on else plain(c)
            torch.testing.assert_close(c.out, want, rtol=2e-5, atol=2e-5)
            if not on:
                assert torch.equal(c.out, attention_dispatch.dispatch_attention_fn(
                    c.q.transpose(1, 2), c.k.transpose(1, 2), c.v.transpose(1, 2), attn_mask=c.attn_mask).transpose(1, 2))


def test_step_filter_on_a_transformer():
    case = _qwen()
    base = run(case)
    with dar.rebalanced(case.model, CFG, steps=[1]) as handle:
        outs = [run(case) for _ in range(3)]
        assert handle.step == 3
        handle.reset_steps()
        again = run(case)
    assert torch.equal(outs[0], base) and torch.equal(outs[2], base) and torch.equal(again, base)
    assert (outs[1] - base).abs().max().item() > 1e-4
    seen = []
    with dar.rebalanced(case.model, CFG, steps=lambda step, t: seen.append((step, t)) or t > 0.7):
        low = run(case, timestep=torch.tensor([0.5, 0.5]))
        high = run(case, timestep=torch.tensor([0.9, 0.9]))
    assert seen == [(0, 0.5), (1, pytest.approx(0.9))]
    assert torch.equal(low, base)
    assert not torch.equal(high, run(case, timestep=torch.tensor([0.9, 0.9])))


class Recorder:
    """Stands in for dar.Recorder: keeps what the binding passes to observe()."""

    def __init__(self):
        self.calls = []

    def observe(self, **kwargs):
        self.calls.append(kwargs)


class TinyPipeline(DiffusionPipeline):
    """A denoising loop shaped like diffusers' Qwen-Image-Edit one: cond and uncond transformer calls per step."""

    def __init__(self, transformer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, kwargs, num_inference_steps=3):
        # As diffusers pipelines do: retrieve_timesteps inspects set_timesteps' signature for `sigmas`.
        retrieve_timesteps(self.scheduler, num_inference_steps, sigmas=[1.0, 0.7, 0.4][:num_inference_steps])
        latents = kwargs["hidden_states"]
        neg_mask = torch.zeros_like(kwargs["encoder_hidden_states_mask"])
        neg_mask[:, :3] = 1  # a shorter negative prompt, padded
        for t in self.scheduler.timesteps:
            timestep = (t / 1000).expand(latents.shape[0])
            cond = self.transformer(**{**kwargs, "hidden_states": latents, "timestep": timestep})[0]
            uncond = self.transformer(**{**kwargs, "hidden_states": latents, "timestep": timestep,
                                         "encoder_hidden_states_mask": neg_mask})[0]
            latents = self.scheduler.step(uncond + 2.0 * (cond - uncond), t, latents, return_dict=False)[0]
        return latents


def test_pipeline_step_counting_recorder_and_restore():
    case = _qwen()
    pipe = TinyPipeline(case.model, FlowMatchEulerDiscreteScheduler())
    base = pipe(case.kwargs)
    rec = Recorder()
    handle = dar.enable(pipe, CFG, steps=[1], recorder=rec)
    assert dar.enable(pipe, CFG, steps=[1], recorder=rec) is handle  # idempotent
    assert "step" in vars(pipe.scheduler)
    for _ in range(2):  # the counter restarts with every pipeline call
        out = pipe(case.kwargs)
    assert handle.step == 3
    assert not torch.equal(out, base)
    # 2 pipeline calls x 2 transformer calls (cond, uncond) x 2 layers, all at step 1.
    assert len(rec.calls) == 8
    assert {c["step"] for c in rec.calls} == {1}
    assert [c["layer"] for c in rec.calls[:4]] == [0, 1, 0, 1]
    assert rec.calls[0]["layer_name"] == "transformer_blocks.0.attn"
    first = rec.calls[0]
    assert set(first) == {"layer", "layer_name", "step", "timestep", "q", "k", "v", "layout", "config", "attn_mask",
                          "scale", "weights", "output"}
    assert isinstance(first["timestep"], float) and first["config"] is CFG and first["scale"] == 0.25
    assert first["layout"] == list(case.layouts)
    assert first["weights"].shape == (2, 47) and first["weights"].dtype == torch.float32
    assert first["q"].shape == (2, 2, 47, 16) and first["output"].shape == (2, 2, 47, 16)
    torch.testing.assert_close(first["output"], dar.dar_attention(
        first["q"], first["k"], first["v"], first["layout"], CFG, first["attn_mask"], backend="reference"),
        rtol=2e-5, atol=2e-5)
    dar.disable(pipe)
    assert "step" not in vars(pipe.scheduler) and "set_timesteps" not in vars(pipe.scheduler)
    assert not dd.is_enabled(pipe) and not dd.is_enabled(case.model)
    assert torch.equal(pipe(case.kwargs), base)
    with dar.rebalanced(pipe, CFG):
        assert dd.is_enabled(case.model)
    assert not dd.is_enabled(pipe)


def test_errors_name_the_argument():
    case = _qwen()
    with pytest.raises(TypeError, match="pipeline or transformer"):
        dar.enable(object())
    with pytest.raises(TypeError, match="no diffusers attention modules"):
        dar.enable(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="layers"):
        dar.enable(case.model, CFG, layers=[5])
    with pytest.raises(TypeError, match="layers"):
        dar.enable(case.model, CFG, layers="all")
    with pytest.raises(ValueError, match="steps"):
        dar.enable(case.model, CFG, steps=[-1])
    with pytest.raises(TypeError, match="steps"):
        dar.enable(case.model, CFG, steps=1.5)
    with pytest.raises(ValueError, match="backend"):
        dar.enable(case.model, CFG, backend="fast")
    with pytest.raises(TypeError, match="config"):
        dar.enable(case.model, {"gamma": 0.1})
    with pytest.raises(TypeError, match="layout_fn"):
        dar.enable(case.model, CFG, layout_fn="auto")
    with pytest.raises(TypeError, match="recorder"):
        dar.enable(case.model, CFG, recorder=object())
    assert not dd.is_enabled(case.model) and not intercept.installed_sites()
    with dar.rebalanced(case.model, CFG, layout_fn=lambda module, kw: "oops"):
        with pytest.raises(TypeError, match="layout_fn must return"):
            run(case)


def _sd3():
    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                  pooled_projection_dim=8, out_channels=4).eval()
    kwargs = dict(hidden_states=torch.randn(2, 4, 8, 8), encoder_hidden_states=torch.randn(2, 5, 16),
                  pooled_projections=torch.randn(2, 8), timestep=torch.tensor([10, 10]), return_dict=False)
    return Case(model, kwargs, (), 21, vars(attention_processor), "F")


def test_unsupported_model_needs_layout_fn_and_layout_fn_works():
    case = _sd3()
    with pytest.raises(ValueError, match="layout_fn"):
        dar.enable(case.model, CFG)
    assert not intercept.installed_sites()
    # SD3's joint sequence is [image (16 tokens), text (5)]: pretend the left half of the image is a reference.
    layout = TokenLayout(ref=[(0, 8)], gen=[(8, 16)])
    seen = []

    def layout_fn(module, kw):
        seen.append(sorted(kw))
        return layout

    base = run(case)
    with dar.rebalanced(case.model, CFG, layout_fn=layout_fn):
        with capture(case) as calls:
            out = run(case)
    assert seen and "hidden_states" in seen[0] and "encoder_hidden_states" in seen[0]
    assert len(calls) == 1 and calls[0].q.shape[2] == 21
    torch.testing.assert_close(calls[0].out, reference(calls[0], [layout] * 2), rtol=2e-5, atol=2e-5)
    assert (out - base).abs().max().item() > 1e-4
    assert torch.equal(run(case), base)


def test_layout_fn_overrides_automatic_layout():
    case = _qwen()
    layout = TokenLayout(ref=[(23, 39)], gen=[(7, 23)])  # only the first reference of row 0's layout
    with dar.rebalanced(case.model, CFG, layout_fn=lambda module, kw: [layout, layout]):
        with capture(case) as calls:
            run(case)
    for c in calls:
        torch.testing.assert_close(c.out, reference(c, [layout, layout]), rtol=2e-5, atol=2e-5)


# ---- idempotence, independence, offloading, threads ---------------------------------------------------------

def test_enable_twice_is_idempotent():
    case = _qwen()
    h1 = dar.enable(case.model, CFG)
    hooks = _hook_counts(case.model)
    once = run(case)
    h2 = dar.enable(case.model, CFG)
    assert h1 is h2 and _hook_counts(case.model) == hooks
    assert [s.users for s in intercept.installed_sites()] == [1]
    assert torch.equal(run(case), once)
    dar.enable(case.model, CFG.replace(gamma=0.0))  # re-enable replaces the settings in place
    assert h1.config.gamma == 0.0
    dar.disable(case.model)
    assert transformer_qwenimage.dispatch_attention_fn is attention_dispatch.dispatch_attention_fn


def test_two_models_are_independent():
    a, b = _qwen(seed=1), _qwen(seed=2)
    base_a, base_b = run(a), run(b)
    dar.enable(a.model, CFG)
    only_a = run(a)
    assert torch.equal(run(b), base_b)  # same module, not enabled: untouched
    with dar.rebalanced(b.model, CFG.replace(gamma=0.3)):
        assert torch.equal(run(a), only_a)
        both_b = run(b)
        dar.disable(a.model)
        assert transformer_qwenimage.dispatch_attention_fn is not attention_dispatch.dispatch_attention_fn
        assert torch.equal(run(a), base_a)
        assert torch.equal(run(b), both_b)
    assert not torch.equal(both_b, base_b)
    assert transformer_qwenimage.dispatch_attention_fn is attention_dispatch.dispatch_attention_fn


def test_accelerate_offload_hooks():
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    case = _flux2()
    with dar.rebalanced(case.model, CFG):
        want = run(case)
        cpu_offload(case.model, execution_device=torch.device("cpu"))  # weights to meta, streamed per module
        try:
            assert next(case.model.parameters()).device.type == "meta"
            with capture(case) as calls:
                got = run(case)
        finally:
            remove_hook_from_module(case.model, recurse=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for c in calls:
        torch.testing.assert_close(c.out, reference(c, case.layouts), rtol=2e-5, atol=2e-5)


def test_threads_keep_models_apart():
    a, b = _qwen(seed=1), _qwen(seed=2)
    base_b = run(b)
    with dar.rebalanced(a.model, CFG):
        want_a = run(a)
        results, errors = {"a": [], "b": []}, []

        def loop(case, key):
            try:
                for _ in range(15):
                    results[key].append(run(case))
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=loop, args=(a, "a")), threading.Thread(target=loop, args=(b, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert all(torch.equal(x, want_a) for x in results["a"])
    assert all(torch.equal(x, base_b) for x in results["b"])


# ---- torch.compile --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwenimage", "flux_kontext"])
def test_compile_adds_no_graph_breaks_and_matches_eager(family):
    from torch._dynamo.testing import CompileCounter

    if family == "qwenimage":
        case = _qwen(num_layers=1)
        # Equal image shapes in both rows: the model's own RoPE warns (a graph break) otherwise.
        case.kwargs["img_shapes"] = [case.kwargs["img_shapes"][0]] * 2
        case.layouts = (case.layouts[0],) * 2
    else:
        case = _kontext()  # its layout comes from reading img_ids on the host
    with torch.no_grad():
        torch._dynamo.reset()
        off = CompileCounter()
        compiled_before = torch.compile(case.model, backend=off, fullgraph=True)
        compiled_before(**case.kwargs)
        assert off.frame_count == 1
        with dar.rebalanced(case.model, CFG):
            eager = run(case)
            if family == "flux_kontext":  # compiled before enable: guards see DAR and retrace
                torch.testing.assert_close(compiled_before(**case.kwargs)[0], eager, rtol=1e-5, atol=1e-6)
            torch._dynamo.reset()
            on = CompileCounter()
            # fullgraph: DAR's hooks and interceptor must not break the model's single graph.
            compiled = torch.compile(case.model, backend=on, fullgraph=True)
            out = compiled(**case.kwargs)[0]
            assert on.frame_count == 1
            # A later step (new timestep, same layout) reuses the graph: no recompilation.
            with torch._dynamo.config.patch(error_on_recompile=True):
                compiled(**{**case.kwargs, "timestep": torch.tensor([0.3, 0.3])})
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
        assert not torch.equal(out, run(case))  # DAR was on inside the graph
        if family == "qwenimage":
            # Steps switch between rebalanced and plain forwards: the graph guards must follow.
            base = run(case)
            with dar.rebalanced(compiled, CFG, steps=[1]) as handle:  # the OptimizedModule is unwrapped
                assert handle.models == [case.model]
                outs = [compiled(**case.kwargs)[0] for _ in range(3)]
            torch.testing.assert_close(outs[0], base, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(outs[1], eager, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(outs[2], base, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
