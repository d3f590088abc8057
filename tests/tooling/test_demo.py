"""`dar demo` end to end on a very small configuration (CPU, nothing downloaded)."""

from __future__ import annotations

import re

import pytest

import dar.cli

TINY = ["--device", "cpu", "--size", "64", "--layers", "2", "--heads", "2", "--head-dim", "16", "--steps", "1",
        "--num-samples", "8", "--tau-high", "0.6", "--tau-low", "0.4"]


def test_demo_runs_checks_and_writes_heatmaps(tmp_path, capsys):
    out = tmp_path / "demo"
    assert dar.cli.main(["demo", "--out", str(out), *TINY]) == 0
    text = capsys.readouterr().out
    png = out / "heatmaps.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert "random weights" in text and "not image quality" in text
    assert "FAIL" not in text
    # Every check ran and passed: reference backend, gamma=0, recorder neutrality, disable.
    assert re.search(r"\[ok\] step 0: DAR on \(auto\) vs the reference backend", text)
    assert text.count("[ok] step") == 3 and "[ok] after dar.disable" in text
    # Per-layer statistics for both layers, and DAR moved the output.
    table = text.split("per-layer statistics")[1].splitlines()
    assert table[1].split()[:2] == ["layer", "n"] and [r.split()[0] for r in table[3:5]] == ["0", "1"]
    change = re.search(r"DAR changes the transformer's velocity by ([0-9.]+)%", text)
    assert change and float(change.group(1)) > 0


def test_demo_bad_options_exit_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="gamma"):
        dar.cli.main(["demo", "--out", str(tmp_path), "--gamma", "1.5"])
    with pytest.raises(SystemExit, match="multiple of 8"):
        dar.cli.main(["demo", "--out", str(tmp_path), "--head-dim", "12"])
