"""The measured ``backend="auto"``: time the candidate backends once per kind of call, keep the fastest.

A *kind* of call is its tune key: device (name and torch version), dtype, batch, heads, head dims,
query and key lengths rounded up to a power of two, mode and ``queries``, mask kind (none, causal,
key-only, full) and whether autograd is recording. The first call of a kind runs every candidate
that supports it on that call's own inputs (one warm-up each, then ``reps`` timed rounds with the
candidates interleaved) and the fastest median wins; later calls of the kind reuse the choice.

Candidates: on CUDA the fused triton backend, the torch backend on each SDPA kernel
(``torch:cudnn``, ``torch:flash``, ``torch:efficient``, and unrestricted ``torch``) and flex; on
other devices only ``torch`` (FlexAttention's CPU path and the Triton interpreter are test
vehicles, and SDPA's math kernel materialises ``Lq x Lk``), so nothing is timed there.

Choices live in memory and, when ``DAR_TUNE_CACHE`` names a JSON file, on disk (read at first use,
rewritten atomically after each new measurement,
merged under a file lock with what other processes wrote there). Inside ``torch.compile`` tracing or CUDA-graph
capture nothing is timed: a cached choice is used, else the documented default (triton on CUDA when
it supports the call, else torch). ``backend=`` and the ``DAR_BACKEND`` environment variable bypass
the tuner altogether.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from ..call import DARCall

logger = logging.getLogger("dar")

CACHE_ENV = "DAR_TUNE_CACHE"
CUDA_CANDIDATES = ("triton", "torch:cudnn", "torch:flash", "torch:efficient", "torch", "flex")
OTHER_CANDIDATES = ("torch",)
SCHEMA = "dar-tune/1"


@dataclasses.dataclass
class Entry:
    """One tuned kind of call: the choice, every candidate's median ms, and why others were out."""

    choice: str
    times_ms: dict[str, float]
    excluded: dict[str, str]
    created: str

    @property
    def ranking(self) -> list[str]:
        return sorted(self.times_ms, key=self.times_ms.get)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def mask_kind(call: DARCall) -> str:
    m = call.mask
    if m.is_causal:
        return "causal"
    if m.mask is None:
        return "none"
    return "key" if m.is_key_only else "full"


# Device labels are read in eager mode and kept, so a traced lookup never queries the driver.
_device_labels: dict[str, str] = {}


def _device_label(device: torch.device) -> str | None:
    label = _device_labels.get(str(device))
    if label is None and not torch.compiler.is_compiling():
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        label = f"{device.type}:{name}:torch-{torch.__version__}"
        _device_labels[str(device)] = label
    return label


def tune_key(call: DARCall) -> str | None:
    """The call's kind as a string (None inside tracing before the device was seen in eager mode)."""
    q, k, v = call.q, call.k, call.v
    label = _device_label(q.device)
    if label is None:
        return None
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v))
    dv = v.shape[-1] if v is not None else q.shape[-1]
    parts = (label, str(q.dtype).replace("torch.", ""), f"B{q.shape[0]}", f"H{q.shape[1]}/{k.shape[1]}",
             f"D{q.shape[-1]}/{dv}", f"Lq<={_pow2(q.shape[2])}", f"Lk<={_pow2(k.shape[2])}",
             f"{call.cfg.mode}/{call.cfg.queries}", f"mask:{mask_kind(call)}", "grad" if grad else "nograd")
    return "|".join(parts)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(backends: dict, call: DARCall, reps: int) -> tuple[dict[str, float], dict[str, str]]:
    """Median ms per backend over ``reps`` interleaved rounds after one warm-up each (which also
    compiles / autotunes); a backend that raises is excluded with the error."""

    def run(backend):
        w = backend.key_weights(call) if call.plan.active else None
        return backend.attention(call, w)

    times: dict[str, list[float]] = {}
    excluded: dict[str, str] = {}
    dev = call.q.device

    def exclude(name, exc):
        text = str(exc).strip()
        excluded[name] = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:200]
        times.pop(name, None)

    with torch.no_grad():
        for name, backend in backends.items():
            try:
                run(backend)
                _sync(dev)
                times[name] = []
            except Exception as exc:  # any failure (no kernel, compile error, OOM) rules a candidate out
                exclude(name, exc)
        for _ in range(reps):
            for name in list(times):
                try:
                    _sync(dev)
                    t0 = time.perf_counter()
                    run(backends[name])
                    _sync(dev)
                    times[name].append((time.perf_counter() - t0) * 1e3)
                except Exception as exc:
                    exclude(name, exc)
    return {n: statistics.median(t) for n, t in times.items()}, excluded


def default_candidates(device: torch.device) -> tuple[str, ...]:
    return CUDA_CANDIDATES if device.type == "cuda" else OTHER_CANDIDATES


class Tuner:
    """Chooses the backend for ``backend="auto"``; ``timer`` replaces `measure` (tests inject timings)."""

    def __init__(self, get_backend: Callable, default: Callable, timer: Callable | None = None, reps: int = 3,
                 cache_path: str | os.PathLike | None = None, candidate_names: Callable | None = None):
        self._get = get_backend
        self._default = default
        self.timer = timer or measure
        self.candidate_names = candidate_names or default_candidates
        self.reps = reps
        self._path = None if cache_path is None else Path(cache_path)
        self._path_from_env = cache_path is None
        self._entries: dict[str, Entry] = {}
        self._loaded: set[Path] = set()
        self._lock = threading.Lock()

    # -- cache ---------------------------------------------------------------------------------

    @property
    def cache_path(self) -> Path | None:
        if self._path_from_env:
            env = os.environ.get(CACHE_ENV)
            return Path(env) if env else None
        return self._path

    def _load(self) -> None:
        path = self.cache_path
        if path is None or path in self._loaded:
            return
        self._loaded.add(path)
        for key, entry in self._read_disk(path).items():
            self._entries.setdefault(key, entry)

    @staticmethod
    def _read_disk(path: Path) -> dict[str, Entry]:
        """The entries of the cache file at ``path``; anything unreadable is skipped with a warning."""
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("dar: ignoring the tuning cache %s (%s)", path, exc)
            return {}
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            logger.warning("dar: ignoring the tuning cache %s (not a %s file)", path, SCHEMA)
            return {}
        raw = data.get("entries", {})
        if not isinstance(raw, dict):
            logger.warning("dar: ignoring the tuning cache %s ('entries' is %s, not a mapping)", path,
                           type(raw).__name__)
            return {}
        entries = {}
        for key, e in raw.items():
            try:
                entries[key] = Entry(str(e["choice"]), {str(n): float(t) for n, t in e["times_ms"].items()},
                                     dict(e.get("excluded", {})), str(e.get("created", "")))
            except (KeyError, TypeError, ValueError, AttributeError):
                logger.warning("dar: ignoring a malformed entry of the tuning cache %s", path)
        return entries

    def _save(self, key: str) -> None:
        """Write ``key``'s new entry to the cache file, merged with what other processes wrote there.

        Read, merge and replace happen under an exclusive lock on ``<file>.lock``, so two processes
        tuning into one file lose no entries (the rename alone would keep only the last writer's).
        """
        path = self.cache_path
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(path.with_name(path.name + ".lock")):
                for k, e in self._read_disk(path).items():
                    if k != key:
                        self._entries.setdefault(k, e)
                data = {"schema": SCHEMA,
                        "entries": {k: dataclasses.asdict(e) for k, e in sorted(self._entries.items())}}
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
                with os.fdopen(fd, "w") as fh:
                    json.dump(data, fh, indent=1)
                os.replace(tmp, path)
        except OSError as exc:
            logger.warning("dar: could not write the tuning cache %s (%s)", path, exc)

    def clear(self) -> None:
        """Forget every choice held in memory (the disk cache is read again on next use)."""
        with self._lock:
            self._entries.clear()
            self._loaded.clear()

    def table(self) -> list[tuple[str, Entry]]:
        """Every known choice (memory and disk cache), sorted by key."""
        with self._lock:
            self._load()
            return sorted(self._entries.items())

    # -- choosing ------------------------------------------------------------------------------

    def candidates(self, call: DARCall) -> tuple[dict, dict[str, str]]:
        """(name -> backend that supports the call, name -> why a candidate does not)."""
        ok, out = {}, {}
        for name in self.candidate_names(call.q.device):
            try:
                backend = self._get(name)
            except ImportError as exc:
                out[name] = str(exc)
                continue
            why = backend.unsupported(call)
            if why is None:
                ok[name] = backend
            else:
                out[name] = why
        return ok, out

    def choose(self, call: DARCall):
        """The backend for ``call``: cached, else measured now (never while tracing or capturing)."""
        tracing = torch.compiler.is_compiling() or (
            call.q.device.type == "cuda" and torch.cuda.is_current_stream_capturing())
        key = tune_key(call)
        entry = self._entries.get(key) if key is not None else None
        if (entry is None or self._unusable(entry.choice) is not None) and not tracing:
            with self._lock:
                self._load()
                entry = self._entries.get(key)
                why = None if entry is None else self._unusable(entry.choice)
                if why is not None:
                    # A cache written by another install (a backend renamed, or one that does not load
                    # here) is measured again rather than taking `auto` down.
                    logger.warning("dar: the tuning cache's choice %r for %s %s; measuring again",
                                   entry.choice, key, why)
                    entry = None
                if entry is None:
                    entry = self._tune(key, call)
        if entry is not None:
            for name in [entry.choice, *entry.ranking]:
                if self._unusable(name) is None and self._get(name).unsupported(call) is None:
                    return self._get(name)
        return self._default(call)

    def _unusable(self, name: str) -> str | None:
        """Why the backend ``name`` cannot be used here, or None."""
        try:
            self._get(name)
        except ValueError:
            return "is no backend of this version of dar"
        except ImportError as exc:
            return f"cannot load here ({exc})"
        return None

    def _tune(self, key: str, call: DARCall) -> Entry:
        ok, excluded = self.candidates(call)
        times: dict[str, float] = {}
        if len(ok) == 1:  # nothing to compare: no timing
            choice = next(iter(ok))
        else:
            if ok:
                measured, failed = self.timer(ok, call, self.reps)
                excluded.update(failed)
                times = {n: float(t) for n, t in measured.items()}
            choice = min(times, key=times.get) if times else self._default(call).name
        entry = Entry(choice, times, excluded, time.strftime("%Y-%m-%dT%H:%M:%S"))
        self._entries[key] = entry
        if times:
            logger.info("dar: backend='auto' measured %s: %s -> %s", key,
                        ", ".join(f"{n} {t:.3f} ms" for n, t in sorted(times.items(), key=lambda x: x[1])), choice)
            self._save(key)
        return entry


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock on ``path`` (fcntl); where fcntl is missing (Windows), no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: merging still happens, without the lock
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # released on close, or by the kernel if we die
        yield


def describe(t: Tuner) -> list[str]:
    """The ``dar info`` lines for ``backend="auto"``: overrides, candidates, cache and every choice."""
    env = os.environ.get("DAR_BACKEND")
    lines = ["auto:"]
    if env:
        lines.append(f"  DAR_BACKEND={env} overrides the measured choice")
    lines.append(f"  candidates: cuda {', '.join(CUDA_CANDIDATES)}; other devices {', '.join(OTHER_CANDIDATES)}")
    path = t.cache_path
    lines.append(f"  cache: {path if path is not None else f'memory only (set {CACHE_ENV} to keep choices on disk)'}")
    rows = t.table()
    if not rows:
        lines.append("  no choices yet (the first call of each kind measures; `dar info --tune` measures a typical one)")
    for key, e in rows:
        timed = ", ".join(f"{n} {e.times_ms[n]:.3f} ms" for n in e.ranking) or "only candidate, not timed"
        lines.append(f"  {key}")
        lines.append(f"    -> {e.choice}  ({timed})")
        for name, why in sorted(e.excluded.items()):
            lines.append(f"       {name}: {why}")
    return lines


def tune_typical_call(t: Tuner) -> None:
    """Let ``t`` choose for the typical call of issue 14's measurements: B 1, H 8, D 64, L 4224
    (text 128, generated 1024, three 1024-token references), key_scale and prob_scale."""
    from ..config import DARConfig
    from ..layout import TokenLayout

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, 4224, 8, 64, generator=g, device=device, dtype=dtype).transpose(1, 2) for _ in range(3))
    layout = TokenLayout(ref=[(1152, 2176), (2176, 3200), (3200, 4224)], gen=[(128, 1152)])
    from ..call import make_call

    for mode in ("key_scale", "prob_scale"):
        t.choose(make_call(q, k, v, layout, DARConfig(mode=mode), None, None, False))
