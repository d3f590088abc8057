"""The `dar` command's basics, and one clear line naming the extra whenever an optional dependency is missing."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dar
import dar.cli
from dar.bench import main as bench_main
from dar.config import DARConfig
from dar.extras import MissingExtra

ROOT = Path(__file__).resolve().parents[2]


def test_version(capsys):
    assert dar.cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dar-attention {dar.__version__}"


def test_unknown_command_prints_usage_and_exits_2(capsys):
    assert dar.cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'frobnicate'" in err and "usage: dar" in err


def test_no_command_is_a_usage_error_and_help_is_not(capsys):
    assert dar.cli.main([]) == 2
    assert "usage: dar" in capsys.readouterr().err
    assert dar.cli.main(["--help"]) == 0
    assert "usage: dar" in capsys.readouterr().out


def test_demo_help_lists_every_config_field_with_default_and_meaning(capsys):
    with pytest.raises(SystemExit) as exit_:
        dar.cli.main(["demo", "--help"])
    assert exit_.value.code == 0
    section = capsys.readouterr().out.split("DARConfig:")[1]  # the options list, not the usage line
    text = " ".join(section.split())  # argparse wraps lines
    defaults = DARConfig()
    for field in dataclasses.fields(DARConfig):
        flag = "--sample-seed" if field.name == "seed" else "--" + field.name.replace("_", "-")
        match = re.search(re.escape(flag) + r" \S+ (.*?)\(default: ([^)]*)\)", text)
        assert match, f"{flag} missing from dar demo --help"
        assert match.group(1).strip(), f"{flag} has no meaning"
        assert match.group(2) == str(getattr(defaults, field.name))


def test_demo_output_folder_is_ignored_by_git():
    ignored = subprocess.run(["git", "check-ignore", "-q", "dar_demo/heatmaps.png"], cwd=ROOT)
    assert ignored.returncode == 0


@pytest.fixture
def without(monkeypatch):
    """Make ``import NAME`` fail as it does when the package is not installed."""
    def block(*names):
        for name in names:
            for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                monkeypatch.delitem(sys.modules, mod)
            monkeypatch.setitem(sys.modules, name, None)
    return block


class Transformer2DModel(torch.nn.Module):
    """Shaped like a diffusers transformer (attention modules with a `processor`), without diffusers."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.Linear(2, 2)
        self.attn.processor = object()


def test_enable_and_disable_without_diffusers_name_the_extra(without):
    without("diffusers")
    model = Transformer2DModel()
    for verb in (dar.enable, dar.disable):
        with pytest.raises(MissingExtra, match=r'dar\.(enable|disable) on Transformer2DModel needs diffusers, which '
                                               r'is not installed: pip install "dar-attention\[diffusers\]"'):
            verb(model)


def test_register_without_transformers_names_the_extra(without):
    from dar.bindings import transformers as dar_tf

    without("transformers")
    with pytest.raises(MissingExtra, match=r'pip install "dar-attention\[transformers\]"'):
        dar_tf.register()


def test_demo_without_diffusers_is_one_line_and_exit_1(without, capsys, tmp_path):
    without("diffusers")
    assert dar.cli.main(["demo", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == 'dar demo needs diffusers, which is not installed: pip install "dar-attention[diffusers]"'


def test_info_tune_help_says_what_it_does_here(capsys):
    with pytest.raises(SystemExit):
        dar.cli.main(["info", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    if torch.cuda.is_available():
        assert "on this GPU among triton" in text
    else:  # one candidate on CPU: nothing to time, and the help says so
        assert "no CUDA device" in text and "without timing anything" in text


def test_dir_lists_each_name_once():
    dar.DARConfig, dar.enable  # loaded names sit in the module's globals as well as in its export table
    names = dir(dar)
    assert len(names) == len(set(names)) and {"DARConfig", "enable", "dar_attention"} <= set(names)


def test_bench_e2e_without_diffusers_exits_1(without, capsys, tmp_path):
    without("diffusers")
    assert dar.cli.main(["bench", "e2e", "--quick", "--out", str(tmp_path)]) == 1
    assert 'pip install "dar-attention[bench]"' in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written that looks like a result


QUICK_ONE = ["kernels", "--quick", "--preset", "quick-L64-d16-fp32-mha", "--impl", "eager", "--warmup", "0",
             "--reps", "1"]


def test_bench_without_matplotlib_skips_the_plot_and_says_so(without, capsys, tmp_path):
    without("matplotlib")
    assert bench_main([*QUICK_ONE, "--out", str(tmp_path)]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert [p.suffix for p in sorted(tmp_path.iterdir())] == [".json", ".md"]


def test_bench_exits_nonzero_when_a_run_fails(monkeypatch, tmp_path, capsys):
    from dar.bench import impls

    real = impls.IMPLS["eager"]

    class Broken(type(real)):
        def build(self, *args, **kwargs):
            def call():
                raise RuntimeError("kernel exploded")
            return call

    monkeypatch.setitem(impls.IMPLS, "eager", Broken(real.name, real.kind, real.description))
    assert bench_main([*QUICK_ONE, "--no-plot", "--out", str(tmp_path)]) == 1
    assert "1 run(s) failed" in capsys.readouterr().err
    res = json.loads(next(tmp_path.glob("*.json")).read_text())
    (row,) = res["results"]  # the report says what went wrong: the correctness check (which runs first) crashed
    assert row["status"] == "skipped" and row["reason"].startswith("failed the correctness check")
