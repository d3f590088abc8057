"""Backend registry and the ``"auto"`` choice."""

from __future__ import annotations

import importlib
import logging
import warnings

from ..call import DARCall
from .base import Backend

logger = logging.getLogger("dar")

BACKENDS = ("reference", "torch", "triton", "flex", "auto")
_MODULES = {"reference": ("reference", "ReferenceBackend"), "torch": ("torch", "TorchBackend"),
            "triton": ("triton", "TritonBackend"), "flex": ("flex", "FlexBackend")}
_warned: set[str] = set()


def _load(name: str):
    """Import a backend module up front (so torch.compile never traces an import); keep the error."""
    mod, cls = _MODULES[name]
    try:
        return getattr(importlib.import_module(f".{mod}", __name__), cls)()
    except ImportError as exc:
        return exc


_instances: dict[str, Backend | ImportError] = {name: _load(name) for name in _MODULES}


def get_backend(name: str) -> Backend:
    """The backend object named ``name`` (not "auto"); ImportError if it cannot load here."""
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    backend = _instances[name]
    if isinstance(backend, ImportError):
        raise ImportError(f"the {name} backend cannot be loaded: {backend}") from backend
    return backend


def triton_available() -> str | None:
    """None when the triton backend can be imported, else why not."""
    try:
        get_backend("triton")
    except ImportError as exc:  # triton missing or the kernels not built for this platform
        return f"triton backend unavailable: {exc}"
    return None


def select_backend(name, call: DARCall) -> Backend:
    """Resolve ``backend=`` for a call; raise if a named backend cannot run it."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, one of {BACKENDS}, got {type(name).__name__}")
    if name != "auto":
        backend = get_backend(name)
        reason = backend.unsupported(call)
        if reason is not None:
            raise ValueError(f"backend={name!r} cannot run these inputs: {reason}")
        return backend
    if call.q.device.type == "cuda":
        why = triton_available()
        if why is None:
            backend = get_backend("triton")
            why = backend.unsupported(call)
            if why is None:
                return backend
        _warn_once(f"dar: backend='auto' is using the torch backend on CUDA because {why}")
    return get_backend("torch")


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=4)
        logger.info(message)


__all__ = ["BACKENDS", "Backend", "get_backend", "select_backend", "triton_available"]
