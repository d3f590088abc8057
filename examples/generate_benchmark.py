#!/usr/bin/env python
"""Generate a benchmark's images with a diffusers pipeline, DAR off or on, in the layout the scorers read.

    # DAR off, then DAR on, same seeds: the two folders form an A/B pair
    python examples/generate_benchmark.py --benchmark micon --data MICON-Bench/Evaluation/data \
        --pipeline Qwen/Qwen-Image-Edit-2509 --out outputs/generations --model qwen_dar_off --dar off
    python examples/generate_benchmark.py --benchmark micon --data MICON-Bench/Evaluation/data \
        --pipeline Qwen/Qwen-Image-Edit-2509 --out outputs/generations --model qwen_dar_on --dar on \
        --dar-set gamma=0.15 --dar-set num_samples=64

Images are written to <out>/<model>/<task or group>/<case_id>.png, atomically; existing
images are skipped, so an interrupted run resumes where it stopped. Each case's seed is
derived from --seed and the case id, so DAR off and on see identical noise.
The pipeline receives the case's reference images as a list under --image-arg (default
``image``) plus ``prompt``, ``num_inference_steps``, ``guidance_scale`` and ``generator``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from dar.eval.atomic import atomic_write_bytes, atomic_write_json
from dar.eval.jobs import BENCHMARKS, GenerationJob, benchmark_jobs

logger = logging.getLogger("generate_benchmark")


def case_seed(seed: int, job: GenerationJob) -> int:
    """A per-case seed independent of Python's randomised ``hash``, identical across DAR off/on runs."""
    digest = hashlib.sha256(f"{seed}/{job.benchmark}/{job.task}/{job.case_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def parse_dar_settings(config_file: Path | None, overrides: Sequence[str]) -> dict[str, Any]:
    """DARConfig keyword arguments from a YAML file and ``key=value`` overrides (values parsed as YAML scalars)."""
    settings: dict[str, Any] = {}
    if config_file is not None:
        loaded = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"--dar-config: {config_file} must be a YAML mapping of DARConfig fields")
        settings.update(loaded)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--dar-set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        settings[key.strip()] = yaml.safe_load(value)
    return settings


def apply_dar(pipe: Any, mode: str, settings: dict[str, Any], dar_module: Any = None, **enable_kwargs: Any) -> dict[str, Any] | None:
    """Enable DAR on ``pipe`` when ``mode == "on"``; returns the config actually used (for provenance).

    ``enable_kwargs`` (e.g. ``backend=``) are passed to ``dar.enable`` unchanged.
    """
    if mode not in ("on", "off"):
        raise ValueError(f"mode must be 'on' or 'off', got {mode!r}")
    if mode == "off":
        if settings:
            raise ValueError("DAR settings were given but --dar is off")
        return None
    if dar_module is None:
        import dar as dar_module  # lazy: pulls in torch

    config = dar_module.DARConfig(**settings)
    dar_module.enable(pipe, config, **enable_kwargs)
    import dataclasses

    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(settings)


def generate(
    pipe: Callable[..., Any],
    jobs: Sequence[GenerationJob],
    out_root: Path,
    model: str,
    *,
    seed: int,
    make_generator: Callable[[int], Any],
    image_arg: str = "image",
    call_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Run ``pipe`` on every job whose output is missing; returns counts of generated and skipped."""
    from PIL import Image
    from tqdm.auto import tqdm

    pending = [job for job in jobs if not job.output_path(out_root, model).is_file()]
    counts = {"generated": 0, "skipped": len(jobs) - len(pending)}
    for job in tqdm(pending, desc=f"generating {model}", unit="image", disable=not progress):
        images = []
        for path in job.images:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        result = pipe(prompt=job.prompt, generator=make_generator(case_seed(seed, job)), **{image_arg: images}, **(call_kwargs or {}))
        output = result.images[0]
        buffer = io.BytesIO()
        output.save(buffer, format="PNG")
        atomic_write_bytes(job.output_path(out_root, model), buffer.getvalue())
        counts["generated"] += 1
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--benchmark", choices=BENCHMARKS, required=True)
    parser.add_argument("--data", type=Path, required=True, help="MICON-Bench data dir, or the MICo-Bench folder with the JSONL files")
    parser.add_argument("--subsets", nargs="+", default=None, help="MICON tasks or MICo groups (default: all present)")
    parser.add_argument("--pipeline", required=True, help="diffusers pipeline path or hub id")
    parser.add_argument("--out", type=Path, required=True, help="generations root")
    parser.add_argument("--model", required=True, help="folder name for this configuration, e.g. qwen_dar_on")
    parser.add_argument("--dar", choices=("on", "off"), required=True)
    parser.add_argument("--dar-config", type=Path, default=None, help="YAML of DARConfig fields")
    parser.add_argument("--dar-set", action="append", default=[], metavar="KEY=VALUE", help="DARConfig field override")
    parser.add_argument("--dar-backend", default=None, help="backend passed to dar.enable (default: DAR's choice)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--guidance", type=float, default=None, help="guidance_scale (omitted when not given)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-arg", default="image", help="pipeline keyword receiving the list of reference images")
    parser.add_argument("--pipe-kwargs", type=json.loads, default={}, help="extra pipeline call kwargs as JSON")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--limit", type=int, default=None, help="only the first N cases (smoke tests)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    jobs = benchmark_jobs(args.benchmark, args.data, args.subsets)
    if args.limit is not None:
        jobs = jobs[: args.limit]
    settings = parse_dar_settings(args.dar_config, args.dar_set)
    if args.dar == "off" and settings:
        raise SystemExit("--dar-config/--dar-set given with --dar off")

    import torch  # heavy imports only once the arguments are known to be valid
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(args.pipeline, torch_dtype=getattr(torch, args.dtype)).to(args.device)
    used = apply_dar(pipe, args.dar, settings, **({"backend": args.dar_backend} if args.dar_backend else {}))
    call_kwargs = {"num_inference_steps": args.steps, **args.pipe_kwargs}
    if args.guidance is not None:
        call_kwargs["guidance_scale"] = args.guidance
    provenance = {
        "benchmark": args.benchmark,
        "pipeline": args.pipeline,
        "dar": args.dar,
        "dar_config": used,
        "seed": args.seed,
        "call_kwargs": call_kwargs,
        "image_arg": args.image_arg,
        "dtype": args.dtype,
        "dar_backend": args.dar_backend,
    }
    record = args.out / args.model / "generation.json"
    if record.is_file():
        previous = json.loads(record.read_text(encoding="utf-8"))
        if previous != json.loads(json.dumps(provenance)):
            # Resuming with other settings would mix two configurations in one folder.
            raise SystemExit(f"{record} was written with different settings; use another --model folder")
    atomic_write_json(record, provenance)
    counts = generate(
        pipe,
        jobs,
        args.out,
        args.model,
        seed=args.seed,
        # CPU generators give the same noise on any accelerator, so runs stay comparable across machines.
        make_generator=lambda s: torch.Generator("cpu").manual_seed(s),
        image_arg=args.image_arg,
        call_kwargs=call_kwargs,
        progress=not args.no_progress,
    )
    logger.info("generated %d image(s), skipped %d existing", counts["generated"], counts["skipped"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
