"""The wheel installs kernels/ and bindings/ as dar.kernels / dar.bindings, nothing at top level."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
    # A CPU-only torch stays without triton: only the test extra (and so all) asks for it (CUDA builds of torch bring it).
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    # Name, version, Python, requirements and licence come from pyproject.toml's [project] (the Comfy Registry reads them)
    for line in ("Name: dar-attention", "Version: 0.1.0", "Requires-Python: >=3.10", "Requires-Dist: torch>=2.5",
                 "Requires-Dist: numpy", "Requires-Dist: einops", "License-Expression: Apache-2.0",
                 "Description-Content-Type: text/markdown"):
        assert line in meta.splitlines(), line
    needs = [ln for ln in meta.splitlines() if ln.startswith("Requires-Dist:") and "triton" in ln]
    assert needs and all('extra == "test"' in ln or 'extra == "all"' in ln for ln in needs), needs


def test_dar_info_runs():
    out = subprocess.run([sys.executable, "-m", "dar.cli", "info"], check=True, capture_output=True, text=True).stdout
    assert "torch" in out and "reference  yes" in out and "torch      yes" in out


# Run from the checkout's root, where ``python -m pytest``, ``python -c`` and scripts saved there put the root on
# sys.path: the top-level kernels/ and bindings/ folders must not stand in for installed packages of those names
# (transformers >= 5.25 imports the PyPI package ``kernels``).
_ROOT_IMPORTS = r"""
import importlib.util, os, sys
root = os.path.realpath(sys.argv[1])
assert os.path.realpath(sys.path[0] or os.getcwd()) == root, sys.path[:2]
import kernels, bindings
for mod in (kernels, bindings):  # (an installed package may live under the root too: a .venv in the clone)
    assert not os.path.realpath(mod.__file__).startswith(os.path.join(root, mod.__name__) + os.sep), mod.__file__
assert bindings.STAND_IN
import dar.kernels, dar.bindings  # the folders themselves, under their installed names
assert os.path.realpath(dar.kernels.__file__).startswith(root + os.sep)
if importlib.util.find_spec("transformers") is not None:
    from transformers import LlamaForCausalLM
    from dar.bindings import transformers as dar_tf
    dar_tf.register()
if importlib.util.find_spec("diffusers") is not None:
    import diffusers
    if hasattr(diffusers, "QwenImageEditPlusPipeline"):
        from diffusers import QwenImageEditPlusPipeline
print("root imports ok")
"""


def _stand_in(site: Path, name: str) -> None:
    (site / name).mkdir()
    (site / name / "__init__.py").write_text("STAND_IN = True\nclass CUDAProperties: pass\n")


def _from_root(code: str, site: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONSAFEPATH"}
    env["PYTHONPATH"] = str(site)  # after the root (sys.path[0]), before site-packages: where a user's packages sit
    return subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=ROOT, env=env, capture_output=True, text=True)


def test_checkout_root_does_not_shadow_installed_packages(tmp_path):
    import importlib.metadata

    try:  # the real `kernels` where pip installed it (transformers >= 5.25 needs it); else a stand-in
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        _stand_in(tmp_path, "kernels")
    _stand_in(tmp_path, "bindings")  # no PyPI package of that name is installed here: a stand-in for one
    res = _from_root(_ROOT_IMPORTS, tmp_path)
    assert res.returncode == 0 and "root imports ok" in res.stdout, res.stderr[-3000:]


_ABSENT = r"""
import importlib, importlib.util
import bindings  # no package of that name is installed: an empty namespace, as for a folder without __init__.py
assert getattr(bindings, "__file__", None) is None and not hasattr(bindings, "enable"), bindings
for sub in ("bindings.bagel", "bindings.diffusers"):
    try:
        importlib.import_module(sub)
    except ModuleNotFoundError:
        pass
    else:
        raise AssertionError(f"{sub} imported from the checkout")
if importlib.util.find_spec("transformers") is not None:
    # transformers' own probe for an optional package (how 5.25 decides whether to import `kernels`)
    from transformers.utils import import_utils
    assert import_utils._is_package_available("bindings", return_version=True)[0] is False
print("absent ok")
"""


def test_checkout_folders_are_not_importable_under_plain_names(tmp_path):
    res = _from_root(_ABSENT, tmp_path)
    assert res.returncode == 0 and "absent ok" in res.stdout, res.stderr[-3000:]
