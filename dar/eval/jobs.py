"""Benchmark cases as generation jobs: which images go in, which prompt, where the output goes.

Used by ``examples/generate_benchmark.py`` so generated images land exactly where the
scorers look for them: ``<out>/<model>/<task or group>/<case_id>.png``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

BENCHMARKS = ("micon", "mico")


@dataclass(frozen=True)
class GenerationJob:
    benchmark: str
    task: str  # MICON task or MICo group: the output sub-folder
    case_id: str
    images: tuple[Path, ...]  # conditioning images, in benchmark order
    prompt: str

    def output_path(self, root: str | os.PathLike[str], model: str, extension: str = ".png") -> Path:
        return Path(root) / model / self.task / f"{self.case_id}{extension}"


def benchmark_jobs(benchmark: str, data_dir: str | os.PathLike[str], subsets: Sequence[str] | None = None) -> list[GenerationJob]:
    """Jobs for every case of ``benchmark`` under ``data_dir``.

    ``micon``: ``data_dir`` is MICON-Bench's ``Evaluation/data``; images are the card's
    references in card order, the prompt is ``generation_prompt``; ``subsets`` are tasks.
    ``mico``: ``data_dir`` is the MICo-Bench folder with the JSONL files; images are the
    ``input`` list, the prompt is ``refined_prompt`` or ``prompt``; ``subsets`` are groups.

    A case whose id or image paths break :mod:`dar.eval.inputs`' rules is left out, with a
    ``RuntimeWarning`` naming it and the reasons (the scorers record it as an input error).
    """
    if benchmark == "micon":
        from .micon.cases import load_cases

        cases = load_cases(data_dir, subsets)
        jobs = [GenerationJob("micon", c.task, c.case_id, tuple(c.refs.values()), c.generation_prompt) for c in cases]
    elif benchmark == "mico":
        from .mico.manifest import load_benchmark

        cases = load_benchmark(data_dir, subsets)
        jobs = [GenerationJob("mico", c.group, c.case_id, tuple(c.input_paths(data_dir)), c.prompt) for c in cases]
    else:
        raise ValueError(f"benchmark must be one of {BENCHMARKS}, got {benchmark!r}")
    for case, job in zip(cases, jobs):
        if case.input_errors:
            warnings.warn(f"{job.task}/{job.case_id!r} is not generated: {'; '.join(case.input_errors)}", RuntimeWarning, stacklevel=2)
    return [job for case, job in zip(cases, jobs) if not case.input_errors]
