"""The wheel installs kernels/ and bindings/ as dar.kernels / dar.bindings, nothing at top level."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_kernels_and_bindings_under_dar(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"dar"}, top
    assert "dar/kernels/__init__.py" in names and "dar/bindings/__init__.py" in names
    assert "dar/backends/reference.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "dar = dar.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_dar_info_runs():
    out = subprocess.run([sys.executable, "-m", "dar.cli", "info"], check=True, capture_output=True, text=True).stdout
    assert "torch" in out and "reference  yes" in out and "torch      yes" in out
