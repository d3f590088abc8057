"""MICON-Bench task cards and story_infer candidate answers, read from the user's data directory.

Layout of the released data (``MICON-Bench/Evaluation/data``)::

    <data>/<task>/cases/<case_id>.yaml          task cards
    <data>/<task>/refs/...                      reference images
    <data>/story_infer/simple_candidate_template.json   candidate answers for story_infer

Reference paths inside cards are relative; like the released scripts, a leading ``data/``
component (or the data directory's own name) is dropped and the rest is resolved under
the data directory. A card whose case id or reference paths break :mod:`dar.eval.inputs`'
rules (a path leaving the data directory, a reference that is not an image path, an id
that is not a file name) is still loaded, with the reasons in ``input_errors``; the
runner records it as an input error and reads none of its files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from ..inputs import case_id_problem, image_path_problem
from .protocol import STORY_TASK, TASKS, task_spec

CANDIDATES_FILE = Path(STORY_TASK) / "simple_candidate_template.json"


@dataclass(frozen=True)
class MiconCase:
    """One MICON-Bench task card."""

    task: str
    case_id: str
    refs: dict[str, Path]  # reference name -> absolute image path, in card order
    generation_prompt: str
    goal: str = ""
    constraints_hard: tuple[str, ...] = ()
    constraints_soft: tuple[str, ...] = ()
    expectation_list: tuple[str, ...] = ()
    participating_dimensions: tuple[str, ...] = ()
    source: Path | None = field(default=None, compare=False)
    input_errors: tuple[str, ...] = ()  # why its files may not be read (see module docs)


@dataclass(frozen=True)
class StoryCandidates:
    """Human-annotated next-step answers for one story_infer case."""

    case_id: str
    background: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]


def resolve_ref(ref: str, data_dir: Path) -> Path:
    """Resolve a card's reference path the way the released scripts do (not checked: see :func:`parse_card`)."""
    path = Path(ref)
    if path.is_absolute():
        return path
    if path.parts and path.parts[0] in {"data", data_dir.name}:
        path = Path(*path.parts[1:])
    return data_dir / path


def _str_list(card: dict[str, Any], key: str, source: Path) -> tuple[str, ...]:
    value = card.get(key) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise ValueError(f"{source}: {key!r} must be a list of strings")
    return tuple(str(v) for v in value)


def parse_card(card: Any, task: str, data_dir: Path, source: Path) -> MiconCase:
    if not isinstance(card, dict):
        raise ValueError(f"{source}: a task card must be a YAML mapping")
    case_id = card.get("case_id")
    if case_id is None or str(case_id).strip() == "":
        raise ValueError(f"{source}: missing 'case_id'")
    refs = card.get("refs")
    if not isinstance(refs, dict) or not refs:
        raise ValueError(f"{source}: 'refs' must be a non-empty mapping of name to image path")
    prompt = card.get("generation_prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{source}: missing 'generation_prompt'")
    dims = card.get("participating_dimensions") or []
    if not isinstance(dims, list):
        raise ValueError(f"{source}: 'participating_dimensions' must be a list")
    resolved = {str(name): resolve_ref(str(path), data_dir) for name, path in refs.items()}
    problems = [case_id_problem(str(case_id))]
    problems += [image_path_problem(data_dir, path, f"reference {name!r}") for name, path in resolved.items()]
    return MiconCase(
        task=task,
        case_id=str(case_id),
        refs=resolved,
        generation_prompt=prompt.strip(),
        goal=str(card.get("goal") or "").strip(),
        constraints_hard=_str_list(card, "constraints_hard", source),
        constraints_soft=_str_list(card, "constraints_soft", source),
        expectation_list=_str_list(card, "expectation_list", source),
        participating_dimensions=tuple(str(d).upper() for d in dims),
        source=source,
        input_errors=tuple(p for p in problems if p is not None),
    )


def load_cases(data_dir: str | os.PathLike[str], tasks: Iterable[str] | None = None) -> list[MiconCase]:
    """All task cards under ``data_dir`` for ``tasks`` (default: every task present), sorted.

    Raises ``FileNotFoundError`` if a requested task has no ``cases`` folder and
    ``ValueError`` for malformed cards or duplicate case ids within a task.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir: {root} is not a directory")
    if tasks is None:
        selected = [t for t in TASKS if (root / t / "cases").is_dir()]
        if not selected:
            raise FileNotFoundError(f"data_dir: no <task>/cases folders under {root} (tasks: {sorted(TASKS)})")
    else:
        selected = [task_spec(t).name for t in tasks]
    cases: list[MiconCase] = []
    for task in selected:
        folder = root / task / "cases"
        if not folder.is_dir():
            raise FileNotFoundError(f"data_dir: no cases folder for task {task!r} at {folder}")
        seen: dict[str, Path] = {}
        for path in sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.yml")):
            with open(path, encoding="utf-8") as handle:
                card = yaml.safe_load(handle)
            case = parse_card(card, task, root, path)
            if case.case_id in seen:
                raise ValueError(f"duplicate case_id {case.case_id!r} in {seen[case.case_id]} and {path}")
            seen[case.case_id] = path
            cases.append(case)
    return cases


def load_candidates(path: str | os.PathLike[str]) -> dict[str, StoryCandidates]:
    """Candidate answers (``{"cases": [{case_id, background_summary, positive_candidates, negative_candidates}]}``)."""
    source = Path(path)
    with open(source, encoding="utf-8") as handle:
        data = json.load(handle)
    entries = data.get("cases") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{source}: expected an object with a 'cases' list")
    table: dict[str, StoryCandidates] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("case_id") is None:
            raise ValueError(f"{source}: cases[{i}] has no 'case_id'")
        case_id = str(entry["case_id"])
        positive = entry.get("positive_candidates") or []
        negative = entry.get("negative_candidates") or []
        if not isinstance(positive, list) or not isinstance(negative, list):
            raise ValueError(f"{source}: cases[{i}] candidates must be lists")
        if not positive:
            raise ValueError(f"{source}: case {case_id!r} has no positive_candidates")
        if case_id in table:
            raise ValueError(f"{source}: duplicate case_id {case_id!r}")
        table[case_id] = StoryCandidates(
            case_id=case_id,
            background=str(entry.get("background_summary") or ""),
            positive=tuple(str(p) for p in positive),
            negative=tuple(str(n) for n in negative),
        )
    return table
