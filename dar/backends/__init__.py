"""The backend registry: one vocabulary of ``backend=`` names, one validation, one ``"auto"``.

Every entry point (`dar.dar_attention`, `dar.compute_key_weights` with or without ``head_group`` /
``seq_group``, the packed functions, `dar.enable` for diffusers and transformers) takes the names in
`NAMES` and validates them with `check_backend`, so the error wording is one. A named backend that
cannot run a call says why (its declared capabilities, `dar.backends.base.Backend`).

``backend="auto"`` resolves, in order: the ``DAR_BACKEND`` environment variable when it is set,
else, for a dense call, the measured choice of `dar.backends.tuner` (``TUNER``), and for a packed
call (or when only the key weights are needed) the default rule (`default_backend`). Explicit names
never consult either. Besides `BACKENDS`, the torch backend restricted to one SDPA kernel is
available as ``"torch:flash"``, ``"torch:cudnn"``, ``"torch:efficient"`` and ``"torch:math"``
(`TORCH_KERNELS`).
"""

from __future__ import annotations

import logging
import os
import warnings

# `torch` here would be shadowed by the submodule dar.backends.torch once it is imported.
import torch as _torch

from ..call import DARCall
from .base import CALL_KINDS, FLEX_CANNOT_RUN, Backend
from .tuner import Tuner

logger = logging.getLogger("dar")

BACKENDS = ("reference", "torch", "triton", "flex", "auto")
ENV = "DAR_BACKEND"
_warned: set[str] = set()
# The SDPA kernels of the torch backend (dar.backends.sdpa.SDP_KERNELS), written out so that naming them imports
# nothing.
TORCH_KERNELS = ("torch:flash", "torch:cudnn", "torch:efficient", "torch:math")
NAMES = (*BACKENDS, *TORCH_KERNELS)


def _load(name: str) -> Backend | ImportError:
    """The backend named ``name``, its modules imported on first use, so that ``import dar`` and a first CPU call
    never pay for triton or FlexAttention; an ImportError is kept as the reason it is unavailable.

    Plain import statements rather than importlib: a first use inside a torch.compile region is then an
    ordinary import, which dynamo executes (it cannot trace importlib.import_module).
    """
    base, _, kernel = name.partition(":")
    try:
        if base == "reference":
            from .reference import ReferenceBackend as cls
        elif base == "triton":
            from .triton import TritonBackend as cls
        elif base == "flex":
            from .flex import FlexBackend as cls
        else:
            from .torch import TorchBackend as cls
    except ImportError as exc:
        return exc
    backend = cls(kernel) if kernel else cls()
    try:
        backend.packed = _packed_module(base)
    except ImportError as exc:  # the dense backend stays usable; packed calls are refused with the reason
        backend.cannot_run = {**backend.cannot_run, "packed": f"its packed kernels cannot be loaded: {exc}"}
    return backend


def _packed_module(base: str):
    """The module of a backend's packed (varlen) form, or None where it has none."""
    if base == "reference":
        from ..varlen import reference as packed
    elif base == "torch":
        from ..varlen import torch_backend as packed
    elif base == "triton":
        from ..varlen import triton as packed
    else:
        return None
    return packed


_instances: dict[str, Backend | ImportError] = {}


def _instance(name: str) -> Backend | ImportError:
    backend = _instances.get(name)
    if backend is None:
        backend = _instances[name] = _load(name)
    return backend


def check_backend(name, kind: str | None = None, what: str = "backend") -> str:
    """``name`` if it is a backend name (`NAMES`); the one TypeError / ValueError wording otherwise.

    ``kind``: a call kind (`dar.backends.base.CALL_KINDS`) the caller will run; a named backend
    that declares it cannot run that kind is refused with its reason. A backend that cannot load here
    passes (the call raises ImportError, as a named backend always has). ``what``: the argument's
    name in messages.
    """
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, one of {NAMES}, got {type(name).__name__}")
    if name not in NAMES:
        raise ValueError(f"{what} must be one of {NAMES}, got {name!r}")
    if kind is not None and name != "auto":
        assert kind in CALL_KINDS, kind
        why = _cannot_run(name, kind)
        if why is not None:
            raise ValueError(f"{what}={name!r} cannot run {kind} calls: {why}")
    return name


def names_for(kind: str) -> tuple[str, ...]:
    """The names (``"auto"`` included) whose backend declares it can run calls of ``kind``."""
    return tuple(n for n in NAMES if n == "auto" or _cannot_run(n, kind) is None)


# What a backend cannot run, known without importing its module (which may fail to import here).
_DECLARED_WITHOUT_MODULE = {"flex": FLEX_CANNOT_RUN}


def _cannot_run(name: str, kind: str) -> str | None:
    """Why the backend ``name`` declares it cannot run calls of ``kind``; for one that cannot load here, what is
    declared without its module (`_DECLARED_WITHOUT_MODULE`), else None (the call then raises the ImportError)."""
    backend = _instance(name)
    if isinstance(backend, ImportError):
        return _DECLARED_WITHOUT_MODULE.get(name, {}).get(kind)
    return backend.cannot_run_kind(kind)


def get_backend(name: str) -> Backend:
    """The backend object named ``name`` (not "auto"); ImportError if it cannot load here."""
    if name not in NAMES or name == "auto":
        raise ValueError(f"backend must be one of {NAMES}, got {name!r}")
    backend = _instance(name)
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


def default_backend(call) -> Backend:
    """The documented default, used where nothing is measured (and for packed calls): triton on CUDA
    when it supports the call, else torch (with a one-time warning on CUDA saying why)."""
    if call.q.device.type == "cuda":
        why = triton_available()
        if why is None:
            backend = get_backend("triton")
            why = backend.refusal(call)
            if why is None:
                return backend
        which = "dar_attention_varlen " if call.kind == "packed" else ""
        warn_once(f"dar: {which}backend='auto' is using the torch backend on CUDA because {why}")
    return get_backend("torch")


TUNER = Tuner(get_backend, default_backend)


def select_backend(name, call, weights_only: bool = False) -> Backend:
    """Resolve ``backend=`` for a dense or packed `DARCall`;
    raise, with the reason, if a named backend cannot run it.

    ``weights_only``: only the key weights are needed (the attention runs elsewhere), so "auto"
    takes the default rule instead of timing attention implementations.
    """
    name = check_backend(name)
    if name == "auto":
        env = os.environ.get(ENV)
        if env:
            name = check_backend(env, what=f"the {ENV} environment variable")
    if name != "auto":
        # A kind the backend declares it cannot run is refused even where its module cannot load (flex, torch 2.5).
        reason = _cannot_run(name, call.kind)
        if reason is None:
            backend = get_backend(name)
            reason = backend.refusal(call)
            if reason is None:
                return backend
        raise ValueError(f"backend={name!r} cannot run these inputs: {reason}")
    if weights_only or call.kind == "packed":
        return default_backend(call)
    return TUNER.choose(call)


def warn_once(message: str) -> None:
    """``warnings.warn`` + log, once per message (nothing inside torch.compile tracing)."""
    if message not in _warned and not _torch.compiler.is_compiling():
        _warned.add(message)
        warnings.warn(message, stacklevel=4)
        logger.info(message)


_warn_once = warn_once  # the older private name

__all__ = ["BACKENDS", "NAMES", "TORCH_KERNELS", "TUNER", "Backend", "check_backend", "default_backend",
           "get_backend", "names_for", "select_backend", "triton_available", "warn_once"]
