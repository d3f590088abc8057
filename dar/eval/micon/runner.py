"""Scoring a folder of generated images on MICON-Bench with an MLLM judge."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..judges.base import Judge
from ..replies import ReplyParseError, parse_checkpoints, parse_score
from ..runner_base import COMPAT_MODES, JudgedScorer, check_compat, check_model, existing_dir, judge_details, run_identity, score_run
from ..runs import STATUS_INPUT_ERROR, STATUS_OK, RunSummary
from .cases import CANDIDATES_FILE, MiconCase, StoryCandidates, load_candidates, load_cases
from .prompts import (
    CANDIDATE_SYSTEM,
    DEFAULT_CANDIDATE_PROMPT,
    MiconTemplates,
    build_candidate_prompt,
    build_judge_prompt,
    load_candidate_prompt,
    load_guidelines,
    load_templates,
)
from .protocol import STORY_TASK, score_checkpoints, story_overall, task_spec

logger = logging.getLogger(__name__)

OUTPUT_EXTENSIONS = (".png", ".jpg", ".jpeg")
__all__ = ["COMPAT_MODES", "MiconScorer", "run_micon"]


@dataclass
class MiconScorer(JudgedScorer):
    """Everything needed to score one MICON-Bench case; :meth:`evaluate` returns its record.

    ``compat="strict"`` (default): any judge reply that cannot be used after retries makes
    the case a ``judge_failure`` -- reported, excluded from means, never scored.
    ``compat="released"`` reproduces the released scripts for comparison with published
    numbers: a failed candidate-answer call scores 0 (and the case still counts), while a
    failed checkpoint call leaves the case unscored (the released aggregation never sees a
    judgment it could not parse). Both kinds are still counted as judge failures.
    """

    judge: Judge
    templates: MiconTemplates
    generations_dir: Path
    model: str
    candidates: Mapping[str, StoryCandidates] | None = None
    compat: str = "strict"
    parse_retries: int = 2
    guidelines: Mapping[str, str] | None = None
    candidate_prompt: str = DEFAULT_CANDIDATE_PROMPT
    story_candidates: bool = True
    keep_replies: bool = True

    def __post_init__(self) -> None:
        check_compat(self.compat)
        self.generations_dir = Path(self.generations_dir)

    def evaluate(self, case: MiconCase) -> dict[str, Any]:
        spec = task_spec(case.task)
        record = self.new_record("micon", case.task, case.case_id)
        if case.input_errors:  # nothing named by this card is read (see dar.eval.inputs)
            return self.input_error(record, "unsafe_input", case.input_errors)
        output = self.attach_output(record, self.generations_dir, self.model, OUTPUT_EXTENSIONS)
        if output is None:
            return record

        missing_refs = [str(p) for p in case.refs.values() if not p.is_file()]
        story_hybrid = case.task == STORY_TASK and self.story_candidates
        candidates = None
        if story_hybrid:
            candidates = (self.candidates or {}).get(case.case_id)
        if missing_refs or (story_hybrid and candidates is None):
            record["status"] = STATUS_INPUT_ERROR
            if missing_refs:
                record["failures"].append({"stage": "inputs", "kind": "missing_reference", "error": f"reference images not found: {missing_refs}"})
            if story_hybrid and candidates is None:
                record["failures"].append({"stage": "inputs", "kind": "missing_candidates", "error": "no candidate answers for this story_infer case"})
            return record
        not_images = self.not_images(list(case.refs.values()))
        if not_images:
            return self.input_error(record, "not_an_image", not_images)

        images = list(case.refs.values()) + [output]
        known = set(spec.all_checkpoints)

        def parse(reply: str) -> dict[str, int]:
            verdicts = parse_checkpoints(reply)
            if not known & set(verdicts):
                raise ReplyParseError(f"reply has none of the checkpoints of task {case.task!r}", reply)
            return verdicts

        replies: dict[str, Any] = {}
        record["judge_replies"] = replies
        parsed = self.ask(replies, "checkpoints", build_judge_prompt(case, self.templates, self.guidelines), images, parse)
        if not parsed.ok:
            return self.judge_failed(record, "checkpoints", parsed)

        verdicts: dict[str, int] = parsed.value  # type: ignore[assignment]
        checkpoints = {k: v for k, v in verdicts.items() if k in known}
        record["checkpoints"] = checkpoints
        record["missing_checkpoints"] = sorted(known - set(checkpoints))
        record["unexpected_checkpoints"] = sorted(set(verdicts) - known)
        dims, plain = score_checkpoints(case.task, checkpoints)
        record["dimension_scores"] = dims
        record["plain_overall"] = plain

        if not story_hybrid:
            record["status"] = STATUS_OK
            record["score"] = plain
            if case.task == STORY_TASK:
                record["story_scoring"] = "plain"
            return record

        record["story_scoring"] = "hybrid"
        candidate_prompt = build_candidate_prompt(case, candidates, self.candidate_prompt)  # type: ignore[arg-type]
        cand = self.ask(replies, "candidate", candidate_prompt, images, parse_score, system=CANDIDATE_SYSTEM)
        mean_dim = sum(dims.values()) / len(dims)
        if cand.ok:
            candidate_score = float(cand.value)  # type: ignore[arg-type]
        else:
            if self.compat != "released":
                return self.judge_failed(record, "candidate", cand)
            # Released behaviour: a failed candidate evaluation counts as a score of 0.
            failure = self.failure("candidate", cand)
            failure["scored_as"] = 0.0
            record["failures"].append(failure)
            candidate_score = 0.0
        record["candidate_score"] = candidate_score
        record["score"] = story_overall(mean_dim, candidate_score)
        record["status"] = STATUS_OK
        return record


def run_micon(
    *,
    data_dir: str | os.PathLike[str],
    templates_dir: str | os.PathLike[str],
    generations_dir: str | os.PathLike[str],
    model: str,
    out_dir: str | os.PathLike[str],
    judge: Judge,
    tasks: Sequence[str] | None = None,
    compat: str = "strict",
    concurrency: int = 4,
    retry_failed: bool = False,
    parse_retries: int = 2,
    story_candidates: bool = True,
    candidates_file: str | os.PathLike[str] | None = None,
    guidelines_file: str | os.PathLike[str] | None = None,
    candidate_prompt_file: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> RunSummary:
    """Score ``<generations_dir>/<model>/<task>/<case_id>.(png|jpg|jpeg)`` into the run directory ``out_dir``.

    Resumable: rerunning with the same arguments skips finished cases.
    """
    check_model(model, "generations_dir")
    check_compat(compat)
    generations = existing_dir(generations_dir, "generations_dir")
    cases = load_cases(data_dir, tasks)
    task_names = sorted({c.task for c in cases})
    templates = load_templates(templates_dir, task_names)
    candidates = None
    if STORY_TASK in task_names and story_candidates:
        path = Path(candidates_file) if candidates_file is not None else Path(data_dir) / CANDIDATES_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"candidates_file: {path} not found; story_infer needs candidate answers "
                "(or pass story_candidates=False to score it on checkpoints only)"
            )
        candidates = load_candidates(path)
    guidelines = load_guidelines(guidelines_file) if guidelines_file is not None else None
    candidate_prompt = load_candidate_prompt(candidate_prompt_file) if candidate_prompt_file is not None else DEFAULT_CANDIDATE_PROMPT

    scorer = MiconScorer(judge=judge, templates=templates, generations_dir=generations, model=model, candidates=candidates,
                         compat=compat, parse_retries=parse_retries, guidelines=guidelines, candidate_prompt=candidate_prompt,
                         story_candidates=story_candidates)
    identity = run_identity(
        "micon", model, judge,
        compat=compat,
        story_scoring="hybrid" if story_candidates else "plain",
        guidelines=guidelines is not None,
        candidate_prompt="custom" if candidate_prompt_file is not None else "default",
    )
    details = {
        "data_dir": str(Path(data_dir).resolve()),
        "templates_dir": str(Path(templates_dir).resolve()),
        "generations_dir": str(generations.resolve()),
        "judge": judge_details(judge),
        "parse_retries": parse_retries,
        "score_scale": "0-100",
    }
    return score_run(out_dir, cases, key=lambda c: (c.task, c.case_id), evaluate=scorer.evaluate, identity=identity,
                     details=details, desc="MICON-Bench", concurrency=concurrency, retry_failed=retry_failed, progress=progress)
