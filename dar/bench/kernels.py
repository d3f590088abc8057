"""The kernel benchmark: every implementation on every shape, checked at that shape, timed interleaved."""

from __future__ import annotations

import dataclasses
import gc
import sys

import torch

import dar

from . import correctness, env
from .impls import Impl, Unavailable, availability
from .shapes import Shape
from .timing import cache_flusher, measure_interleaved

LAYOUTS = ("blhd", "bhld")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _inputs(shape: Shape, device: torch.device, layout: str = "blhd", seed: int = 0):
    """q, k, v in SDPA's (B, H, L, D) shape. ``blhd``: views of (B, L, H, D) tensors, the strides
    diffusers' attention processors hand over; ``bhld``: contiguous."""
    g = torch.Generator(device=device).manual_seed(seed)
    dt = shape.torch_dtype

    def rnd(h):
        if layout == "blhd":
            return torch.randn(shape.batch, shape.seq, h, shape.head_dim, generator=g, device=device,
                               dtype=dt).transpose(1, 2)
        return torch.randn(shape.batch, h, shape.seq, shape.head_dim, generator=g, device=device, dtype=dt)

    return rnd(shape.heads_q), rnd(shape.heads_kv), rnd(shape.heads_kv)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _error_row(exc: BaseException, device) -> dict:
    if isinstance(exc, Unavailable):
        return {"status": "unavailable", "reason": str(exc)}
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        _free(device)
        return {"status": "oom", "reason": str(exc).splitlines()[0][:300]}
    _free(device)
    return {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:500]}


def run(shapes: list[Shape], impls: list[Impl], device: torch.device, cfg: dar.DARConfig, *, warmup: int,
        reps: int, min_warmup_s: float, mode: str, layout: str = "blhd", flush: bool = False) -> dict:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    quick = mode == "quick"
    result = env.header(device, "kernels", mode)
    avail = availability(impls)
    result["implementations"] = {
        i.name: {"kind": i.kind, "description": i.description, "available": avail[i.name] is None,
                 "reason": avail[i.name]} for i in impls}
    result["config"] = {"dar": dataclasses.asdict(cfg), "warmup": warmup, "reps": reps, "min_warmup_s": min_warmup_s,
                        "modes": sorted({getattr(i, "mode", None) or cfg.mode for i in impls if i.kind == "dar"}),
                        "input_layout": layout, "cache_flush": flush,
                        "interleaved": "one timed call per implementation per round, order rotated each round",
                        "check": "the timed callable at the timed shape (see docs/benchmarks.md)",
                        "interpreted": "quick mode: interpreted implementations get no warm-up and one timed call",
                        "timer": "cuda-event" if device.type == "cuda" else "perf_counter",
                        "flops": "4*B*Hq*Lq*Lk*D (DAR scoring not counted)",
                        "peak_mem": "torch.cuda.max_memory_allocated during one call minus allocated before it"
                                    if device.type == "cuda" else "n/a on CPU"}
    result["shapes"] = [s.describe() for s in shapes]
    flusher = cache_flusher(device) if flush else None

    rows, checks = [], []
    for shape in shapes:
        _log(f"shape {shape.name}: B={shape.batch} Hq={shape.heads_q} Hkv={shape.heads_kv} L={shape.seq} "
             f"D={shape.head_dim} {shape.dtype}")
        if device.type == "cuda":
            torch._dynamo.reset()  # compile each shape afresh (static shapes, no recompile limit)
        q, k, v = _inputs(shape, device, layout)
        lay = shape.layout()
        fns, slow, shape_rows = {}, set(), {}
        for impl in impls:
            row = {"shape": shape.name, "impl": impl.name, "kind": impl.kind, "correct": None,
                   "interpreted": impl.interpreted(device)}
            shape_rows[impl.name] = row
            if avail[impl.name] is not None:
                row.update(status="unavailable", reason=avail[impl.name])
                continue
            try:
                fn = impl.build(q, k, v, lay, cfg)
            except Exception as exc:  # one broken implementation must not end the run
                row.update(_error_row(exc, device))
                continue
            # Correctness of exactly what is timed: this callable, these inputs, this shape.
            chk = correctness.check(impl, fn, q, k, v, lay, cfg, shape.dtype)
            chk["shape"] = shape.name
            checks.append(chk)
            _log(f"  check {impl.name:<22} {chk['status']}"
                 + (f" (max err {chk['max_abs_err']:.2e})" if "max_abs_err" in chk else f" ({chk.get('reason')})"))
            row["correct"] = chk["passed"]
            if chk["status"] == "unavailable":
                row.update(status="unavailable", reason=chk["reason"])
            elif not chk["passed"]:
                row.update(status="skipped", reason=f"failed the correctness check ({chk['status']})")
            else:
                fns[impl.name] = _with_context(impl, fn)
                if quick and impl.interpreted(device):
                    slow.add(impl.name)
        timings = {}
        with torch.no_grad():
            fast = {n: f for n, f in fns.items() if n not in slow}
            if fast:
                timings.update(measure_interleaved(fast, device, warmup, reps, min_warmup_s, flusher,
                                                   max_time_s=2.0 if quick else None))
            for name in slow:  # interpreted kernels: seconds per call, one timed call
                timings.update(measure_interleaved({name: fns[name]}, device, 0, 1, 0.0, flusher))
        for name, t in timings.items():
            row = shape_rows[name]
            if isinstance(t, Exception):
                row.update(_error_row(t, device))
            else:
                row.update(status="ok", **t.summary())
                row["tflops"] = shape.flops / (row["median_ms"] * 1e-3) / 1e12
        for row in shape_rows.values():
            if row["status"] == "ok":
                _log(f"  {row['impl']:<22} {row['median_ms']:9.3f} ms (IQR {row['iqr_ms']:.3f})")
            else:
                _log(f"  {row['impl']:<22} {row['status']}: {row.get('reason')}")
            rows.append(row)
        del q, k, v, fns
        _free(device)
    _add_overheads(rows)
    if device.type == "cpu":
        result["device"]["load_avg_end"] = env.load_average()
    result["correctness"] = checks
    result["results"] = rows
    return result


def _with_context(impl: Impl, fn):
    """``fn`` inside the implementation's own context (e.g. SDPA kernel selection) on every call, so
    interleaved implementations never run under each other's settings."""

    def call():
        with impl.context():
            return fn()

    return call


def _add_overheads(rows: list[dict]) -> None:
    """Median time relative to the fastest plain SDPA backend on the same shape (same run)."""
    best: dict[str, tuple[float, str]] = {}
    for r in rows:
        if r["kind"] == "sdpa" and r["status"] == "ok":
            cur = best.get(r["shape"])
            if cur is None or r["median_ms"] < cur[0]:
                best[r["shape"]] = (r["median_ms"], r["impl"])
    cpu = {r["shape"]: r.get("cpu_median_ms") for r in rows if best.get(r["shape"], (None, None))[1] == r["impl"]}
    for r in rows:
        b = best.get(r["shape"])
        r["best_sdpa"] = None if b is None else b[1]
        r["overhead_vs_best_sdpa"] = (r["median_ms"] / b[0]) if (b and r["status"] == "ok") else None
        if r["status"] == "ok" and r.get("cpu_median_ms") and cpu.get(r["shape"]):
            # CPU: the same ratio in process CPU time, which time-slicing by other jobs does not inflate.
            r["cpu_overhead_vs_best_sdpa"] = r["cpu_median_ms"] / cpu[r["shape"]]
