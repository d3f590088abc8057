"""The ``dar`` command: ``dar info | demo | bench``."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import platform
import sys


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info(argv: list[str]) -> int:
    """Print versions, the device and which backends can run here."""
    argparse.ArgumentParser(prog="dar info", description=info.__doc__, allow_abbrev=False).parse_args(argv)
    import torch

    import dar
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
    return 0


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in _COMMANDS:
        print("usage: dar {info,demo,bench} [options]\n"
              "  info   versions, device and available backends\n"
              "  demo   DAR off/on through a small Qwen-Image-Edit-style transformer, with heatmaps\n"
              "  bench  benchmarks: `dar bench kernels` (against SDPA, FlexAttention, eager),\n"
              "         `dar bench e2e` (one denoising step of a real-size model); --quick for a CPU smoke run")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, fn = _COMMANDS[argv[0]]
    func = fn if module is None else getattr(importlib.import_module(module), fn)
    return int(func(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
