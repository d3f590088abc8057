"""The static report's machinery (kernels/aot.py, benchmarks/static_report.py): SASS loop parsing,
launcher-style specialisation, and one real ahead-of-time compile for sm_90a read back.

The compile runs in a subprocess without TRITON_INTERPRET (the interpreter replaces the kernels);
it needs Triton's bundled ptxas / cuobjdump / nvdisasm, which every Linux triton wheel carries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

aot = pytest.importorskip("dar.kernels.aot", reason="triton is not installed")

ROOT = Path(__file__).resolve().parents[1]

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
    sig, const, attrs = aot.specialise(fn, args, {**const, "BLOCK_M": 64, "BLOCK_N": 64, "MASK_KEYS": True,
                                                  "WARP_SPECIALIZE": False})
    names = fn.arg_names
    assert sig["Q"] == "*bf16" and [["tt.divisibility", 16]] == attrs[(names.index("Q"),)]
    assert sig["stride_qd"] == "constexpr" and const["stride_qd"] == 1
    assert sig["Lk"] == "i32" and (names.index("Lk"),) not in attrs  # 1000 % 16 != 0
    assert (names.index("stride_qm"),) in attrs  # 64 % 16 == 0


_COMPILE = """
import json, sys
sys.path.insert(0, "benchmarks")
import static_report as sr
by = {v.name: v for v in sr.VARIANTS}
rows = [sr.compile_variant(by[n], 90) for n in ("attn-key_scale", "yardstick")]
print(json.dumps({"rows": rows, "md": sr.markdown({"triton": "x", "torch": "y", "commit": "z", "ptxas": {},
                                                    "results": rows, "errors": []})}))
"""


def test_report_compiles_for_sm90a_without_a_gpu():
    """A DAR variant and the yardstick compile for sm_90a and read back: one main loop each with
    wgmma (HGMMA), the yardstick's K/V arrive by TMA, no spills, and the Markdown has both rows."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    dar_row, yard = out["rows"]
    for r in (dar_row, yard):
        assert r["arch"] == "sm_90a" and r["loop"]["hgmma"] >= 12 and r["spill_stores"] == 0
        assert 100 < r["loop"]["per_64_keys"] < 3000 and r["registers"] > 0 and r["shared_bytes"] > 0
    assert yard["loop"]["utmaldg"] >= 2
    assert "| attn-key_scale (" in out["md"] and "| yardstick (" in out["md"]


def test_dar_bench_static_runs_the_report(capsys):
    """``dar bench static`` finds benchmarks/static_report.py of this checkout; --list needs no compile."""
    from dar.bench import main

    assert main(["static", "--list"]) == 0
    out = capsys.readouterr().out
    assert "attn-key_scale" in out and "yardstick" in out
