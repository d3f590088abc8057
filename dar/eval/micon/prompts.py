"""MICON-Bench judge prompts.

The checkpoint judge prompt is assembled from the user's MICON-Bench checkout (its
``templates`` folder: ``judge_prompt.template.txt`` and ``Q&A/<task>.qa.txt``); nothing
of it is bundled here. Only the glue blocks (reference list, constraints, JSON answer
skeleton) are generated. The story_infer candidate-answer prompt is not part of the
templates folder, so a prompt of our own is provided and can be replaced with a file.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import yaml

from .cases import MiconCase, StoryCandidates
from .protocol import TASKS, task_spec

logger = logging.getLogger(__name__)

JUDGE_TEMPLATE_FILE = "judge_prompt.template.txt"
QA_FOLDER = "Q&A"
# File names of the released checkpoint question lists, per task.
QA_FILES: Mapping[str, str] = MappingProxyType(
    {
        "object_composition": "object_composition.qa.txt",
        "spatial_geometric_constraints": "spatial_constraints.qa.txt",
        "local_element_transfer": "part_transfer.qa.txt",
        "attribute_style_decoupling": "style_disentangle.qa.txt",
        "foreground_background_composition": "fg_bg_replace.qa.txt",
        "story_infer": "causal_story.qa.txt",
    }
)
PLACEHOLDERS = (
    "TASK_TYPE",
    "REFS_BLOCK",
    "GEN_PROMPT_BLOCK",
    "CANDIDATE_PATH",
    "GOAL_AND_CONSTRAINTS",
    "TASK_QA_BLOCK",
    "CHECKPOINT_JSON_FORMAT",
)
REQUIRED_PLACEHOLDERS = ("TASK_QA_BLOCK", "CHECKPOINT_JSON_FORMAT")
_CHECKPOINT_REF = re.compile(r"\b([A-G]_check_\d+)\b")
_PLACEHOLDER = re.compile(r"\{([A-Z][A-Z0-9_]*)\}")

CANDIDATE_SYSTEM = "You are a strict, careful evaluator of AI-generated images. Answer with JSON only."

DEFAULT_CANDIDATE_PROMPT = """\
You are shown {N_REFS} reference image(s) that tell a story in order, followed by ONE generated image (the last image). \
The generated image is supposed to show the next step of the story.

Story background: {BACKGROUND}

Annotators wrote these acceptable next steps (the generated image should match at least one):
{POSITIVE}

Annotators wrote these wrong next steps (the generated image must not show any of them):
{NEGATIVE}

Judge only the last image. Compare it with the last reference image: it must show a clear progression, \
not a repetition, while keeping the same characters and setting.

Score from 0 to 10:
- 8-10: clearly matches an acceptable next step, shows none of the wrong ones, and visibly progresses the story.
- 5-7: partly matches an acceptable next step, or has small deviations, or shows traces of a wrong step.
- 0-4: matches a wrong step, repeats the last reference image, or contradicts the acceptable steps.

Reply with a single JSON object and nothing else:
{"score": <number 0-10>, "reasoning": "<one or two sentences>", "matches_positive": <true|false>, "matches_negative": <true|false>}
"""


@dataclass(frozen=True)
class MiconTemplates:
    """Judge template text and per-task checkpoint question lists from a MICON-Bench checkout."""

    judge_template: str
    qa: Mapping[str, str]
    source: Path | None = None


def load_templates(templates_dir: str | os.PathLike[str], tasks=None) -> MiconTemplates:
    """Read ``judge_prompt.template.txt`` and the ``Q&A`` lists for ``tasks`` (default: all six).

    Each question list must name exactly the checkpoints the protocol defines for its
    task; a mismatch means a wrong or modified checkout and raises ``ValueError``.
    """
    root = Path(templates_dir)
    template_path = root / JUDGE_TEMPLATE_FILE
    if not template_path.is_file():
        raise FileNotFoundError(f"templates_dir: {template_path} not found (point it at MICON-Bench/Evaluation/templates)")
    judge_template = template_path.read_text(encoding="utf-8")
    missing = [p for p in REQUIRED_PLACEHOLDERS if "{" + p + "}" not in judge_template]
    if missing:
        raise ValueError(f"templates_dir: {template_path} lacks placeholders {missing}")
    unknown = sorted(set(_PLACEHOLDER.findall(judge_template)) - set(PLACEHOLDERS))
    if unknown:
        logger.warning("judge template %s has placeholders this tool does not fill: %s", template_path, unknown)
    selected = list(TASKS) if tasks is None else [task_spec(t).name for t in tasks]
    qa: dict[str, str] = {}
    for task in selected:
        qa_path = root / QA_FOLDER / QA_FILES[task]
        if not qa_path.is_file():
            raise FileNotFoundError(f"templates_dir: checkpoint list for {task!r} not found at {qa_path}")
        text = qa_path.read_text(encoding="utf-8").strip()
        listed = set(_CHECKPOINT_REF.findall(text))
        expected = set(task_spec(task).all_checkpoints)
        if listed != expected:
            raise ValueError(
                f"templates_dir: {qa_path} lists checkpoints {sorted(listed)} but the protocol for {task!r} "
                f"defines {sorted(expected)}"
            )
        qa[task] = text
    return MiconTemplates(judge_template=judge_template, qa=MappingProxyType(qa), source=root)


def load_guidelines(path: str | os.PathLike[str]) -> dict[str, str]:
    """Optional per-task guideline texts (YAML mapping task -> text) placed before the checkpoint list.

    The released ``build_prompts.py`` adds such texts from its source code; users who
    want byte-comparable prompts can paste them into a YAML file and pass it here.
    """
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: guidelines must be a YAML mapping of task name to text")
    out = {}
    for task, text in data.items():
        task_spec(str(task))
        if not isinstance(text, str):
            raise ValueError(f"{path}: guideline for {task!r} must be text")
        out[str(task)] = text.strip()
    return out


def checkpoint_json_format(task: str) -> str:
    """The JSON answer skeleton listing every checkpoint of ``task``."""
    spec = task_spec(task)
    lines = ["{", '  "checkpoint_results": {']
    ids = spec.all_checkpoints
    for i, cp in enumerate(ids):
        comma = "," if i < len(ids) - 1 else ""
        lines.append(f'    "{cp}": {{"pass": 0 or 1}}{comma}')
    lines += ["  },", '  "rationale_short": "<at most 200 characters>"', "}"]
    return "\n".join(lines)


def _fill(template: str, values: Mapping[str, str]) -> str:
    # Plain replacement instead of str.format: task texts and templates contain literal
    # braces (JSON examples) that format() would choke on.
    out = template
    for name, value in values.items():
        out = out.replace("{" + name + "}", value)
    return out


def build_judge_prompt(case: MiconCase, templates: MiconTemplates, guidelines: Mapping[str, str] | None = None) -> str:
    """The checkpoint-judge prompt for one case (images: references in card order, then the output)."""
    if case.task not in templates.qa:
        raise ValueError(f"templates: no checkpoint list loaded for task {case.task!r}")
    refs = list(case.refs.items())
    refs_block = "\n".join(f"- {name}: reference image {i} of {len(refs)}" for i, (name, _) in enumerate(refs, 1))
    goal_lines = [f"Goal: {case.goal}" if case.goal else "Goal: (none given)"]
    if case.constraints_hard:
        goal_lines.append("Hard constraints (a violation caps the affected dimension):")
        goal_lines += [f"- H{i}: {text}" for i, text in enumerate(case.constraints_hard, 1)]
    qa_block = templates.qa[case.task]
    if guidelines and case.task in guidelines:
        qa_block = guidelines[case.task] + "\n\n" + qa_block
    values = {
        "TASK_TYPE": case.task,
        "REFS_BLOCK": refs_block,
        "GEN_PROMPT_BLOCK": json.dumps(case.generation_prompt, ensure_ascii=False),
        # A neutral label instead of the output's path: the folder name may reveal the
        # A/B condition (e.g. "dar_on") and must not reach the judge.
        "CANDIDATE_PATH": f"the last attached image (generated for case {case.case_id})",
        "GOAL_AND_CONSTRAINTS": "\n".join(goal_lines),
        "TASK_QA_BLOCK": qa_block,
        "CHECKPOINT_JSON_FORMAT": checkpoint_json_format(case.task),
    }
    return _fill(templates.judge_template, values)


def load_candidate_prompt(path: str | os.PathLike[str]) -> str:
    """A replacement candidate-answer prompt; may use {N_REFS} {BACKGROUND} {POSITIVE} {NEGATIVE}."""
    text = Path(path).read_text(encoding="utf-8")
    if "{POSITIVE}" not in text:
        raise ValueError(f"{path}: a candidate prompt must contain the {{POSITIVE}} placeholder")
    return text


def build_candidate_prompt(case: MiconCase, candidates: StoryCandidates, template: str = DEFAULT_CANDIDATE_PROMPT) -> str:
    def numbered(items: tuple[str, ...]) -> str:
        return "\n".join(f"{i}. {item}" for i, item in enumerate(items, 1)) if items else "(none)"

    return _fill(
        template,
        {
            "N_REFS": str(len(case.refs)),
            "BACKGROUND": candidates.background or "(none given)",
            "POSITIVE": numbered(candidates.positive),
            "NEGATIVE": numbered(candidates.negative),
        },
    )
