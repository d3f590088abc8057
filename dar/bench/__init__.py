"""``dar bench``: kernel and end-to-end benchmarks of DAR against the attention users would run instead.

    dar bench [kernels] [--quick] [--preset NAME ...] [--impl NAME ...] [--out DIR] [--warmup N] [--reps N]
    dar bench e2e [--quick] [--model NAME ...] [--backend NAME ...] [--out DIR] ...
    dar bench static [--arch N] [--variant PATTERN] [--print]   (a repository checkout only)
    dar bench first-call [--runs N] [--out DIR]   (import + first CPU call, fresh processes)
    dar bench --list

Each run writes ``<kind>-<device>-<commit>[-quick].json`` (every figure, the device, versions and
commit), a Markdown report next to it, and for kernels a PNG plot of TFLOP/s against length.
See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from pathlib import Path

from ..extras import install_hint, require

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dar bench", description="Benchmark DAR kernels and model steps.", allow_abbrev=False)
    p.add_argument("what", nargs="?", default="kernels", choices=("kernels", "e2e", "static", "first-call"),
                   help="kernels (default): attention calls; e2e: one denoising step of a real-size transformer; "
                        "static: compiled-code report, no GPU (`dar bench static --help`); first-call: import and "
                        "first CPU call in fresh processes (`dar bench first-call --help`)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes on CPU (smoke test of the harness; timings mean nothing)")
    p.add_argument("--preset", action="append", metavar="NAME",
                   help="kernels: preset, shape name or shell pattern (repeatable); default 'all', or 'quick'")
    p.add_argument("--impl", action="append", metavar="NAME", help="kernels: implementation (repeatable); default all")
    p.add_argument("--model", action="append", metavar="NAME", help="e2e: model (repeatable); default all")
    p.add_argument("--backend", action="append", metavar="NAME",
                   help="e2e: DAR backend (repeatable); default triton, torch, flex")
    p.add_argument("--via", choices=("dar.enable", "patch"),
                   help="e2e: how DAR is switched on (default: dar.enable when the diffusers binding imports)")
    p.add_argument("--out", type=Path, default=Path("dar-bench-results"), help="output folder")
    p.add_argument("--warmup", type=int, help="warm-up calls (default 10, quick 1; e2e 2, quick 1)")
    p.add_argument("--reps", type=int, help="timed calls (default 30, quick 3; e2e 5, quick 2)")
    p.add_argument("--min-warmup-s", type=float, default=None,
                   help="keep warming up for at least this long (default 0.5 s on CUDA, 0 on CPU)")
    p.add_argument("--mode", action="append", choices=("key_scale", "prob_scale"),
                   help="DARConfig.mode (repeatable: each DAR implementation runs once per mode; rows of modes "
                        "other than key_scale are named <impl>:<mode>); default key_scale")
    p.add_argument("--layout", choices=("blhd", "bhld"), default="blhd",
                   help="kernels: input strides; blhd (default): (B, L, H, D) tensors viewed as (B, H, L, D), as "
                        "diffusers passes them; bhld: contiguous")
    p.add_argument("--flush-cache", action="store_true",
                   help="kernels: evict the caches (GPU L2 / CPU LLC) before every timed call")
    p.add_argument("--threads", type=int, help="CPU: intra-op threads (default: torch's; quick: 1)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if available (quick: cpu)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--list", action="store_true", help="list presets, shapes, implementations and models")
    return p


def _device(args):
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("dar bench: --device cuda but no CUDA device is available")
    name = args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    return torch.device(name)


def _static(argv: list[str]) -> int:
    """``dar bench static``: benchmarks/static_report.py of the checkout dar runs from (or the current
    folder's); it compiles the kernels for GPUs that need not be present and reads their SASS."""
    import importlib

    import dar

    for root in (Path(dar.__file__).resolve().parents[1], Path.cwd()):
        path = root / "benchmarks" / "static_report.py"
        if path.is_file():
            spec = importlib.util.spec_from_file_location("dar_static_report", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses look their module up there
            spec.loader.exec_module(module)
            return module.main(argv)
    print("dar bench static: needs a checkout of the dar repository (benchmarks/static_report.py); run it "
          "from the repository root", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["static"]:
        return _static(argv[1:])
    if argv[:1] == ["first-call"]:
        from . import first_call

        return first_call.main(argv[1:])
    args = _parser().parse_args(argv)
    import dar

    from . import e2e, impls, kernels, report, shapes

    if args.list:
        _print_list(shapes, impls, e2e)
        return 0
    if args.what == "e2e":  # the models are diffusers transformers
        require("diffusers", "bench", "dar bench e2e")
    plot = not args.no_plot and args.what == "kernels"
    if plot and not _importable("matplotlib"):
        print(f"dar bench: matplotlib is not installed, so no plot is drawn ({install_hint('bench')}, or pass "
              f"--no-plot to silence this)", file=sys.stderr)
        plot = False
    device = _device(args)
    modes = list(dict.fromkeys(args.mode or ["key_scale"]))
    cfg = dar.DARConfig(mode=modes[0])
    mode = "quick" if args.quick else "full"
    threads = args.threads if args.threads is not None else (1 if args.quick and device.type == "cpu" else None)
    if args.what == "kernels":
        names = args.preset or (["quick"] if args.quick else ["all"])
        try:
            selected = shapes.resolve(names)
            chosen = impls.with_modes(impls.resolve(args.impl), modes)
        except ValueError as exc:
            print(f"dar bench: {exc}", file=sys.stderr)
            return 2
        big = [s.name for s in selected if not s.family.startswith("quick")]
        if device.type == "cpu" and big and not args.preset:
            print("dar bench: the full-size presets need a CUDA GPU; use --quick (or name --preset explicitly)",
                  file=sys.stderr)
            return 2
        warmup = args.warmup if args.warmup is not None else (1 if args.quick else 10)
        reps = args.reps if args.reps is not None else (3 if args.quick else 30)
        min_warm = args.min_warmup_s if args.min_warmup_s is not None else (0.5 if device.type == "cuda" else 0.0)
        with _cpu_threads(threads):
            result = kernels.run(selected, chosen, device, cfg, warmup=warmup, reps=reps, min_warmup_s=min_warm,
                                 mode=mode, layout=args.layout, flush=args.flush_cache)
    else:
        if device.type == "cpu" and not args.quick:
            print("dar bench e2e: the real-size models (20-32B parameters) need a CUDA GPU; use --quick on CPU",
                  file=sys.stderr)
            return 2
        warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
        reps = args.reps if args.reps is not None else (2 if args.quick else 5)
        try:
            with _cpu_threads(threads):
                result = e2e.run(device, cfg, quick=args.quick, models=args.model, backends=args.backend,
                                 warmup=warmup, reps=reps, mode=mode, via=args.via)
        except ValueError as exc:
            print(f"dar bench: {exc}", file=sys.stderr)
            return 2
    paths = report.write_all(result, args.out, plot=plot)
    for path in paths.values():
        print(f"wrote {path}")
    failed = _failed_runs(result)
    if failed:  # the report says what went wrong; the exit status says that something did
        print(f"dar bench: {len(failed)} run(s) failed: {'; '.join(failed[:5])}", file=sys.stderr)
        return 1
    return 0


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _failed_runs(result: dict) -> list[str]:
    """Runs that errored or failed their correctness check. "unavailable" (cuDNN on a CPU) and "oom" (a model
    larger than the device) are limits of the machine, reported but not failures of the run."""
    failed = [f"{r.get('impl')} on {r.get('shape')}: {r.get('reason', '')}"[:200]
              for r in result.get("results", ())
              if r.get("status") == "error" or str(r.get("reason", "")).startswith("failed the correctness check")]
    for model in result.get("models", ()):
        if model.get("status", "ok") == "error":
            failed.append(f"{model.get('model')}: {model.get('reason', model.get('status'))}"[:200])
        failed += [f"{model.get('model')} {r.get('backend')}: {r.get('reason', '')}"[:200]
                   for r in model.get("runs", ()) if r.get("status") == "error"]
    return failed


@contextlib.contextmanager
def _cpu_threads(n: int | None):
    """Run with ``n`` intra-op threads (the smoke run uses 1: shared CI cores make spinning thread
    pools dominate tiny ops), restoring the previous count after."""
    import torch

    prev = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _print_list(shapes, impls, e2e) -> None:
    print("presets:")
    for name, group in shapes.PRESETS.items():
        print(f"  {name:<10} {len(group)} shapes")
    print("shapes:")
    for s in shapes.ALL_SHAPES.values():
        print(f"  {s.name:<28} B={s.batch} Hq={s.heads_q} Hkv={s.heads_kv} L={s.seq} D={s.head_dim} {s.dtype}")
    print("implementations:")
    for name, why in impls.availability(list(impls.IMPLS.values())).items():
        print(f"  {name:<15} {'available' if why is None else 'unavailable: ' + why}")
    print("e2e models:", ", ".join(e2e.MODELS))
