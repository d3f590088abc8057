"""The kernel benchmark cases under pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

Same implementations and shapes as ``dar bench``. Every case first checks the callable it times, at
the timed shape (dar.bench.correctness: so a fast wrong kernel fails here), then times it.
Without CUDA only tiny shapes run (the triton backend under TRITON_INTERPRET=1, one round); the
real-size model shapes need a GPU and are skipped with that reason. An implementation that cannot
run here is skipped with the harness's "unavailable" reason.
"""

from __future__ import annotations

import pytest
import torch

from dar import DARConfig
from dar.bench import correctness, kernels, shapes
from dar.bench.impls import IMPLS, Unavailable, availability

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
CFG = DARConfig()
CPU_SHAPES = [shapes.ALL_SHAPES[n] for n in ("quick-qwen-2ref", "quick-L64-d16-fp32-gqa")]
GPU_SHAPES = shapes.PRESETS["models"] + [shapes.ALL_SHAPES[f"sweep-L{n}-d128-bf16-mha"] for n in (4096, 16384)]
NEEDS_GPU = pytest.mark.skipif(not CUDA, reason="full-size model shapes need a CUDA GPU")

CASES = [pytest.param(s, name, id=f"{s.name}-{name}") for s in CPU_SHAPES for name in IMPLS]
CASES += [pytest.param(s, name, id=f"{s.name}-{name}", marks=NEEDS_GPU) for s in GPU_SHAPES for name in IMPLS]

_AVAILABLE = availability(list(IMPLS.values()))


@pytest.mark.parametrize("shape,impl_name", CASES)
def test_kernel(benchmark, shape, impl_name):
    impl = IMPLS[impl_name]
    if _AVAILABLE[impl_name] is not None:
        pytest.skip(f"unavailable: {_AVAILABLE[impl_name]}")
    q, k, v = kernels._inputs(shape, DEVICE)  # (B, L, H, D) views, as diffusers passes them
    try:
        fn = impl.build(q, k, v, shape.layout(), CFG)
    except Unavailable as exc:
        pytest.skip(f"unavailable: {exc}")
    check = correctness.check(impl, fn, q, k, v, shape.layout(), CFG, shape.dtype)
    if check["status"] == "unavailable":
        pytest.skip(f"unavailable: {check['reason']}")
    assert check["passed"], f"{impl_name} failed its correctness check: {check}"

    def call():
        with torch.no_grad(), impl.context():
            out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out

    slow = impl.interpreted(DEVICE)  # triton under the CPU interpreter: seconds per call
    benchmark.extra_info.update(shape=shape.describe(), impl=impl_name, device=str(DEVICE), flops=shape.flops)
    out = benchmark.pedantic(call, rounds=1 if slow else (20 if CUDA else 3), warmup_rounds=0 if slow else 1,
                             iterations=1)
    out = out[0] if isinstance(out, tuple) else out  # DAR rows return (out, w)
    expected = (shape.batch, shape.seq) if impl_name == "dar-weights" else (
        shape.batch, shape.heads_q, shape.seq, shape.head_dim)
    assert out.shape == expected
    if not benchmark.disabled:
        benchmark.extra_info["tflops"] = shape.flops / benchmark.stats.stats.median / 1e12
