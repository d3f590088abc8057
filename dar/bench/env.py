"""What a result was measured on: device, library versions, git commit."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

import dar


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "dar": dar.__version__, "python": platform.python_version(), "torch": torch.__version__,
        "triton": _version("triton"), "diffusers": _version("diffusers"), "transformers": _version("transformers"),
        "cuda": torch.version.cuda, "cudnn": cudnn,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "capability": f"sm{props.major}{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count()}
    return {"type": "cpu", "name": _cpu_name(), "threads": torch.get_num_threads()}


def device_slug(info: dict) -> str:
    """A short file-name-safe device label: ``cpu``, ``nvidia-h100-80gb-hbm3``, ..."""
    if info["type"] == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-")


def git_state() -> dict:
    """Commit of the checkout dar is imported from (None outside a git checkout)."""
    root = Path(dar.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none): how busy a shared machine was."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def header(device: torch.device, kind: str, mode: str) -> dict:
    """The common top of every result JSON."""
    dev = device_info(device)
    if dev["type"] == "cpu":
        dev["cores"] = os.cpu_count()
        dev["load_avg_start"] = load_average()
    return {
        "schema": "dar-bench/1", "kind": kind, "mode": mode, "created": now(), "device": dev,
        "device_slug": device_slug(dev), "versions": versions(), "git": git_state(),
        "platform": platform.platform(),
    }
