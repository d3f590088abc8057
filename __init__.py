"""ComfyUI node-pack entry: the repository, cloned into ``ComfyUI/custom_nodes/`` (by hand, by ComfyUI-Manager or
from the Comfy Registry), is a node pack. docs/comfyui.md, "Install", describes the three routes.

This file is no part of the ``dar`` package: pip installs ``dar/``, ``kernels/`` and ``bindings/`` only (setup.py).
ComfyUI imports it as ``custom_nodes/<folder>/__init__.py`` under a module name made from the folder's path and
reads ``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS``, which are those of `dar.bindings.comfyui`:

- where ``dar`` is importable (``pip install dar-attention``, or this clone installed with ``pip install -e``), the
  installed package's nodes;
- otherwise this clone's own ``dar``, laid out the way setup.py installs it (``kernels/`` as ``dar.kernels``,
  ``bindings/`` as ``dar.bindings``); its dependencies come from requirements.txt, which ComfyUI-Manager
  installs. Nothing is added to ``sys.path``: the clone's folders (``tests``, ``examples``...) stay out of ComfyUI.

Importing this file does nothing: the mappings are resolved when first read (a module ``__getattr__``). pytest
imports a root ``__init__.py`` while it collects ``tests/`` (it sets up the root as a package), and that must not
import the node pack.
"""

import importlib
import importlib.abc
import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.realpath(__file__))
# Where setup.py puts each of the clone's folders (its package_dir); checked by tests/test_comfyui_pack.py.
_LAYOUT = {"dar": "dar", "dar.kernels": "kernels", "dar.bindings": "bindings"}
_EXPORTED = ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS")


class _CloneFinder(importlib.abc.MetaPathFinder):
    """Finds ``dar``, ``dar.kernels`` and ``dar.bindings`` in this clone (their submodules are found through the
    packages' ``__path__`` as usual)."""

    def find_spec(self, name, path=None, target=None):
        folder = _LAYOUT.get(name)
        if folder is None:
            return None
        folder = os.path.join(_ROOT, folder)
        return importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])


def _use_clone() -> None:
    if not any(isinstance(f, _CloneFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _CloneFinder())


if __name__ == "dar":
    # The clone sits in a folder named "dar" whose parent is on sys.path, so this file was found as the package
    # "dar": pytest imports it so while it collects tests/ from such a checkout (the root is a package, having this
    # file, and pytest puts its parent on sys.path). Become the clone's dar package instead, which is what
    # ``import dar`` gives from the clone's root; the import statement returns what sys.modules then holds.
    _use_clone()
    _spec = _CloneFinder().find_spec("dar")
    sys.modules["dar"] = importlib.util.module_from_spec(_spec)
    try:
        _spec.loader.exec_module(sys.modules["dar"])
    except BaseException:
        del sys.modules["dar"]
        raise


def _installed() -> bool:
    """Whether ``import dar`` finds a dar other than this folder (which is "dar" too where a clone named so sits on
    sys.path)."""
    if "dar" in sys.modules:
        return True
    spec = importlib.util.find_spec("dar")
    return spec is not None and spec.origin is not None and os.path.realpath(spec.origin) != os.path.realpath(__file__)


def _nodes():
    if not _installed():
        _use_clone()
    try:
        return importlib.import_module("dar.bindings.comfyui")
    except ImportError as e:
        raise ImportError(
            f"DAR node pack ({_ROOT}): {e}. Install its dependencies into the Python that runs ComfyUI: "
            f"pip install -r {os.path.join(_ROOT, 'requirements.txt')} (or pip install dar-attention)") from e


def __getattr__(name):
    if name not in _EXPORTED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    nodes = _nodes()
    for exported in _EXPORTED:
        globals()[exported] = getattr(nodes, exported)
    return globals()[name]
