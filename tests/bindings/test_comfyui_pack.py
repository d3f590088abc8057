"""The repository as a ComfyUI node pack (the root ``__init__.py``; docs/comfyui.md, "Install"): a clone in
``custom_nodes/`` loaded the way ComfyUI's loader loads it, with dar pip-installed and without, and the Comfy
Registry's metadata in pyproject.toml.

ComfyUI's loader (``nodes.load_custom_node``, read at github pollockjj/ComfyUI 618b803d and at the newest upstream
nodes.py; nothing of it is imported or copied): for a folder ``module_path`` in ``custom_nodes/`` it makes
``spec_from_file_location(module_path.replace(".", "_x_"), <folder>/__init__.py)``, puts the module into
``sys.modules`` under that name, executes it, and then reads ``WEB_DIRECTORY``, ``NODE_CLASS_MAPPINGS`` and
``NODE_DISPLAY_NAME_MAPPINGS`` with ``hasattr`` / ``getattr``, inside a ``try`` that logs any exception as an
import failure.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What ComfyUI's loader does with custom_nodes/<folder> (see above); `pack` is the folder's path.
LOAD_LIKE_COMFYUI = r"""
import importlib.util, os, sys
def load_like_comfyui(pack):
    name = pack.replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, os.path.join(pack, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    web = getattr(module, "WEB_DIRECTORY") if hasattr(module, "WEB_DIRECTORY") else None
    if hasattr(module, "NODE_CLASS_MAPPINGS") and getattr(module, "NODE_CLASS_MAPPINGS") is not None:
        return module, dict(module.NODE_CLASS_MAPPINGS), dict(getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", {})), web
    return module, None, None, web
"""


def _clone(tmp_path: Path, folder: str = "dar-attention") -> Path:
    """custom_nodes/<folder> holding what a git clone holds that the pack uses (not the .venv, not tests)."""
    pack = tmp_path / "ComfyUI" / "custom_nodes" / folder
    pack.mkdir(parents=True)
    for name in ("__init__.py", "pyproject.toml", "requirements.txt", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, pack / name)
    for name in ("dar", "kernels", "bindings"):
        shutil.copytree(ROOT / name, pack / name, ignore=shutil.ignore_patterns("__pycache__"))
    return pack


def _path_without(tmp_path: Path, hidden: set[str]) -> list[str]:
    """This interpreter's sys.path without the checkout, and with the packages named in ``hidden`` (and their
    .dist-info) left out of every folder that holds one: a Python where ``dar`` was never pip-installed."""
    out = []
    for i, entry in enumerate(p for p in sys.path if p and os.path.isdir(p)):
        real = os.path.realpath(entry)
        if real == str(ROOT) or real.startswith(str(ROOT) + os.sep) and ".venv" not in real:
            continue
        names = os.listdir(entry)
        if not any(n in hidden or n.split("-")[0] in hidden for n in names):
            out.append(entry)
            continue
        farm = tmp_path / f"site{i}"
        farm.mkdir()
        for n in names:
            if n not in hidden and n.split("-")[0] not in hidden and not n.endswith(".pth"):
                (farm / n).symlink_to(os.path.join(entry, n))
        out.append(str(farm))
    return out


def _run_without(tmp_path: Path, hidden: set[str], code: str) -> subprocess.CompletedProcess:
    """Run ``code`` with ``python -S`` (no site: no .pth files, so no editable-install finder) on the path above."""
    prelude = f"import sys\nsys.path[:] = sys.path[:1] + {_path_without(tmp_path, hidden)!r}\n"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return subprocess.run([sys.executable, "-S", "-c", prelude + LOAD_LIKE_COMFYUI + code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_clone_uses_installed_dar(tmp_path):
    """dar pip-installed (this test session's): the pack hands ComfyUI the installed package's nodes."""
    import dar
    from dar.bindings import comfyui

    pack = _clone(tmp_path)
    ns = {}
    exec(LOAD_LIKE_COMFYUI, ns)
    before = dict(sys.modules)
    try:
        module, mappings, names, web = ns["load_like_comfyui"](str(pack))
        assert mappings == comfyui.NODE_CLASS_MAPPINGS and set(mappings) == {"DARRebalance", "DARAttentionMap"}
        assert names == comfyui.NODE_DISPLAY_NAME_MAPPINGS
        assert names["DARRebalance"] == "DAR: Dynamic Attention Rebalancing"
        assert web is None
        assert sys.modules["dar"] is dar and not any(n.startswith("dar") and n not in before for n in sys.modules)
        with pytest.raises(AttributeError):
            module.setup_module  # noqa: B018  (pytest looks this up on a package's __init__)
    finally:
        sys.modules.pop(str(pack).replace(".", "_x_"), None)


@pytest.mark.parametrize("folder", ["dar-attention", "dar"])
def test_clone_without_pip_install_uses_its_own_dar(tmp_path, folder):
    """No dar installed: the pack imports the clone's dar/, kernels/ as dar.kernels and bindings/ as
    dar.bindings (setup.py's layout), and adds nothing to sys.path. A clone in custom_nodes/dar with custom_nodes/
    on sys.path (as some ComfyUI setups have it) is found as "dar" itself: the same holds."""
    pack = _clone(tmp_path, folder)
    res = _run_without(tmp_path, {"dar", "dar_attention"}, rf"""
import importlib.util
pack = {str(pack)!r}
if {folder == "dar"}:
    sys.path.insert(0, os.path.dirname(pack))
    assert importlib.util.find_spec("dar").origin == os.path.join(pack, "__init__.py")
else:
    assert importlib.util.find_spec("dar") is None, importlib.util.find_spec("dar")
path = list(sys.path)
module, mappings, names, web = load_like_comfyui(pack)
import dar, dar.kernels, dar.bindings, dar.bindings.comfyui
for mod, folder in ((dar, "dar"), (dar.kernels, "kernels"), (dar.bindings, "bindings")):
    assert mod.__file__ == os.path.join(pack, folder, "__init__.py"), (mod.__name__, mod.__file__)
assert mappings == dar.bindings.comfyui.NODE_CLASS_MAPPINGS, mappings
assert sorted(mappings) == ["DARAttentionMap", "DARRebalance"] and names["DARRebalance"].startswith("DAR:")
assert mappings["DARRebalance"].__module__ == "dar.bindings.comfyui.nodes"
assert sys.path == path
print("clone ok")
""")
    assert res.returncode == 0 and "clone ok" in res.stdout, res.stderr[-3000:]


def test_clone_missing_a_dependency_says_how_to_install(tmp_path):
    """ComfyUI logs what the pack raises: an ImportError that names the missing module and the install step."""
    pack = _clone(tmp_path)
    res = _run_without(tmp_path, {"dar", "dar_attention", "torch"}, rf"""
try:
    load_like_comfyui({str(pack)!r})
except ImportError as e:
    print("MESSAGE", e)
""")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "No module named 'torch'" in res.stdout and f"pip install -r {pack / 'requirements.txt'}" in res.stdout


def test_checkout_in_a_folder_named_dar_still_imports_dar(tmp_path):
    """A checkout in a folder named "dar" (``git clone .../dar``): pytest finds the root as the package ``dar``
    (it has the entry's __init__.py) and puts its parent on sys.path while it collects tests/. ``import dar`` in a
    test must still give the checkout's dar package, not the node-pack entry."""
    checkout = tmp_path / "dar"
    shutil.copytree(_clone(tmp_path), checkout)
    (checkout / "tests").mkdir()
    (checkout / "tests" / "test_probe.py").write_text(
        "def test_probe():\n"
        "    import dar\n"
        "    from dar.bindings import comfyui\n"
        f"    assert dar.__file__ == {str(checkout / 'dar' / '__init__.py')!r}, dar.__file__\n"
        f"    assert comfyui.__file__.startswith({str(checkout / 'bindings')!r}), comfyui.__file__\n"
        "    assert dar.DARConfig and set(comfyui.NODE_CLASS_MAPPINGS) == {'DARRebalance', 'DARAttentionMap'}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    res = subprocess.run([sys.executable, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider"], cwd=checkout,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "1 passed" in res.stdout, res.stdout[-3000:] + res.stderr[-2000:]


def test_importing_the_entry_does_nothing():
    """pytest imports the root __init__.py while collecting tests/: that must not import dar or its nodes."""
    res = subprocess.run([sys.executable, "-c", (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('__init__', {str(ROOT / '__init__.py')!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] in ('dar', 'torch', 'kernels', 'bindings')))\n")],
        cwd=ROOT.parent, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "[]", (res.stdout, res.stderr[-2000:])


def test_registry_metadata():
    """pyproject.toml holds what the Comfy Registry reads ([project], [tool.comfy]) and what pip builds from."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    project, comfy = data["project"], data["tool"]["comfy"]
    assert project["name"] == "dar-attention" and project["version"] and project["description"]
    assert project["dependencies"] == ["torch>=2.5", "numpy", "einops"] and project["license"] == "Apache-2.0"
    assert set(comfy) >= {"PublisherId", "DisplayName", "Icon"}
    assert comfy["DisplayName"] == "DAR: Dynamic Attention Rebalancing"
    # requirements.txt (what ComfyUI-Manager installs for a clone) is the dependencies less torch, ComfyUI's own
    reqs = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines() if ln.strip()[:1] not in "#"]
    assert reqs == [d for d in project["dependencies"] if not d.startswith("torch")]
