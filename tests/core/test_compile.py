"""torch.compile(fullgraph=True) traces through dar_attention with no graph break."""

import pytest
import torch

import dar


@pytest.mark.parametrize("mode", ["key_scale", "prob_scale"])
@pytest.mark.parametrize("causal", [False, True])
def test_fullgraph_compile_torch_backend(mode, causal):
    torch._dynamo.reset()
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 24, 8), torch.randn(2, 2, 24, 8), torch.randn(2, 2, 24, 8)
    lays = [dar.TokenLayout(ref=[(0, 6), (6, 12)], gen=[(12, 24)]), dar.TokenLayout(ref=[(0, 6)], gen=[(16, 24)])]
    cfg = dar.DARConfig(num_samples=5, gamma=0.5, mode=mode, normalize="per_image")

    def f(q, k, v):
        return dar.dar_attention(q, k, v, lays, cfg, is_causal=causal, backend="torch", return_weights=True)

    out_c, w_c = torch.compile(f, fullgraph=True, backend="eager")(q, k, v)
    out_e, w_e = f(q, k, v)
    assert (w_e != 1).any()
    torch.testing.assert_close(w_c, w_e)
    torch.testing.assert_close(out_c, out_e)


def test_fullgraph_compile_inductor_key_weights():
    torch._dynamo.reset()
    torch.manual_seed(1)
    q, k = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    lay = dar.TokenLayout(ref=[(0, 8)], gen=[(8, 16)])
    cfg = dar.DARConfig(num_samples=4, gamma=0.5, thresholds="quantile")
    f = lambda q, k: dar.compute_key_weights(q, k, lay, cfg, backend="torch")  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k), f(q, k))


def test_fullgraph_compile_under_autocast():
    # The public functions switch autocast off inside (dar.autocast); that context traces too.
    torch._dynamo.reset()
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    lay = dar.TokenLayout(ref=[(0, 8)], gen=[(8, 16)])
    cfg = dar.DARConfig(num_samples=4, gamma=0.5)

    def f(q, k, v):
        return dar.dar_attention(q, k, v, lay, cfg, backend="torch", return_weights=True)

    out_e, w_e = f(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_c, w_c = torch.compile(f, fullgraph=True, backend="eager")(q, k, v)
    assert out_c.dtype == torch.float32
    torch.testing.assert_close(w_c, w_e, rtol=0, atol=0)
    torch.testing.assert_close(out_c, out_e)
