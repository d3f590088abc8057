"""MICo-Bench manifests: the released JSONL files, one per group.

A record looks like ``{"idx": 0, "input": ["mico_bench_hoi/0/0.jpg", ...], "reference":
"mico_bench_hoi/0/reference.jpg", "prompt": "...", "human_indices": [0], "Task": "HOI",
"editing_type": "1 Human + 1 Object"}``. De&Re records use ``ed_idx`` instead of ``idx``
and may add ``refined_prompt``, which then replaces ``prompt``. Paths are relative to the
benchmark root (the folder holding the JSONL files).

A case whose id or paths break :mod:`dar.eval.inputs`' rules (a ``../`` or absolute path
leaving the root, a reference that is not an image path, an id that is not a file name)
is still loaded, with the reasons in ``input_errors``; the runner records it as an input
error and reads none of its files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..inputs import case_id_problem, image_path_problem

GROUPS = ("mico_bench_object_centric", "mico_bench_human_centric", "mico_bench_hoi", "mico_bench_dere")


@dataclass(frozen=True)
class Case:
    """One MICo-Bench case. ``prompt`` is the effective prompt (``refined_prompt`` when present)."""

    case_id: str
    inputs: tuple[str, ...]
    reference: str
    prompt: str
    human_indices: tuple[int, ...]
    task: str
    editing_type: str
    group: str = ""
    original_prompt: str = ""
    input_errors: tuple[str, ...] = ()  # why its files may not be read (see module docs)

    def input_paths(self, root: str | os.PathLike[str]) -> list[Path]:
        return [Path(root) / p for p in self.inputs]

    def reference_path(self, root: str | os.PathLike[str]) -> Path:
        return Path(root) / self.reference


def _case_id(record: dict, where: str) -> str:
    has_idx = record.get("idx") is not None
    has_ed = record.get("ed_idx") is not None
    if has_idx and has_ed and str(record["idx"]) != str(record["ed_idx"]):
        raise ValueError(f"{where}: both 'idx' ({record['idx']!r}) and 'ed_idx' ({record['ed_idx']!r}) given and they differ")
    if not has_idx and not has_ed:
        raise ValueError(f"{where}: record has neither 'idx' nor 'ed_idx'")
    value = record["idx"] if has_idx else record["ed_idx"]
    if isinstance(value, bool) or not isinstance(value, (int, str)) or str(value).strip() == "":
        raise ValueError(f"{where}: case id must be an integer or a non-empty string, got {value!r}")
    return str(value)


def parse_record(record: object, where: str, group: str = "", root: str | os.PathLike[str] | None = None) -> Case:
    """One manifest line as a :class:`Case`; with ``root`` (the benchmark folder) its paths are checked too."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: each line must be a JSON object")
    case_id = _case_id(record, where)
    inputs = record.get("input")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(p, str) and p for p in inputs):
        raise ValueError(f"{where}: 'input' must be a non-empty list of image paths")
    reference = record.get("reference")
    if not isinstance(reference, str) or not reference:
        raise ValueError(f"{where}: 'reference' must be an image path")
    original = record.get("prompt")
    refined = record.get("refined_prompt")
    if refined is not None and (not isinstance(refined, str) or not refined.strip()):
        raise ValueError(f"{where}: 'refined_prompt' must be non-empty text when present")
    if original is not None and not isinstance(original, str):
        raise ValueError(f"{where}: 'prompt' must be text")
    prompt = refined if refined else original
    if not prompt or not prompt.strip():
        raise ValueError(f"{where}: record has no 'prompt' (or 'refined_prompt')")
    humans = record.get("human_indices") or []
    if not isinstance(humans, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in humans):
        raise ValueError(f"{where}: 'human_indices' must be a list of integers")
    bad = [i for i in humans if not 0 <= i < len(inputs)]
    if bad:
        raise ValueError(f"{where}: human_indices {bad} out of range for {len(inputs)} inputs")
    if len(set(humans)) != len(humans):
        raise ValueError(f"{where}: human_indices has duplicates: {humans}")
    problems = [case_id_problem(case_id)]
    if root is not None:
        problems += [image_path_problem(root, Path(root) / p, f"input {i}") for i, p in enumerate(inputs)]
        problems.append(image_path_problem(root, Path(root) / reference, "reference"))
    return Case(
        case_id=case_id,
        inputs=tuple(inputs),
        reference=reference,
        prompt=prompt.strip(),
        human_indices=tuple(sorted(humans)),
        task=str(record.get("Task") or ""),
        editing_type=str(record.get("editing_type") or ""),
        group=group,
        original_prompt=(original or "").strip(),
        input_errors=tuple(p for p in problems if p is not None),
    )


def load_manifest(path: str | os.PathLike[str]) -> list[Case]:
    """All cases of one MICo-Bench JSONL file, in file order; the group is the file's stem."""
    source = Path(path)
    if source.suffix != ".jsonl":
        raise ValueError(f"path: expected a .jsonl manifest, got {source}")
    group = source.stem
    cases: list[Case] = []
    seen: dict[str, int] = {}
    with open(source, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{source}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
            case = parse_record(record, where, group, root=source.parent)
            if case.case_id in seen:
                raise ValueError(f"{where}: duplicate case id {case.case_id!r} (first on line {seen[case.case_id]})")
            seen[case.case_id] = lineno
            cases.append(case)
    return cases


def load_benchmark(bench_dir: str | os.PathLike[str], groups: Iterable[str] | None = None) -> list[Case]:
    """Cases of ``groups`` (default: the four released groups present in ``bench_dir``)."""
    root = Path(bench_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"bench_dir: {root} is not a directory")
    if groups is None:
        selected = [g for g in GROUPS if (root / f"{g}.jsonl").is_file()]
        if not selected:
            raise FileNotFoundError(f"bench_dir: none of {[g + '.jsonl' for g in GROUPS]} found in {root}")
    else:
        selected = list(groups)
        for g in selected:
            if not isinstance(g, str) or case_id_problem(g) is not None:
                raise ValueError(f"groups: invalid group name {g!r} (a manifest's file name without .jsonl)")
    cases: list[Case] = []
    for group in selected:
        path = root / f"{group}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"groups: manifest {path} not found")
        cases.extend(load_manifest(path))
    return cases
