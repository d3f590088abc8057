"""Timing: warm-up, then one measurement per repetition (CUDA events on GPU, perf_counter on CPU).

`measure_interleaved` times several implementations in the same run, one call of each per round
(the order rotating between rounds), so a slow phase of a shared machine hits all of them alike;
optionally each timed call starts with a cold cache (`cache_flusher`).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch


@dataclasses.dataclass
class Timing:
    times_ms: list[float]
    timer: str  # "cuda-event" or "perf_counter"
    peak_mem_mib: float | None  # extra memory one call allocates at its peak; None where not measurable (CPU)
    cpu_ms: list[float] | None = None  # CPU: process CPU time of each timed call (all threads)

    def summary(self) -> dict:
        t = sorted(self.times_ms)
        q1, med, q3 = _quartiles(t)
        out = {"median_ms": med, "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1, "min_ms": t[0], "max_ms": t[-1],
               "mean_ms": statistics.fmean(t), "reps": len(t), "timer": self.timer,
               "peak_mem_mib": self.peak_mem_mib}
        if self.cpu_ms:
            out["cpu_median_ms"] = statistics.median(self.cpu_ms)
        return out


def _quartiles(sorted_times: list[float]) -> tuple[float, float, float]:
    if len(sorted_times) == 1:
        x = sorted_times[0]
        return x, x, x
    q1, med, q3 = statistics.quantiles(sorted_times, n=4, method="inclusive")
    return q1, med, q3


def measure(fn: Callable[[], object], device: torch.device, warmup: int, reps: int,
            min_warmup_s: float = 0.0, max_time_s: float | None = None) -> Timing:
    """Call ``fn`` ``warmup`` times (and for at least ``min_warmup_s``), then time ``reps`` calls one by one.

    ``max_time_s`` (CPU only) stops the timed calls early once they took that long (at least one is
    timed): the smoke run uses it to bound interpreted kernels. Errors propagate.
    """
    result = measure_interleaved({"fn": fn}, device, warmup, reps, min_warmup_s, max_time_s=max_time_s)["fn"]
    if isinstance(result, Exception):
        raise result
    return result


def _peak_memory(fn, device) -> float:
    """MiB allocated at the peak of one call beyond what was allocated before it (inputs excluded)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


def cache_flusher(device: torch.device) -> Callable[[], None]:
    """A function that evicts the caches before a timed call by writing a buffer twice their size:
    the L2 on CUDA (from the device properties), the largest CPU cache listed in sysfs (64 MiB if
    none is listed)."""
    if device.type == "cuda":
        size = 2 * max(int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)), 1 << 20)
    else:
        size = 2 * _largest_cpu_cache(default=32 << 20)
    buf = torch.empty(size // 4, dtype=torch.float32, device=device)

    def flush() -> None:
        buf.fill_(1.0)

    return flush


def _largest_cpu_cache(default: int) -> int:
    import glob

    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return best or default


def measure_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, reps: int,
                        min_warmup_s: float = 0.0, flush: Callable[[], None] | None = None,
                        max_time_s: float | None = None) -> dict[str, Timing | Exception]:
    """Time every function of ``fns`` in the same rounds: warm each up (``warmup`` calls and at least
    ``min_warmup_s``), measure its peak memory (CUDA), then ``reps`` rounds of one timed call each,
    round ``i`` starting at the ``i``-th function. ``flush`` runs, untimed, before every timed call.
    A function that raises gets its exception in the result and leaves the rounds; ``max_time_s``
    (CPU) drops a function once its timed calls took that long (at least one is timed)."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    cuda = device.type == "cuda"
    out: dict[str, Timing | Exception] = {}
    live = []
    for name, fn in fns.items():
        try:
            start = time.perf_counter()
            done = 0
            while done < warmup or time.perf_counter() - start < min_warmup_s:
                fn()
                done += 1
                if cuda:
                    torch.cuda.synchronize(device)
            peak = _peak_memory(fn, device) if cuda else None
        except Exception as exc:  # reported per implementation; the others are still timed
            out[name] = exc
            continue
        out[name] = Timing([], "cuda-event" if cuda else "perf_counter", peak, None if cuda else [])
        live.append(name)
    for i in range(reps):
        order = live[i % len(live):] + live[:i % len(live)] if live else []
        events = []  # CUDA: read after the round, so the queue stays full as in a model's forward
        for name in order:
            timing = out[name]
            if not isinstance(timing, Timing):
                continue
            if max_time_s is not None and timing.times_ms and sum(timing.times_ms) > max_time_s * 1e3:
                continue
            if flush is not None:
                flush()
            try:
                if cuda:
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    fns[name]()
                    e.record()
                    events.append((name, s, e))
                else:
                    c0, t0 = time.process_time(), time.perf_counter()
                    fns[name]()
                    t1, c1 = time.perf_counter(), time.process_time()
                    timing.times_ms.append((t1 - t0) * 1e3)
                    timing.cpu_ms.append((c1 - c0) * 1e3)
            except Exception as exc:
                out[name] = exc
        if events:
            torch.cuda.synchronize(device)
            for name, s, e in events:
                if isinstance(out[name], Timing):
                    out[name].times_ms.append(s.elapsed_time(e))
    return out
