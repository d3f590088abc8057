"""DAR on the attention backend chosen in diffusers (bindings/diffusers/dispatch.py).

With ``set_attention_backend(name)`` (or diffusers' ``attention_backend`` context manager), the
rebalanced calls must run through diffusers' dispatch on that backend: checked on the backends that
run on CPU (native, _native_math, flex) and on a counting fake registered the way diffusers registers
its backends (``_AttentionBackendRegistry.register``), standing in for a GPU-only one (SageAttention:
no attn_mask, head dims up to 128). Outputs are compared with DAR's reference backend.
"""

from __future__ import annotations

import functools

import pytest
import torch
from diffusers.models import attention_dispatch as ad
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

import dar
from dar.bindings import diffusers as dd
from dar.bindings.diffusers import dispatch, intercept
from tests.bindings.test_diffusers import _qwen, run

REGISTRY = _AttentionBackendRegistry


@pytest.fixture(autouse=True)
def _clean():
    active = REGISTRY._active_backend  # set_attention_backend also sets diffusers' global active backend
    yield
    REGISTRY.set_active_backend(active)
    for m in list(dd._models):
        dar.disable(m)
    assert not intercept.installed_sites()


@pytest.fixture
def counted():
    """Re-register backends with counting wrappers (restored after); returns name -> list of calls."""
    saved = {}
    calls: dict[str, list] = {}

    def count(name, fn=None, constraints=None):
        member = AttentionBackendName(name)
        saved.setdefault(member, (REGISTRY._backends.get(member), REGISTRY._constraints.get(member),
                                  REGISTRY._supported_arg_names.get(member)))
        inner = fn or REGISTRY._backends[member]
        calls[name] = []

        @functools.wraps(inner)
        def counting(*args, **kwargs):
            q = kwargs.get("query", args[0] if args else None)
            mask = kwargs.get("attn_mask")
            calls[name].append(dict(d=q.shape[-1], lq=q.shape[1], mask=None if mask is None else mask.dtype))
            return inner(*args, **kwargs)

        REGISTRY.register(member, constraints=constraints if constraints is not None
                          else REGISTRY._constraints[member])(counting)
        return calls[name]

    yield count
    for member, (fn, cons, names) in saved.items():
        REGISTRY._backends[member], REGISTRY._constraints[member] = fn, cons
        REGISTRY._supported_arg_names[member] = names


def _reference(case, cfg):
    with dar.rebalanced(case.model, cfg, backend="reference"):
        return run(case)


MODES = ["key_scale", "prob_scale"]


@pytest.mark.parametrize("name, mode", [("native", "key_scale"), ("native", "prob_scale"), ("_native_math", "key_scale"),
                                        ("_native_math", "prob_scale"), ("flex", "prob_scale")])
def test_chosen_cpu_backend_carries_the_rebalanced_calls(counted, name, mode):
    cfg = dar.DARConfig(gamma=0.5, num_samples=8, mode=mode)
    case = _qwen()
    expected = _reference(case, cfg)
    calls = counted(name)
    case.model.set_attention_backend(name)
    with dar.rebalanced(case.model, cfg):
        out = run(case)
    # 2 layers x (rebalanced rows, plain rows); prob_scale hands the backend a float ln w bias.
    assert len(calls) == 4, calls
    if mode == "prob_scale":
        assert sum(c["mask"] is not None and c["mask"].is_floating_point for c in calls) == 2
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    assert (out - run(case)).abs().max() > 1e-4  # DAR really ran (the last run has DAR off)


def _fake_sage(query, key, value, attn_mask=None, is_causal=False, scale=None, return_lse=False,
               _parallel_config=None):
    """SageAttention's calling convention on CPU: (B, L, H, D), no attn_mask (raises like the real one)."""
    if attn_mask is not None:
        raise ValueError("`attn_mask` is not supported for sage attention")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale,
                                                           enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)


@pytest.fixture
def fake_sage(counted, monkeypatch):
    """A counting stand-in for "sage", registered with diffusers' decorator; its CUDA-only requirement
    check is bypassed so set_attention_backend accepts it on CPU."""
    real_check = ad._check_attention_backend_requirements
    monkeypatch.setattr(ad, "_check_attention_backend_requirements",
                        lambda b: None if b == AttentionBackendName.SAGE else real_check(b))
    return counted("sage", _fake_sage, constraints=[ad._check_device, ad._check_shape])


def _unmasked_qwen():
    case = _qwen()
    case.kwargs["encoder_hidden_states_mask"] = None  # sage takes no mask: the model call must not pass one
    return case


@pytest.mark.parametrize("mode", MODES)
def test_counting_fake_without_masks(fake_sage, mode):
    cfg = dar.DARConfig(gamma=0.5, num_samples=8, mode=mode)
    case = _unmasked_qwen()
    expected = _reference(case, cfg)
    case.model.set_attention_backend("sage")
    with dar.rebalanced(case.model, cfg):
        out = run(case)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    assert all(c["mask"] is None for c in fake_sage)
    if mode == "key_scale":
        assert len(fake_sage) == 4 and {c["d"] for c in fake_sage} == {16}
    else:  # no bias: one call per layer with ln w in an extra column, head dim 16 + 1 padded to 24
        assert len(fake_sage) == 2 and {c["d"] for c in fake_sage} == {24}


def test_backend_that_cannot_express_a_mode_falls_back_once_with_the_reason(fake_sage, monkeypatch):
    monkeypatch.setitem(dispatch._CAPS, "sage", dispatch.Caps(takes_bias=False, max_head_dim=16))
    cfg = dar.DARConfig(gamma=0.5, num_samples=8, mode="prob_scale")
    case = _unmasked_qwen()
    expected = _reference(case, cfg)
    case.model.set_attention_backend("sage")
    with dar.rebalanced(case.model, cfg), pytest.warns(UserWarning, match=r"'sage'.*head dims up to 16"):
        out = run(case)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    assert not fake_sage  # every rebalanced call fell back; nothing else runs on this model


def test_context_manager_choice_routes_and_default_does_not(counted):
    cfg = dar.DARConfig(gamma=0.5, num_samples=8)
    case = _qwen()
    native, math = counted("native"), counted("_native_math")
    with dar.rebalanced(case.model, cfg):
        run(case)
        assert not native  # diffusers' default: DAR's own measured auto runs the calls
        with ad.attention_backend("_native_math"):
            run(case)
        assert len(math) == 4


def test_explicit_dar_backend_wins(counted):
    cfg = dar.DARConfig(gamma=0.5, num_samples=8)
    case = _qwen()
    math = counted("_native_math")
    case.model.set_attention_backend("_native_math")
    with dar.rebalanced(case.model, cfg, backend="torch"):
        run(case)
    assert not math


def test_dispatch_route_traces_under_compile(counted):
    torch._dynamo.reset()
    cfg = dar.DARConfig(gamma=0.5, num_samples=8, mode="prob_scale")
    case = _qwen(num_layers=1)
    case.kwargs["img_shapes"] = [case.kwargs["img_shapes"][0]] * 2  # unequal shapes: the model's RoPE logs (a break)
    expected = _reference(case, cfg)
    case.model.set_attention_backend("_native_math")
    compiled = torch.compile(case.model, fullgraph=True, backend="eager")
    with dar.rebalanced(case.model, cfg), torch.no_grad():
        out = compiled(**case.kwargs)[0]
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
