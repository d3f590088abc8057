"""Backend registry and the ``"auto"`` choice.

``backend="auto"`` resolves, in order: the ``DAR_BACKEND`` environment variable when it is set,
else the measured choice of `dar.backends.tuner` (``TUNER``). Explicit names never consult either.
Besides `BACKENDS`, the torch backend restricted to one SDPA kernel is available as
``"torch:flash"``, ``"torch:cudnn"``, ``"torch:efficient"`` and ``"torch:math"`` (`TORCH_KERNELS`).
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings

# `torch` here would be shadowed by the submodule dar.backends.torch once it is imported.
import torch as _torch

from ..call import DARCall
from .base import Backend
from .tuner import Tuner

logger = logging.getLogger("dar")

BACKENDS = ("reference", "torch", "triton", "flex", "auto")
ENV = "DAR_BACKEND"
_warned: set[str] = set()


def _load(name: str) -> Backend | ImportError:
    """The backend object named ``name``, its module imported on first use (``import dar`` and a first CPU call
    then never pay for triton or FlexAttention); an ImportError is kept as the reason it is unavailable.

    Plain import statements rather than importlib: a first use inside a torch.compile region is then traced as
    an ordinary import, which dynamo executes (it cannot trace importlib.import_module).
    """
    try:
        if name == "reference":
            from .reference import ReferenceBackend as cls
        elif name == "triton":
            from .triton import TritonBackend as cls
        elif name == "flex":
            from .flex import FlexBackend as cls
        else:  # "torch" or "torch:<SDPA kernel>"
            from .torch import SDP_KERNELS, TorchBackend

            kernel = name.partition(":")[2] or None
            return TorchBackend(kernel) if kernel in SDP_KERNELS else TorchBackend()
        return cls()
    except ImportError as exc:
        return exc


_instances: dict[str, Backend | ImportError] = {}
# The SDPA kernels of the torch backend (dar.backends.torch.SDP_KERNELS; written out here so that naming them
# imports nothing).
TORCH_KERNELS = ("torch:flash", "torch:cudnn", "torch:efficient", "torch:math")
NAMES = (*BACKENDS, *TORCH_KERNELS)


def get_backend(name: str) -> Backend:
    """The backend object named ``name`` (not "auto"); ImportError if it cannot load here."""
    if name not in NAMES or name == "auto":
        raise ValueError(f"backend must be one of {NAMES}, got {name!r}")
    backend = _instances.get(name)
    if backend is None:
        backend = _instances[name] = _load(name)
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


def default_backend(call: DARCall) -> Backend:
    """The documented default, used where nothing is measured: triton on CUDA when it supports the
    call, else torch (with a one-time warning on CUDA saying why)."""
    if call.q.device.type == "cuda":
        why = triton_available()
        if why is None:
            backend = get_backend("triton")
            why = backend.unsupported(call)
            if why is None:
                return backend
        warn_once(f"dar: backend='auto' is using the torch backend on CUDA because {why}")
    return get_backend("torch")


TUNER = Tuner(get_backend, default_backend)


def select_backend(name, call: DARCall, weights_only: bool = False) -> Backend:
    """Resolve ``backend=`` for a call; raise if a named backend cannot run it.

    ``weights_only``: only the key weights are needed (the attention runs elsewhere), so "auto"
    takes the default rule instead of timing attention implementations.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, one of {BACKENDS}, got {type(name).__name__}")
    if name == "auto":
        env = os.environ.get(ENV)
        if env:
            if env not in NAMES:
                raise ValueError(f"the {ENV} environment variable must be one of {NAMES}, got {env!r}")
            name = env
    if name != "auto":
        backend = get_backend(name)
        reason = backend.unsupported(call)
        if reason is not None:
            raise ValueError(f"backend={name!r} cannot run these inputs: {reason}")
        return backend
    if weights_only:
        return default_backend(call)
    return TUNER.choose(call)


def warn_once(message: str) -> None:
    """``warnings.warn`` + log, once per message (nothing inside torch.compile tracing)."""
    if message not in _warned and not _torch.compiler.is_compiling():
        _warned.add(message)
        warnings.warn(message, stacklevel=4)
        logger.info(message)


_warn_once = warn_once  # the older private name

__all__ = ["BACKENDS", "NAMES", "TORCH_KERNELS", "TUNER", "Backend", "default_backend", "get_backend",
           "select_backend", "triton_available", "warn_once"]
