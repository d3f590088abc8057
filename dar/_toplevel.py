"""Keep the checkout's top-level ``kernels/`` and ``bindings/`` folders from shadowing real packages.

Those folders are installed as ``dar.kernels`` and ``dar.bindings`` (setup.py). But whenever the checkout's root
is on ``sys.path`` -- ``python -m pytest``, ``python -c``, a script saved there, a build run with
``--no-build-isolation`` -- Python would also find them as plain ``kernels`` and ``bindings``, ahead of any
installed package of that name. transformers >= 5.25 imports the PyPI package ``kernels``, so the clash breaks
``import transformers`` itself. The two ``__init__`` files therefore call `defer_to_installed` when they are
imported under their plain name: the import then yields the installed package, and where none is installed, an
empty namespace package -- what Python gives for a folder without ``__init__.py`` and nothing in it, and what
libraries that probe for an optional package (transformers' ``is_kernels_available``) take for "not installed".
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _inside(path: str | None, folder: str) -> bool:
    return path is not None and os.path.realpath(path).startswith(folder + os.sep)


def defer_to_installed(name: str, init_file: str) -> None:
    """Make ``import name`` give the installed package ``name`` instead of the folder holding ``init_file``.

    Called from that folder's ``__init__`` while it is being imported as ``name``: the installed package is found
    by the import system's own finders with the checkout's root left out of the search, executed, and put in
    ``sys.modules`` in place of the folder (the import statement returns what ``sys.modules`` holds). When no
    such package is installed, an empty namespace package takes the folder's place: no ``__file__``, no
    ``__version__``, no submodules, so nothing of the checkout is importable under the plain name.
    """
    folder = os.path.dirname(os.path.realpath(init_file))
    root = os.path.dirname(folder)
    path = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != root]
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        if find is None:
            continue
        spec = find(name, path) if finder is importlib.machinery.PathFinder else find(name, None)
        if spec is not None and not _inside(spec.origin, folder) and not any(
                _inside(p, folder) or os.path.realpath(p) == folder for p in spec.submodule_search_locations or ()):
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
            return
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = []
    sys.modules[name] = importlib.util.module_from_spec(spec)
