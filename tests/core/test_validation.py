"""Every invalid input raises ValueError/TypeError naming the argument."""

import numpy as np
import pytest
import torch

import dar

Q = torch.randn(2, 4, 10, 8)
K = torch.randn(2, 2, 12, 8)
V = torch.randn(2, 2, 12, 6)
LAY = dar.TokenLayout(ref=[(0, 4)], gen=[(4, 10)])


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(num_samples=0), ValueError, "num_samples"),
    (dict(num_samples=2.0), TypeError, "num_samples"),
    (dict(num_samples=True), TypeError, "num_samples"),
    (dict(gamma=-0.1), ValueError, "gamma"),
    (dict(gamma=1.0), ValueError, "gamma"),
    (dict(gamma=float("nan")), ValueError, "gamma"),
    (dict(gamma="0.1"), TypeError, "gamma"),
    (dict(tau_high=1.5), ValueError, "tau_high"),
    (dict(tau_low=-0.1), ValueError, "tau_low"),
    (dict(tau_low=0.7, tau_high=0.7), ValueError, "tau_low"),
    (dict(tau_low=0.8, tau_high=0.2), ValueError, "tau_low"),
    (dict(sampling="uniform"), ValueError, "sampling"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=2**64), ValueError, "seed"),  # past torch.Generator's range
    (dict(seed=2**70), ValueError, "seed"),
    (dict(seed=1.0), TypeError, "seed"),
    (dict(gamma=True), TypeError, "gamma"),
    (dict(gamma=np.bool_(False)), TypeError, "gamma"),
    (dict(tau_high=torch.tensor(True)), TypeError, "tau_high"),
    (dict(tau_low=torch.tensor([0.1])), TypeError, "tau_low"),
    (dict(gamma=np.float64(1.5)), ValueError, "gamma"),
    (dict(normalize="global"), ValueError, "normalize"),
    (dict(thresholds="otsu"), ValueError, "thresholds"),
    (dict(mode="logit"), ValueError, "mode"),
    (dict(queries="text"), ValueError, "queries"),
])
def test_config_rejects(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        dar.DARConfig(**kwargs)


def test_config_replace_validates():
    with pytest.raises(ValueError, match="gamma"):
        dar.DARConfig().replace(gamma=2.0)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(ref=[(3, 1)]), ValueError, r"ref\[0\]"),
    (dict(ref=[(2, 2)]), ValueError, r"ref\[0\]"),
    (dict(ref=[(-1, 2)]), ValueError, r"ref\[0\]"),
    (dict(ref=[(0, 4), (2, 6)]), ValueError, "overlap"),
    (dict(ref=[(4, 6), (0, 2)]), ValueError, "key order"),
    (dict(gen=[(0, 4), (3, 6)]), ValueError, "overlap"),
    (dict(ref=[(0, 1.5)]), TypeError, "ints"),
    (dict(ref=[(0, 1, 2)]), TypeError, "pair"),
    (dict(ref="0,4"), TypeError, "sequence"),
    (dict(ref=[(0, 6)], image_shapes=[(2, 2)]), ValueError, "image_shapes"),
    (dict(ref=[(0, 6)], image_shapes=[(2, 3), (1, 1)]), ValueError, "image_shapes"),
    (dict(ref=[(0, 4)], image_shapes=[(4,)]), ValueError, r"image_shapes\[0\].*pair"),
    (dict(ref=[(0, 4)], image_shapes=[(1, 2, 2)]), ValueError, r"image_shapes\[0\].*pair"),
    (dict(ref=[(0, 4)], image_shapes=[(2.0, 2)]), TypeError, r"image_shapes\[0\]"),
    (dict(ref=[(0, 4)], image_shapes=4), TypeError, "image_shapes"),
])
def test_layout_rejects(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        dar.TokenLayout(**kwargs)


def test_layout_accepts_numpy_and_torch_ints_and_normalises():
    import numpy as np
    lay = dar.TokenLayout(ref=[(np.int64(0), torch.tensor(4))], gen=[[6, 8], (4, 6)], image_shapes=[(2, 2)])
    assert lay.ref == ((0, 4),) and lay.gen == ((4, 6), (6, 8)) and lay.image_shapes == ((2, 2),)
    assert hash(lay) == hash(dar.TokenLayout(ref=[(0, 4)], gen=[(4, 6), (6, 8)], image_shapes=[(2, 2)]))


@pytest.mark.parametrize("make", [np.float32, np.float64, torch.tensor, lambda x: torch.tensor(x, dtype=torch.float64)])
def test_config_and_scale_accept_real_scalars(make):
    cfg = dar.DARConfig(gamma=make(0.25), tau_high=make(0.75), tau_low=make(0.25), seed=np.int64(7),
                        num_samples=torch.tensor(3))
    # Stored as Python numbers: the config compares and hashes by value (the plan cache keys on it).
    assert cfg == dar.DARConfig(gamma=0.25, tau_high=0.75, tau_low=0.25, seed=7, num_samples=3)
    assert all(type(x) is float for x in (cfg.gamma, cfg.tau_high, cfg.tau_low))
    assert type(cfg.seed) is int and type(cfg.num_samples) is int
    out = dar.dar_attention(Q, K, V, LAY, cfg, scale=make(0.5), backend="reference")
    torch.testing.assert_close(out, dar.dar_attention(Q, K, V, LAY, cfg, scale=0.5, backend="reference"))


def test_largest_seed_runs():
    cfg = dar.DARConfig(seed=2**64 - 1, gamma=0.5)
    dar.compute_key_weights(Q, K, LAY, cfg, backend="torch")


@pytest.mark.parametrize("scale, exc", [(True, TypeError), (np.bool_(True), TypeError), (torch.tensor(True), TypeError),
                                        (torch.tensor([0.5]), TypeError), (np.float32("nan"), ValueError),
                                        (torch.tensor(0.0), ValueError)])
def test_scale_rejects_bools_and_non_scalars(scale, exc):
    with pytest.raises(exc, match="scale"):
        _call(scale=scale)


def _call(**over):
    args = dict(q=Q, k=K, v=V, layout=LAY, cfg=dar.DARConfig())
    args.update(over)
    return dar.dar_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("layout"), args.pop("cfg"), **args)


@pytest.mark.parametrize("over, exc, words", [
    (dict(layout=dar.TokenLayout(ref=[(0, 13)])), ValueError, "Lk=12"),
    (dict(layout=dar.TokenLayout(gen=[(0, 11)])), ValueError, "Lq=10"),
    (dict(layout=[LAY]), ValueError, "batch size"),
    (dict(layout=[LAY, "x"]), TypeError, r"layout\[1\]"),
    (dict(layout={"ref": []}), TypeError, "layout"),
    (dict(cfg={"gamma": 0.1}), TypeError, "cfg"),
    (dict(q=Q[0]), ValueError, "q must be 4-D"),
    (dict(q=Q.long()), TypeError, "q must be float"),
    (dict(k=K.double()), TypeError, "k has dtype"),
    (dict(v=V.half()), TypeError, "v has dtype"),
    (dict(k=torch.randn(1, 2, 12, 8)), ValueError, "batch"),
    (dict(k=torch.randn(2, 2, 12, 4)), ValueError, "head dims"),
    (dict(k=torch.randn(2, 3, 12, 8), v=torch.randn(2, 3, 12, 6)), ValueError, "multiple"),
    (dict(v=torch.randn(2, 2, 11, 6)), ValueError, "v must have shape"),
    (dict(v=None), TypeError, "v must be"),
    (dict(scale="big"), TypeError, "scale"),
    (dict(scale=float("inf")), ValueError, "scale"),
    (dict(scale=0.0), ValueError, "scale"),
    (dict(attn_mask=torch.ones(10, 12, dtype=torch.int32)), TypeError, "attn_mask"),
    (dict(attn_mask=[[True]]), TypeError, "attn_mask"),
    (dict(attn_mask=torch.ones(2, 4, 10, 11, dtype=torch.bool)), ValueError, "Lk dim"),
    (dict(attn_mask=torch.ones(3, 1, 1, 12, dtype=torch.bool)), ValueError, "B dim"),
    (dict(attn_mask=torch.ones(1, 1, 1, 1, 12, dtype=torch.bool)), ValueError, "attn_mask"),
    (dict(attn_mask=torch.ones(1, 12, dtype=torch.bool), is_causal=True), ValueError, "is_causal"),
    (dict(is_causal=1), TypeError, "is_causal"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(backend=None), TypeError, "backend"),
    (dict(return_weights="yes"), TypeError, "return_weights"),
])
def test_call_rejects(over, exc, words):
    with pytest.raises(exc, match=words):
        _call(**over)


def test_zero_sized_inputs_rejected():
    with pytest.raises(ValueError, match="zero-sized"):
        dar.dar_attention(torch.randn(1, 1, 0, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8), dar.TokenLayout(),
                          dar.DARConfig())


def test_triton_named_explicitly_raises_when_it_cannot_run():
    # On a CPU without the interpreter (or with inputs triton cannot take) the explicit choice is an error,
    # never a silent fallback.
    with pytest.raises((ValueError, ImportError), match="triton"):
        _call(q=Q.double(), k=K.double(), v=V.double(), backend="triton")


def test_auto_on_cpu_uses_torch_and_is_silent(recwarn):
    out = _call(backend="auto")
    ref = _call(backend="torch")
    assert torch.equal(out, ref)
    assert not [w for w in recwarn if "dar" in str(w.message)]


def test_blhd_tensors_get_a_transpose_hint():
    """(B, L, H, D) tensors (diffusers' and flash-attn's layout) passed as they are: the layout error says to
    transpose, because the layout fits dim 1; a layout that fits neither reading gets no hint."""
    q = torch.randn(1, 300, 4, 16)
    lay = dar.TokenLayout(ref=[(84, 148)], gen=[(148, 300)])
    with pytest.raises(ValueError, match=r"exceeds the number of keys Lk=4.*did you pass \(B, L, H, D\) tensors\? "
                                         r".*transpose\(1, 2\) first"):
        dar.dar_attention(q, q, q, lay)
    with pytest.raises(ValueError) as err:
        dar.dar_attention(q, q, q, dar.TokenLayout(ref=[(84, 148)], gen=[(148, 400)]))
    assert "transpose" not in str(err.value)
    out = dar.dar_attention(q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2), lay)  # and then it runs
    assert out.shape == (1, 4, 300, 16)
