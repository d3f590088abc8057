"""The kernel benchmark: every implementation on every shape, after a correctness check."""

from __future__ import annotations

import dataclasses
import gc
import sys

import torch

import dar

from . import correctness, env
from .impls import Impl, Unavailable, availability
from .shapes import Shape
from .timing import measure


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _inputs(shape: Shape, device: torch.device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    dt = shape.torch_dtype

    def rnd(h):
        return torch.randn(shape.batch, h, shape.seq, shape.head_dim, generator=g, device=device, dtype=dt)

    return rnd(shape.heads_q), rnd(shape.heads_kv), rnd(shape.heads_kv)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(shapes: list[Shape], impls: list[Impl], device: torch.device, cfg: dar.DARConfig, *, warmup: int,
        reps: int, min_warmup_s: float, mode: str) -> dict:
    quick = mode == "quick"
    check_seq = 64 if quick else 320  # quick: the interpreted triton kernels take seconds per call
    result = env.header(device, "kernels", mode)
    avail = availability(impls)
    result["implementations"] = {
        i.name: {"kind": i.kind, "description": i.description, "available": avail[i.name] is None,
                 "reason": avail[i.name]} for i in impls}
    result["config"] = {"dar": dataclasses.asdict(cfg), "warmup": warmup, "reps": reps, "min_warmup_s": min_warmup_s,
                        "check_seq": check_seq,
                        "interpreted": "quick mode: interpreted implementations get no warm-up and one timed call",
                        "timer": "cuda-event" if device.type == "cuda" else "perf_counter",
                        "flops": "4*B*Hq*Lq*Lk*D (DAR scoring not counted)",
                        "peak_mem": "torch.cuda.max_memory_allocated during one call minus allocated before it"
                                    if device.type == "cuda" else "n/a on CPU"}
    result["shapes"] = [s.describe() for s in shapes]

    # Correctness first, once per (dtype, head dim, GQA group) the shapes need.
    checks: dict[tuple, dict[str, dict]] = {}
    for shape in shapes:
        key = correctness.check_key(shape)
        if key in checks:
            continue
        checks[key] = {}
        for impl in impls:
            if avail[impl.name] is not None:
                continue
            rec = correctness.check(impl, shape, device, cfg, seq=check_seq)
            checks[key][impl.name] = rec
            _log(f"check {impl.name:<15} {rec['dtype']} d{rec['head_dim']} g{rec['gqa_group']}: {rec['status']}"
                 + (f" (max err {rec['max_abs_err']:.2e})" if "max_abs_err" in rec else f" ({rec.get('reason')})"))
    result["correctness"] = [rec for per in checks.values() for rec in per.values()]

    rows = []
    for shape in shapes:
        _log(f"shape {shape.name}: B={shape.batch} Hq={shape.heads_q} Hkv={shape.heads_kv} L={shape.seq} "
             f"D={shape.head_dim} {shape.dtype}")
        if device.type == "cuda":
            torch._dynamo.reset()  # compile each shape afresh (static shapes, no recompile limit)
        q, k, v = _inputs(shape, device)
        layout = shape.layout()
        for impl in impls:
            row = {"shape": shape.name, "impl": impl.name, "kind": impl.kind}
            chk = checks[correctness.check_key(shape)].get(impl.name)
            if avail[impl.name] is not None:
                row.update(status="unavailable", reason=avail[impl.name])
            elif chk is not None and chk["status"] == "unavailable":
                row.update(status="unavailable", reason=chk["reason"])
            elif chk is not None and not chk["passed"]:
                row.update(status="skipped", reason=f"failed the correctness check ({chk['status']})")
            else:
                slow = quick and impl.interpreted(device)
                row.update(_time_one(impl, q, k, v, layout, cfg, device, 0 if slow else warmup, 1 if slow else reps,
                                     min_warmup_s, max_time_s=2.0 if quick else None))
                row["interpreted"] = impl.interpreted(device)
            row["correct"] = None if chk is None else chk["passed"]
            if row["status"] == "ok":
                row["tflops"] = shape.flops / (row["median_ms"] * 1e-3) / 1e12
                _log(f"  {impl.name:<15} {row['median_ms']:9.3f} ms  {row['tflops']:7.2f} TFLOP/s")
            else:
                _log(f"  {impl.name:<15} {row['status']}: {row.get('reason')}")
            rows.append(row)
        del q, k, v
        _free(device)
    _add_overheads(rows)
    result["results"] = rows
    return result


def _time_one(impl, q, k, v, layout, cfg, device, warmup, reps, min_warmup_s, max_time_s=None) -> dict:
    try:
        fn = impl.build(q, k, v, layout, cfg)
        with torch.no_grad(), impl.context():
            timing = measure(fn, device, warmup, reps, min_warmup_s, max_time_s)
    except Unavailable as exc:
        return {"status": "unavailable", "reason": str(exc)}
    except torch.cuda.OutOfMemoryError as exc:
        _free(device)
        return {"status": "oom", "reason": str(exc).splitlines()[0][:300]}
    except Exception as exc:  # report and keep going: one broken implementation must not end the run
        _free(device)
        return {"status": "error", "reason": f"{type(exc).__name__}: {exc}"[:500]}
    return {"status": "ok", **timing.summary()}


def _add_overheads(rows: list[dict]) -> None:
    """Median time relative to the fastest plain SDPA backend on the same shape."""
    best: dict[str, tuple[float, str]] = {}
    for r in rows:
        if r["kind"] == "sdpa" and r["status"] == "ok":
            cur = best.get(r["shape"])
            if cur is None or r["median_ms"] < cur[0]:
                best[r["shape"]] = (r["median_ms"], r["impl"])
    for r in rows:
        b = best.get(r["shape"])
        r["best_sdpa"] = None if b is None else b[1]
        r["overhead_vs_best_sdpa"] = (r["median_ms"] / b[0]) if (b and r["status"] == "ok") else None
