"""The ``dar`` command: ``dar info | demo | bench``."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import platform
import sys

from .extras import MissingExtra


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info(argv: list[str]) -> int:
    """Print versions, the device, which backends can run here and what backend="auto" chose."""
    import torch

    p = argparse.ArgumentParser(prog="dar info", description=info.__doc__, allow_abbrev=False)
    p.add_argument("--tune", action="store_true", help=_tune_help(torch))
    args = p.parse_args(argv)

    import dar
    from dar import backends
    from dar.backends import get_backend, triton_available

    print(f"dar          {dar.__version__}")
    print(f"python       {platform.python_version()}")
    for dist in ("torch", "triton", "diffusers", "transformers"):
        print(f"{dist:<12} {_version(dist)}")
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name()}, sm{''.join(map(str, torch.cuda.get_device_capability()))})"
    else:
        device = "cpu (no CUDA device)"
    print(f"device       {device}")
    print("backends:")
    for name, why in _backend_status(torch, get_backend, triton_available):
        print(f"  {name:<10} {'yes' if why is None else 'no: ' + why}")
    if args.tune:
        backends.tuner.tune_typical_call(backends.TUNER)
    for line in backends.tuner.describe(backends.TUNER):
        print(line)
    return 0


def _tune_help(torch) -> str:
    """What ``--tune`` does on this machine: it times the candidates of backend="auto" for a typical call."""
    from dar.backends.tuner import CUDA_CANDIDATES, OTHER_CANDIDATES

    call = "a typical call (B 1, H 8, L 4224, D 64, key_scale and prob_scale"
    if torch.cuda.is_available():
        return (f"first let backend='auto' time {call}, bf16) on this GPU among {', '.join(CUDA_CANDIDATES)}, and "
                f"show the choice")
    if len(OTHER_CANDIDATES) == 1:
        return (f"on this machine (no CUDA device) backend='auto' has one candidate, {OTHER_CANDIDATES[0]}: "
                f"--tune records that choice for {call}, fp32) without timing anything; on a CUDA GPU it times "
                f"{', '.join(CUDA_CANDIDATES)}")
    return f"first let backend='auto' time {call}, fp32) on this CPU among {', '.join(OTHER_CANDIDATES)}"


def _backend_status(torch, get_backend, triton_available):
    import os

    yield "reference", None
    yield "torch", None
    why = triton_available()
    if why is None and not torch.cuda.is_available():
        why = None if os.environ.get("TRITON_INTERPRET") == "1" else "needs a CUDA GPU (or TRITON_INTERPRET=1 on CPU, slow)"
    yield "triton", why
    try:
        get_backend("flex")
        yield "flex", None
    except ImportError as exc:
        yield "flex", str(exc)
    yield "auto", None


_COMMANDS = {"info": (None, info), "demo": ("dar.demo", "main"), "bench": ("dar.bench", "main")}

USAGE = """usage: dar [--version] {info,demo,bench} [options]
  info   versions, device and available backends
  demo   DAR off/on through a small Qwen-Image-Edit-style transformer, with heatmaps
  bench  benchmarks: `dar bench kernels` (against SDPA, FlexAttention, eager), `dar bench first-call`,
         `dar bench e2e` (one denoising step of a real-size model), `dar bench static` (compiled code,
         no GPU); --quick for a CPU smoke run
`dar COMMAND --help` describes each command's options."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if argv[:1] in (["-V"], ["--version"]):
        import dar

        print(f"dar-attention {dar.__version__}")
        return 0
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] not in _COMMANDS:
        print(f"dar: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    module, fn = _COMMANDS[argv[0]]
    try:
        func = fn if module is None else getattr(importlib.import_module(module), fn)
        return int(func(argv[1:]) or 0)
    except MissingExtra as exc:  # one line that names the extra, not a traceback
        msg = str(exc)  # it names its purpose, usually the command itself
        print(msg if msg.startswith(f"dar {argv[0]}") else f"dar {argv[0]}: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
