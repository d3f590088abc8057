"""Timing: warm-up, then one measurement per repetition (CUDA events on GPU, perf_counter on CPU)."""

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

    def summary(self) -> dict:
        t = sorted(self.times_ms)
        q1, med, q3 = _quartiles(t)
        return {"median_ms": med, "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1, "min_ms": t[0], "max_ms": t[-1],
                "mean_ms": statistics.fmean(t), "reps": len(t), "timer": self.timer,
                "peak_mem_mib": self.peak_mem_mib}


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
    timed): the smoke run uses it to bound interpreted kernels.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    cuda = device.type == "cuda"
    start = time.perf_counter()
    done = 0
    while done < warmup or time.perf_counter() - start < min_warmup_s:
        fn()
        done += 1
        if cuda:
            torch.cuda.synchronize(device)
    peak = _peak_memory(fn, device) if cuda else None
    times = []
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for s, e in events:
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            if max_time_s is not None and sum(times) > max_time_s * 1e3:
                break
    return Timing(times, "cuda-event" if cuda else "perf_counter", peak)


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
