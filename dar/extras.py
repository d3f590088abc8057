"""Optional dependencies: importing one that is missing says which extra of dar-attention brings it.

    diffusers = require("diffusers", "diffusers", "dar.enable on a diffusers pipeline")

raises `MissingExtra` (an ImportError) with one line such as
``dar.enable on a diffusers pipeline needs diffusers: pip install "dar-attention[diffusers]"``. The CLI prints
that line and exits 1 instead of a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

DIST = "dar-attention"


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def install_hint(extra: str) -> str:
    return f'pip install "{DIST}[{extra}]"'


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise `MissingExtra` saying that ``purpose`` needs it and which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if isinstance(exc, MissingExtra):
            raise
        top = module.split(".")[0]
        # Only a missing ``module`` itself is "not installed"; an ImportError raised inside it is its own bug.
        if exc.name is not None and exc.name.split(".")[0] != top:
            raise
        raise MissingExtra(f"{purpose} needs {top}, which is not installed: {install_hint(extra)}") from exc
