"""A fresh process: what ``import dar`` and a first call load, and a first use inside torch.compile.

The first-call time itself is measured by ``dar bench first-call`` (docs/benchmarks.md), never here; this checks
the structure behind it, which is deterministic: a first CPU call imports neither torch._dynamo nor a backend it
does not run (triton, FlexAttention), and backends load on first use even inside a compiled region.
"""

import subprocess
import sys

import pytest

FIRST_CALL = r"""
import sys
import torch
import dar
q, k, v = (torch.randn(1, 2, 96, 16) for _ in range(3))
layout = dar.TokenLayout(ref=[(32, 64), (64, 96)], gen=[(0, 32)])
dar.dar_attention(q, k, v, layout, dar.DARConfig(num_samples=8))
dar.compute_key_weights(q, k, layout, dar.DARConfig(num_samples=8))
loaded = [m for m in ("torch._dynamo", "triton", "dar.kernels.attention", "torch.nn.attention.flex_attention")
          if m in sys.modules]
print("loaded:", loaded)
"""

FIRST_USE_COMPILED = r"""
import sys
import torch
import dar
backend = sys.argv[1]
q, k, v = (torch.randn(1, 2, 128, 16) for _ in range(3))
layout = dar.TokenLayout(ref=[(32, 64), (64, 128)], gen=[(0, 32)])
cfg = dar.DARConfig(num_samples=8)
def f(q, k, v):
    return dar.dar_attention(q, k, v, layout, cfg, backend=backend)
out = torch.compile(f, fullgraph=True, backend="eager")(q, k, v)
ref = dar.dar_attention(q, k, v, layout, cfg, backend="reference")
torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
print("compiled ok")
"""


def _run(code, *args):
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)


def test_first_cpu_call_loads_only_what_it_runs():
    res = _run(FIRST_CALL)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "loaded: []" in res.stdout, res.stdout


@pytest.mark.parametrize("backend", ["torch", "torch:math", "flex"])  # reference: the oracle, never compiled
def test_first_use_of_a_backend_inside_a_fullgraph_compile(backend):
    res = _run(FIRST_USE_COMPILED, backend)
    assert res.returncode == 0 and "compiled ok" in res.stdout, res.stderr[-3000:]


def test_bench_first_call_writes_its_report(tmp_path):
    import json

    from dar.bench import main as bench_main

    assert bench_main(["first-call", "--runs", "1", "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("first-call-*.json")
    summary = json.loads(result.read_text())["summary"]
    assert summary["runs"] == 1 and summary["dar_first_s"] > 0 and summary["sdpa_first_s"] > 0
    assert summary["dynamo_loaded"] is False
    assert result.with_suffix(".md").is_file()


def test_sampler_is_marked_constant_exactly_as_torch_marks_it():
    # dar.sampling sets what torch.compiler.assume_constant_result sets, without importing torch._dynamo; if
    # torch changes how it marks a function, this fails (and so would a fullgraph compile of a DAR call).
    import torch

    from dar.sampling import _assume_constant_result, sample_positions

    def ours():
        return 0

    def theirs():
        return 0

    _assume_constant_result(ours)
    torch.compiler.assume_constant_result(theirs)
    assert vars(ours) == vars(theirs) and vars(theirs)
    assert vars(sample_positions) == vars(theirs)
