"""The transformers binding: ``attn_implementation="dar"`` on tiny random-weight models built from configs.

Checked here: outside a DAR context (and with gamma=0) the "dar" implementation reproduces transformers'
"sdpa" for forward passes and cached generate(); with DAR on, every attention call equals the reference
backend and the independent float64 oracle (tests/support/oracle.py) on the q/k/v/mask captured from the model, with
layouts built here from the known absolute positions; cached decoding equals a no-cache recomputation; and
bad inputs raise errors that name them. No downloads: every model is built from a config on the CPU.
"""

from __future__ import annotations

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dar  # noqa: E402
from dar.bindings import transformers as dar_tf  # noqa: E402
from tests.support.oracle import dar_float64, stable_keys  # noqa: E402
from tests.support.tolerances import THRESHOLD_MARGIN  # noqa: E402
from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

IMG, PAD = 7, 0
# The decoder's cache argument: ``past_key_values`` up to transformers 5.23, ``cache`` from 5.24 (where
# ``past_key_values`` is a deprecated alias). The tests pass it the way the installed version documents.
CACHE_KW = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
TOL = dict(atol=1e-5, rtol=1e-5)
# A large init scale makes the tiny models' attention peaked, so rebalancing visibly changes outputs.
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
             initializer_range=0.4)


def _build(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SMALL))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**SMALL))
    model.eval()
    model.set_attn_implementation("dar")
    return model


@pytest.fixture(scope="module", autouse=True)
def _registered():
    dar_tf.register()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return _build(request.param)


def _batch():
    """Two left-padded rows: text, two reference images, the generated image, text."""
    rows = [
        [1, 9, IMG, IMG, IMG, IMG, IMG, 11, IMG, IMG, IMG, IMG, 12, IMG, IMG, IMG, IMG, IMG, IMG, 13, 14],
        [1, IMG, IMG, IMG, IMG, 10, IMG, IMG, IMG, IMG, IMG, IMG, 12, IMG, IMG, IMG, IMG, IMG, 15],
    ]
    length = max(map(len, rows))
    ids = torch.tensor([[PAD] * (length - len(r)) + r for r in rows])
    attn = (torch.arange(length)[None] >= torch.tensor([[length - len(r)] for r in rows])).long()
    return ids, attn


# Absolute positions of the images in _batch(), written out by hand (row 1 has 2 pads).
REF = [((2, 7), (8, 12)), ((3, 7), (8, 14))]
GEN = [((13, 19),), ((15, 20),)]


def _masks_from(ref, gen, length):
    r = torch.zeros(len(ref), length, dtype=torch.bool)
    g = torch.zeros_like(r)
    for b in range(len(ref)):
        for s, e in ref[b]:
            r[b, s:e] = True
        for s, e in gen[b]:
            g[b, s:e] = True
    return r, g


class Capture:
    """Wraps the registered "dar" function to record every call's inputs and output."""

    def __init__(self, monkeypatch):
        self.calls = []
        inner = AttentionInterface._global_mapping["dar"]

        def wrapper(module, query, key, value, attention_mask, **kwargs):
            out, _ = inner(module, query, key, value, attention_mask, **kwargs)
            self.calls.append(dict(layer=module.layer_idx, q=query.detach().clone(), k=key.detach().clone(),
                                   v=value.detach().clone(), mask=attention_mask, scaling=kwargs.get("scaling"),
                                   out=out.detach().clone()))
            return out, None

        monkeypatch.setitem(AttentionInterface._global_mapping, "dar", wrapper)


def _count_dar_calls(monkeypatch):
    """Count the calls that take the DAR path (not the sdpa delegation)."""
    counter = {"n": 0}
    real = dar_tf.dar_attention

    def counting(*args, **kwargs):
        counter["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(dar_tf, "dar_attention", counting)
    return counter


def _generate(model, ids, attn, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=4, do_sample=False,
                              return_dict_in_generate=True, output_logits=True, pad_token_id=PAD, **kw)


# ----------------------------------------------------------------------------------------- registration, masks

def test_register_is_idempotent_and_gets_sdpa_masks():
    dar_tf.register()
    dar_tf.register()
    assert AttentionInterface._global_mapping["dar"] is dar_tf.dar_attention_forward
    assert AttentionMaskInterface._global_mapping["dar"] is AttentionMaskInterface._global_mapping["sdpa"]
    assert dar_tf.is_registered()


def test_image_token_masks_by_hand():
    ids = torch.tensor([[0, 0, 1, 7, 7, 3, 7, 7, 7, 4, 8, 8, 5],
                        [1, 7, 3, 8, 7, 7, 4, 8, 8, 8, 2, 2, 5]])
    ref, gen = dar_tf.image_token_masks(ids, [7, 8], generated=-1)
    exp_ref = torch.tensor([[0, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 0, 0],
                            [0, 1, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    exp_gen = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
                            [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(ref, exp_ref) and torch.equal(gen, exp_gen)
    # One id, first image generated, and 3 generated positions appended after the input.
    ref, gen = dar_tf.image_token_masks(ids[0], 7, generated=0, num_generated=3)
    assert ref.shape == gen.shape == (1, 16)
    assert ref[0].nonzero().flatten().tolist() == [6, 7, 8]
    assert gen[0].nonzero().flatten().tolist() == [3, 4, 13, 14, 15]
    # Default: every image is a reference.
    ref, gen = dar_tf.image_token_masks(ids, torch.tensor([7]))
    assert not gen.any() and ref[1].nonzero().flatten().tolist() == [1, 4, 5]


def test_image_token_masks_errors():
    ids = torch.tensor([[1, 7, 7, 2]])
    with pytest.raises(ValueError, match="image index 1"):
        dar_tf.image_token_masks(ids, 7, generated=1)
    with pytest.raises(TypeError, match="input_ids"):
        dar_tf.image_token_masks(ids.float(), 7)
    with pytest.raises(TypeError, match="image_token_id"):
        dar_tf.image_token_masks(ids, "7")
    with pytest.raises(TypeError, match="generated"):
        dar_tf.image_token_masks(ids, 7, generated="last")
    with pytest.raises(ValueError, match="num_generated"):
        dar_tf.image_token_masks(ids, 7, num_generated=-1)
    with pytest.raises(ValueError, match="input_ids"):
        dar_tf.image_token_masks(ids[None], 7)


# ----------------------------------------------------------------------------------------- equal to sdpa

def test_outside_a_context_is_exactly_sdpa(model):
    ids, attn = _batch()
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        want = model(input_ids=ids, attention_mask=attn).logits
        model.set_attn_implementation("dar")
        got = model(input_ids=ids, attention_mask=attn).logits
        ref, gen = _masks_from(REF, GEN, ids.shape[1])
        with dar.rebalanced(model, dar.DARConfig(gamma=0.5), ref_mask=ref, gen_mask=gen):
            pass
        after = model(input_ids=ids, attention_mask=attn).logits
    assert torch.equal(got, want) and torch.equal(after, want)
    assert dar_tf.active_state(model) is None


def test_gamma0_forward_and_cached_generate_match_sdpa(model, monkeypatch):
    ids, attn = _batch()
    ref, gen = _masks_from(REF, GEN, ids.shape[1])
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        want_logits = model(input_ids=ids, attention_mask=attn).logits
    want = _generate(model, ids, attn)
    model.set_attn_implementation("dar")
    calls = _count_dar_calls(monkeypatch)
    with dar.rebalanced(model, dar.DARConfig(gamma=0.0), ref_mask=ref, gen_mask=gen):
        with torch.no_grad():
            got_logits = model(input_ids=ids, attention_mask=attn).logits
        assert calls["n"] == 2  # both layers went through dar.dar_attention
        got = _generate(model, ids, attn)
    torch.testing.assert_close(got_logits, want_logits, **TOL)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, **TOL)


def test_float_4d_mask_equals_bool_4d_mask(model):
    """A custom 4-D additive mask with the dtype's minimum behaves like the boolean one (same R, same output)."""
    ids, attn = _batch()
    length = ids.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & attn.bool()[:, None, None, :]
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    ref, gen = _masks_from(REF, GEN, length)
    with dar.rebalanced(model, dar.DARConfig(gamma=0.5, num_samples=4), ref_mask=ref, gen_mask=gen), torch.no_grad():
        a = model(input_ids=ids, attention_mask=allowed).logits
        b = model(input_ids=ids, attention_mask=additive).logits
    valid = attn.bool()
    torch.testing.assert_close(a[valid], b[valid], **TOL)


# ----------------------------------------------------------------------------------------- DAR on

def _check_call_against_oracles(call, layouts, cfg):
    """One captured attention call: dar's reference backend and the float64 oracle give its output."""
    q, k, v, mask = call["q"], call["k"], call["v"], call["mask"]
    assert k.shape[1] < q.shape[1]  # GQA reaches dar with K/V not repeated
    ref_out = dar.dar_attention(q, k, v, layouts, cfg, attn_mask=mask, scale=call["scaling"], backend="reference")
    out64, w64, rhat, th = dar_float64(q, k, v, layouts, cfg, attn_mask=mask, scale=call["scaling"])
    assert stable_keys(rhat, th, THRESHOLD_MARGIN[torch.float32]).all(), "case sits on a threshold: pick another"
    got = call["out"].transpose(1, 2)  # back to (B, H, L, D)
    torch.testing.assert_close(got, ref_out, **TOL)
    torch.testing.assert_close(got.double(), torch.from_numpy(out64), atol=2e-5, rtol=2e-5)
    return ref_out, w64


def test_dar_forward_equals_reference_on_captured_qkv(model, monkeypatch):
    ids, attn = _batch()
    length = ids.shape[1]
    cfg = dar.DARConfig(gamma=0.6, num_samples=4, sampling="strided", tau_high=0.6, tau_low=0.4)
    ref, gen = dar_tf.image_token_masks(ids, IMG, generated=-1)
    assert torch.equal(torch.stack(_masks_from(REF, GEN, length)), torch.stack([ref, gen]))
    cap = Capture(monkeypatch)
    with dar.rebalanced(model, cfg, ref_mask=ref, gen_mask=gen), torch.no_grad():
        model(input_ids=ids, attention_mask=attn)
    assert [c["layer"] for c in cap.calls] == [0, 1]
    layouts = [dar.TokenLayout(ref=REF[b], gen=GEN[b]) for b in range(2)]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for call in cap.calls:
        # transformers' own causal + left-padding mask reached dar unchanged
        assert torch.equal(call["mask"], causal[None, None] & attn.bool()[:, None, None, :])
        ref_out, w = _check_call_against_oracles(call, layouts, cfg)
        # ... and DAR really rebalanced: boosted and damped keys, and outputs unlike plain attention
        assert (w > 1).any() and (w < 1).any()
        plain = dar.dar_attention(call["q"], call["k"], call["v"], layouts, cfg.replace(gamma=0.0),
                                  attn_mask=call["mask"], scale=call["scaling"], backend="reference")
        assert (ref_out - plain).abs().max() > 1e-3


def test_cached_decode_equals_no_cache_recomputation(model):
    """Reference and generated images in the prompt; decoding continues with text under DAR."""
    ids, attn = _batch()
    ref, gen = dar_tf.image_token_masks(ids, IMG, generated=-1)
    cfg = dar.DARConfig(gamma=0.6, num_samples=4)
    with dar.rebalanced(model, cfg, ref_mask=ref, gen_mask=gen):
        cached = _generate(model, ids, attn, use_cache=True)
        fresh = _generate(model, ids, attn, use_cache=False)
    assert torch.equal(cached.sequences, fresh.sequences)
    for a, b in zip(cached.logits, fresh.logits):
        torch.testing.assert_close(a, b, **TOL)
    with dar.rebalanced(model, cfg.replace(gamma=0.0), ref_mask=ref, gen_mask=gen):
        plain = _generate(model, ids, attn)
    assert (cached.logits[0] - plain.logits[0]).abs().max() > 1e-3  # DAR changed the prefill


def test_decode_steps_on_generated_positions(model, monkeypatch):
    """Janus-style: the generated image is decoded token by token after the prompt. Each cached decode step
    queries one generated position against all cached keys; its layout is mapped from absolute positions."""
    ids, attn = _batch()
    length = ids.shape[1]
    cfg = dar.DARConfig(gamma=0.6, num_samples=4)
    ref, gen = dar_tf.image_token_masks(ids, IMG, num_generated=3)  # every image in the prompt is a reference
    ref_abs = [REF[b] + GEN[b] for b in range(2)]
    cap = Capture(monkeypatch)
    counted = _count_dar_calls(monkeypatch)
    with dar.rebalanced(model, cfg, ref_mask=ref, gen_mask=gen):
        _generate(model, ids, attn)
    # prefill (no generated query: plain sdpa) + 3 decode steps at positions L, L+1, L+2 (DAR on)
    decode = [c for c in cap.calls if c["q"].shape[2] == 1]
    assert len(decode) == 3 * 2 and counted["n"] == 6
    for i, call in enumerate(decode):
        lk = call["k"].shape[2]
        assert lk == length + i // 2 + 1  # keys = cache + the new token
        layouts = [dar.TokenLayout(ref=ref_abs[b], gen=((0, 1),)) for b in range(2)]
        ref_out, w = _check_call_against_oracles(call, layouts, cfg)
        assert (w != 1).any()


def test_chunked_prefill_maps_windows(model, monkeypatch):
    """Prefill in two chunks through a DynamicCache: the second chunk's queries start at position 15, its keys
    are the 15 cached ones plus its own, and transformers hands it a materialised causal + padding mask."""
    ids, attn = _batch()
    cfg = dar.DARConfig(gamma=0.6, num_samples=4, sampling="strided", tau_high=0.65, tau_low=0.35)
    ref, gen = _masks_from(REF, GEN, ids.shape[1])
    cap = Capture(monkeypatch)
    cache = DynamicCache()
    with dar.rebalanced(model, cfg, ref_mask=ref, gen_mask=gen), torch.no_grad():
        model(input_ids=ids[:, :15], attention_mask=attn[:, :15], use_cache=True, **{CACHE_KW: cache})
        model(input_ids=ids[:, 15:], attention_mask=attn, use_cache=True, **{CACHE_KW: cache})
    first = [dar.TokenLayout(ref=REF[0], gen=((13, 15),)), dar.TokenLayout(ref=REF[1])]
    second = [dar.TokenLayout(ref=REF[0], gen=((0, 4),)), dar.TokenLayout(ref=REF[1], gen=((0, 5),))]
    assert [(c["q"].shape[2], c["k"].shape[2]) for c in cap.calls] == [(15, 15)] * 2 + [(6, 21)] * 2
    for call, layouts in zip(cap.calls, [first, first, second, second]):
        if call["mask"] is not None:
            assert call["mask"].shape == (2, 1, call["q"].shape[2], call["k"].shape[2])
        _check_call_against_oracles(call, layouts, cfg)


def test_gradients_flow_in_training_mode_without_dropout(model):
    ids, attn = _batch()
    ref, gen = _masks_from(REF, GEN, ids.shape[1])
    grads = []
    model.train()
    try:
        for gamma in (0.0, 0.6):
            model.zero_grad()
            with dar.rebalanced(model, dar.DARConfig(gamma=gamma, num_samples=4), ref_mask=ref, gen_mask=gen):
                model(input_ids=ids, attention_mask=attn).logits[attn.bool()].square().mean().backward()
            grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    finally:
        model.eval()
        model.zero_grad()
    assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in grads)
    assert (grads[0] - grads[1]).abs().max() > 1e-6


def test_two_models_are_independent():
    a, b = _build("llama"), _build("llama")
    ids, attn = _batch()
    ref, gen = _masks_from(REF, GEN, ids.shape[1])
    with torch.no_grad():
        base = a(input_ids=ids, attention_mask=attn).logits
        with dar.rebalanced(a, dar.DARConfig(gamma=0.6, num_samples=4), ref_mask=ref, gen_mask=gen):
            on = a(input_ids=ids, attention_mask=attn).logits
            other = b(input_ids=ids, attention_mask=attn).logits
    assert torch.equal(other, base)
    assert (on - base).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------- errors

def test_enable_errors(monkeypatch):
    model = _build("llama")
    ids, _ = _batch()
    ref, gen = _masks_from(REF, GEN, ids.shape[1])
    with pytest.raises(TypeError, match="ref_mask"):
        dar.enable(model, ref_mask=ref.long(), gen_mask=gen)
    with pytest.raises(ValueError, match="same shape"):
        dar.enable(model, ref_mask=ref, gen_mask=gen[:, :-1])
    with pytest.raises(ValueError, match=r"ref_mask must have shape \(B, L\)"):
        dar.enable(model, ref_mask=ref[None], gen_mask=gen[None])
    with pytest.raises(TypeError, match="config"):
        dar.enable(model, {"gamma": 0.1}, ref_mask=ref, gen_mask=gen)
    with pytest.raises(ValueError, match="backend"):
        dar.enable(model, ref_mask=ref, gen_mask=gen, backend="cuda")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        dar_tf.enable(torch.nn.Linear(2, 2), ref_mask=ref, gen_mask=gen)
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        dar.enable(model, ref_mask=ref, gen_mask=gen)
    model.set_attn_implementation("dar")
    monkeypatch.delitem(AttentionInterface._global_mapping, "dar")
    with pytest.raises(RuntimeError, match=r"register\(\)"):
        with dar.rebalanced(model, ref_mask=ref, gen_mask=gen):
            pass
    assert dar_tf.active_state(model) is None
    dar_tf.disable(model)  # disabling a model that is not enabled is a no-op


def test_enable_replaces_and_disable_restores():
    model = _build("llama")
    ids, attn = _batch()
    ref, gen = _masks_from(REF, GEN, ids.shape[1])
    hooks = lambda: len(model.model._forward_pre_hooks) + len(model.model._forward_hooks)  # noqa: E731
    before = hooks()
    first = dar.enable(model, dar.DARConfig(gamma=0.1), ref_mask=ref, gen_mask=gen)
    second = dar.enable(model.model, dar.DARConfig(gamma=0.2), ref_mask=ref, gen_mask=gen)  # same decoder
    assert first is not second and dar_tf.active_state(model) is second and hooks() == before + 2
    assert model.model.layers[1].self_attn.__dict__["_dar_state"] is second
    dar.disable(model)
    assert dar_tf.active_state(model) is None and hooks() == before
    assert not any("_dar_state" in m.__dict__ for m in model.modules())


def _chunked_decoder_prefill(model, ids, attn, cache, how: str):
    """Prefill through the decoder itself in two chunks, handing it the cache by keyword or positionally."""
    decoder = model.get_decoder()
    params = list(inspect.signature(decoder.forward).parameters)
    outs = []
    for chunk, mask in ((slice(0, 15), attn[:, :15]), (slice(15, None), attn)):
        if how == "positional":  # (input_ids, attention_mask, position_ids, <cache>, ...) in every 5.x release
            args = [None] * params.index(CACHE_KW)
            args[:2] = [ids[:, chunk], mask]
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -ids[:, chunk].shape[1]:]
            args[2] = position_ids
            outs.append(decoder(*args, cache, use_cache=True).last_hidden_state)
        else:
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -ids[:, chunk].shape[1]:]
            outs.append(decoder(input_ids=ids[:, chunk], attention_mask=mask, position_ids=position_ids,
                                use_cache=True, **{how: cache}).last_hidden_state)
    return torch.cat(outs, dim=1)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("how", ["cache", "past_key_values", "positional"])
@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_cache_found_however_it_is_passed(model, how, cache_kind):
    """The binding reads the cache length from whichever decoder argument is a Cache: the ``cache`` keyword
    (5.24+), the ``past_key_values`` keyword (the name up to 5.23, an alias after) or positionally. A chunked
    prefill through a DynamicCache or a StaticCache, DAR on, then gives what the keyword DynamicCache path gives
    (whose every call test_chunked_prefill_maps_windows checks against the oracles). A mis-read cache length
    raises (dynamic) or shifts the layout windows (static), and either shows here."""
    if how == "cache" and CACHE_KW != "cache":
        pytest.skip("this transformers release has no `cache` argument (it is called past_key_values)")
    from transformers import StaticCache

    ids, attn = _batch()
    ref, gen = _masks_from(REF, GEN, ids.shape[1])
    cfg = dar.DARConfig(gamma=0.6, num_samples=4, sampling="strided")

    def new_cache(kind):
        if kind == "dynamic":
            return DynamicCache(config=model.config)
        return StaticCache(config=model.config, max_cache_len=32)

    with torch.no_grad():
        with dar.rebalanced(model, cfg, ref_mask=ref, gen_mask=gen):
            want = _chunked_decoder_prefill(model, ids, attn, new_cache("dynamic"), CACHE_KW)
            got = _chunked_decoder_prefill(model, ids, attn, new_cache(cache_kind), how)
        with dar.rebalanced(model, cfg.replace(gamma=0.0), ref_mask=ref, gen_mask=gen):
            plain = _chunked_decoder_prefill(model, ids, attn, new_cache(cache_kind), how)
    valid = attn.bool()
    torch.testing.assert_close(got[valid], want[valid], **TOL)
    assert (got[valid] - plain[valid]).abs().max() > 1e-3  # DAR changed the forward being compared


def test_position_unknown_raises(model):
    """An attention call reached outside the decoder's forward (no cache length known) with Lq != Lk raises
    instead of guessing where its queries sit."""
    ids, attn = _batch()
    ref, gen = _masks_from(REF, GEN, ids.shape[1])
    attn_mod = model.get_decoder().layers[0].self_attn
    q = torch.randn(2, 4, 3, 8)
    kv = torch.randn(2, 2, ids.shape[1], 8)
    with dar.rebalanced(model, dar.DARConfig(gamma=0.5), ref_mask=ref, gen_mask=gen):
        with pytest.raises(ValueError, match="cannot tell where this call's 3 queries sit"):
            dar_tf.dar_attention_forward(attn_mod, q, kv, kv, None, scaling=0.35)


def test_legacy_tuple_cache_is_refused(model):
    ids, attn = _batch()
    ref, gen = _masks_from(REF, GEN, ids.shape[1])
    legacy = tuple((torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 8)) for _ in range(2))
    with dar.rebalanced(model, ref_mask=ref, gen_mask=gen), torch.no_grad():
        with pytest.raises((TypeError, ValueError)):
            model.get_decoder()(input_ids=ids, attention_mask=attn, **{CACHE_KW: legacy})


def test_call_errors():
    model = _build("llama")
    ids, attn = _batch()
    ref, gen = _masks_from(REF, GEN, ids.shape[1])
    three = (torch.cat([ref, ref[:1]]), torch.cat([gen, gen[:1]]))
    with dar.rebalanced(model, ref_mask=three[0], gen_mask=three[1]), torch.no_grad():
        with pytest.raises(ValueError, match="3 rows but the attention call has batch size 2"):
            model(input_ids=ids, attention_mask=attn)
    with dar.rebalanced(model, ref_mask=ref, gen_mask=gen), torch.no_grad():
        # caches whose key index is not the absolute position
        from transformers.cache_utils import DynamicSlidingWindowLayer
        cache = DynamicCache()
        cache.layers[:] = [DynamicSlidingWindowLayer(sliding_window=4) for _ in range(2)]
        with pytest.raises(ValueError, match="DynamicSlidingWindowLayer"):
            model(input_ids=ids, attention_mask=attn, **{CACHE_KW: cache})
        # attention dropout in training mode
        for mod in model.modules():
            if hasattr(mod, "attention_dropout"):
                mod.attention_dropout = 0.1
        model.train()
        with pytest.raises(ValueError, match="dropout"):
            model(input_ids=ids, attention_mask=attn)
    model.eval()


# ----------------------------------------------------------------------------------------- a multimodal model

def _tiny_janus():
    from transformers import JanusConfig, JanusForConditionalGeneration

    text = dict(SMALL, vocab_size=96, model_type="llama")
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8,
                  projection_dim=32, num_image_tokens=16, depth=1, mlp_ratio=2.0)
    vq = dict(embed_dim=8, num_embeddings=32, latent_channels=32, base_channels=32, channel_multiplier=[1, 1],
              num_res_blocks=1, num_patches=4, projection_dim=32, image_token_embed_dim=32, resolution=32)
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                                                      image_token_id=IMG)).eval()
    model.generation_config.generation_kwargs = {"boi_token_id": 3}
    return model


def test_janus_image_generation():
    """Janus decodes its 16 image tokens one at a time after the prompt (static cache by default, CFG doubles
    the batch). gamma=0 reproduces sdpa; DAR gives the same tokens with a static and a dynamic cache."""
    model = _tiny_janus()
    ids = torch.tensor([[1, 9, IMG, IMG, IMG, IMG, 11, IMG, IMG, IMG, IMG, 12, 13, 3]])
    ref, gen = dar_tf.image_token_masks(ids, IMG, num_generated=16)

    def run(impl, cfg=None, **kw):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            if cfg is None:
                return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                                      do_sample=False, guidance_scale=2.0, num_return_sequences=1, max_length=30, **kw)
            with dar.rebalanced(model, cfg, ref_mask=ref, gen_mask=gen):
                assert model.model.language_model.layers[0].self_attn.__dict__.get("_dar_state") is not None
                assert "_dar_state" not in model.model.vision_model.__dict__  # only the language model
                return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                                      do_sample=False, guidance_scale=2.0, num_return_sequences=1, max_length=30, **kw)

    want = run("sdpa")
    assert torch.equal(run("dar", dar.DARConfig(gamma=0.0)), want)
    on_static = run("dar", dar.DARConfig(gamma=0.9, num_samples=4))
    on_dynamic = run("dar", dar.DARConfig(gamma=0.9, num_samples=4), **{CACHE_KW: DynamicCache()})
    assert torch.equal(on_static, on_dynamic)
    assert not torch.equal(on_static, want)
