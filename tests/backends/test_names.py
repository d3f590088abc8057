"""One backend vocabulary: every entry point accepts the names of `dar.backends.NAMES` (the ``torch:<SDPA
kernel>`` ones included), rejects other names with one wording, and refuses a backend that cannot run a
call kind with that backend's reason (issue 22 item 7).

The ``torch:math`` results are compared with plain ``torch`` (same scoring, SDPA restricted to its math
kernel) and with the reference backend.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import dar
from dar.backends import NAMES, check_backend
from dar.varlen import VARLEN_BACKENDS

CFG = dar.DARConfig(gamma=0.5, num_samples=4)
LAY = dar.TokenLayout(ref=[(0, 6)], gen=[(6, 12)])


def _dense(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, 12, 8, generator=g) for h in (4, 2, 2)]


def _packed(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(20, h, 8, generator=g) for h in (4, 2, 2))
    cu = torch.tensor([0, 12, 20], dtype=torch.int32)
    lays = [LAY, dar.TokenLayout(ref=[(0, 4)], gen=[(4, 8)])]
    return q, k, v, (cu, cu, 12, 12, lays, CFG)


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-process gloo group (what a head_group= / seq_group= call needs), torn down after the test."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_one_wording_for_unknown_names():
    for bad in ("fast", "torch:sage", "Torch"):
        with pytest.raises(ValueError, match=r"backend must be one of \('reference'"):
            check_backend(bad)
    with pytest.raises(TypeError, match="backend must be a str"):
        check_backend(None)
    q, k, v = _dense()
    for call in (lambda b: dar.dar_attention(q, k, v, LAY, CFG, backend=b),
                 lambda b: dar.compute_key_weights(q, k, LAY, CFG, backend=b),
                 lambda b: dar.dar_attention_varlen(*_packed()[:3], *_packed()[3], backend=b)):
        with pytest.raises(ValueError, match=r"backend must be one of \('reference'.*'torch:math'\), got 'fast'"):
            call("fast")


def test_torch_math_runs_packed_calls():
    q, k, v, args = _packed()
    want, want_w = dar.dar_attention_varlen(q, k, v, *args, backend="torch", return_weights=True)
    out, w = dar.dar_attention_varlen(q, k, v, *args, backend="torch:math", return_weights=True)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    assert torch.equal(w, want_w)
    assert torch.equal(dar.compute_key_weights_varlen(q, k, *args, backend="torch:math"), want_w)
    ref = dar.dar_attention_varlen(q, k, v, *args, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_packed_refusals_give_the_reason():
    q, k, v, args = _packed()
    with pytest.raises(ValueError, match="backend='flex' cannot run these inputs: flex has no varlen path"):
        dar.dar_attention_varlen(q, k, v, *args, backend="flex")
    with pytest.raises(ValueError, match="backend='torch:cudnn' cannot run these inputs: SDPA's cudnn kernel runs "
                                         "on CUDA only"):
        dar.dar_attention_varlen(q, k, v, *args, backend="torch:cudnn")
    assert "flex" not in VARLEN_BACKENDS and set(VARLEN_BACKENDS) == set(NAMES) - {"flex"}


def test_sharded_key_weights_take_every_name(one_rank_group):
    q, k, v = _dense()
    want = dar.compute_key_weights(q, k, LAY, CFG, backend="reference")
    for name in ("torch:math", "torch:cudnn", "flex", "auto"):
        w = dar.compute_key_weights(q, k, LAY, CFG, backend=name, head_group=one_rank_group)
        torch.testing.assert_close(w, want, atol=1e-6, rtol=0)
    out = dar.dar_attention(q, k, v, LAY, CFG, backend="torch:math", head_group=one_rank_group)
    torch.testing.assert_close(out, dar.dar_attention(q, k, v, LAY, CFG, backend="reference"), atol=1e-5,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="backend must be one of"):
        dar.compute_key_weights(q, k, LAY, CFG, backend="sdpa", seq_group=one_rank_group)


def _qwen():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                        axes_dims_rope=(4, 6, 6)).eval()
    kwargs = dict(hidden_states=torch.randn(1, 32, 16), encoder_hidden_states=torch.randn(1, 5, 16),
                  encoder_hidden_states_mask=torch.ones(1, 5, dtype=torch.long), timestep=torch.tensor([0.5]),
                  img_shapes=[[(1, 4, 4), (1, 4, 4)]], return_dict=False)
    return model, kwargs


def test_diffusers_enable_takes_torch_kernel_names():
    pytest.importorskip("diffusers")
    model, kwargs = _qwen()
    outs = {}
    for name in ("torch", "torch:math", "reference"):
        handle = dar.enable(model, CFG, backend=name)
        assert handle.backend == name
        with torch.no_grad():
            outs[name] = model(**kwargs)[0]
        dar.disable(model)
    torch.testing.assert_close(outs["torch:math"], outs["torch"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["torch:math"], outs["reference"], atol=1e-4, rtol=1e-4)
    dar.enable(model, CFG, backend="torch:cudnn")  # valid everywhere; a CPU call would say cuDNN needs CUDA
    dar.disable(model)
    with pytest.raises(ValueError, match=r"backend must be one of \('reference'"):
        dar.enable(model, CFG, backend="torch:sage")


def test_transformers_enable_takes_torch_kernel_names():
    transformers = pytest.importorskip("transformers")
    from dar.bindings import transformers as dar_tf

    dar_tf.register()
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("dar")
    ids = torch.randint(3, 32, (1, 16))
    ref = torch.zeros(1, 16, dtype=torch.bool)
    ref[0, 2:8] = True
    gen = torch.zeros_like(ref)
    gen[0, 9:15] = True
    outs = {}
    for name in ("torch", "torch:math"):
        with dar.rebalanced(model, CFG, ref_mask=ref, gen_mask=gen, backend=name):
            with torch.no_grad():
                outs[name] = model(ids).logits
    torch.testing.assert_close(outs["torch:math"], outs["torch"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"backend must be one of \('reference'"):
        dar.enable(model, CFG, ref_mask=ref, gen_mask=gen, backend="cuda")
