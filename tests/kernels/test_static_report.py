"""The static report's machinery (kernels/aot.py, benchmarks/static_report.py): SASS loop parsing,
launcher-style specialisation, ``dar bench static``. The real ahead-of-time compiles and the
Markdown table are checked in tests/kernels/test_static_targets.py, which compiles once for both.
"""

from __future__ import annotations


import pytest
import torch

aot = pytest.importorskip("dar.kernels.aot", reason="triton is not installed")


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_3:
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT, gsb0 ;
        /*0020*/                   FSEL R2, R3, RZ, P0 ;
        /*0030*/                   BRA.DIV UR5, `(.L_x_9) ;
.L_x_5:
        /*0040*/                   NOP ;
        /*0050*/                   FMUL R4, R4, R5 ;
        /*0060*/               @P1 BRA `(.L_x_3) ;
.L_x_6:
        /*0070*/                   IADD3 R1, R1, 0x1, RZ ;
        /*0080*/               @P2 BRA `(.L_x_6) ;
        /*0090*/                   EXIT ;
.L_x_9:
        /*00a0*/                   SHFL.BFLY PT, R1, R2, 0x1, 0x1f ;
        /*00b0*/                   BRA `(.L_x_5) ;
"""


def test_mma_loops_parses_back_edges():
    """One loop with an MMA (0x10-0x60, NOP excluded); the scalar loop has none; the slow path after
    EXIT that jumps back into the loop is not a loop; BRA.DIV is not a back edge."""
    loops = aot.mma_loops(SASS)
    assert len(loops) == 1
    lp = loops[0]
    assert (lp.start, lp.end) == (0x10, 0x60)
    assert lp.ops == ["HGMMA.64x64x16.F32.BF16", "FSEL", "BRA.DIV", "FMUL", "BRA"]
    s = lp.summary()
    assert (s["instructions"], s["hgmma"], s["mma"], s["fsel"]) == (5, 1, 1, 1)


def test_specialise_like_the_launcher():
    """Ints equal to 1 become constants, 16-divisible ints and aligned pointers get divisibility."""
    from dar.kernels import attention

    fn = attention._rebalanced_attention_fwd
    if not hasattr(fn, "arg_names"):  # interpreted: the Python function has the same arguments
        pytest.skip("needs the compiled kernel object")
    q = torch.empty(2, 24, 1000, 64, dtype=torch.bfloat16, device="meta")
    args, const = attention.kernel_arguments(q, q, q, None, None, None, False, 0.1, "key_scale", torch.empty_like(q))
    sig, const, attrs = aot.specialise(fn, args, {**const, "BLOCK_M": 64, "BLOCK_N": 64, "MASK_KEYS": True})
    names = fn.arg_names
    assert sig["Q"] == "*bf16" and [["tt.divisibility", 16]] == attrs[(names.index("Q"),)]
    assert sig["stride_qd"] == "constexpr" and const["stride_qd"] == 1
    assert sig["Lk"] == "i32" and (names.index("Lk"),) not in attrs  # 1000 % 16 != 0
    assert (names.index("stride_qm"),) in attrs  # 64 % 16 == 0


def test_dar_bench_static_runs_the_report(capsys):
    """``dar bench static`` finds benchmarks/static_report.py of this checkout; --list needs no compile."""
    from dar.bench import main

    assert main(["static", "--list"]) == 0
    out = capsys.readouterr().out
    assert "attn-key_scale" in out and "yardstick" in out
