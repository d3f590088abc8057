"""Which backends load in this environment, and that one which cannot says why.

CI runs this file on torch 2.14.1 / triton 3.8.0 (main run), on torch 2.15.0 / triton 3.9.0, triton 3.6.0, 3.4.0, 3.2.0 and torch
2.5.1 / triton 3.1.0 (compatibility stage), so both sides of each check below are exercised: the triton backend
is available from 3.2 on (the kernels probe what each release offers, dar.kernels.features) and reports the
triton it needs on 3.1; the flex backend likewise with the FlexAttention feature it needs.
"""

import inspect

import pytest
import torch

import dar
from dar import cli
from dar.backends import get_backend, select_backend, triton_available
from dar.call import make_call

triton = pytest.importorskip("triton")


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def test_triton_backend_loads_exactly_when_triton_is_recent_enough():
    why = triton_available()
    if _major_minor(triton.__version__) >= (3, 2):
        assert why is None
        assert get_backend("triton").name == "triton"
    else:
        assert why is not None and "triton >= 3.2" in why and triton.__version__ in why
        with pytest.raises(ImportError, match="triton >= 3.2"):
            get_backend("triton")


def test_flex_backend_loads_exactly_when_its_block_masks_take_lengths():
    from torch.nn.attention.flex_attention import BlockMask

    if "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        assert get_backend("flex").name == "flex"
    else:
        with pytest.raises(ImportError, match="seq_lengths"):
            get_backend("flex")


def test_auto_on_cpu_is_the_torch_backend_and_named_unavailable_backends_raise():
    q = torch.randn(1, 2, 8, 4)
    call = make_call(q, q, q, dar.TokenLayout(ref=[(0, 4)], gen=[(4, 8)]), None, None, None, False)
    assert select_backend("auto", call).name == "torch"
    for name in ("triton", "flex"):
        try:
            get_backend(name)
        except ImportError as exc:
            with pytest.raises(ImportError, match=str(exc).split(":")[0]):
                dar.dar_attention(q, q, q, dar.TokenLayout(ref=[(0, 4)], gen=[(4, 8)]), backend=name)


def test_dar_info_says_why_a_backend_is_missing(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    why = triton_available()
    line = next(ln for ln in out.splitlines() if ln.startswith("  triton "))  # the backends section
    if why is not None:
        assert "no:" in line and "triton >= 3.2" in line
    else:
        assert line.split()[1] in ("yes", "no:")  # "no:" only for a CPU without TRITON_INTERPRET
