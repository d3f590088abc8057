"""What the MICON-Bench and MICo-Bench runners share: case records, judge stages, argument checks, the run loop.

Each benchmark keeps only what is its own -- how a case is judged and scored, and which
settings define a run -- in :mod:`dar.eval.micon.runner` and :mod:`dar.eval.mico.runner`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from .inputs import image_content_problem
from .judges.base import Judge, ParsedReply, ask_parsed, image_sha256
from .runs import STATUS_GENERATION_ERROR, STATUS_INPUT_ERROR, STATUS_JUDGE_FAILURE, STATUS_MISSING, RunStore, RunSummary, find_output, run_cases

C = TypeVar("C")

COMPAT_MODES = ("strict", "released")
REPLY_KEEP_CHARS = 4000


def check_compat(compat: str) -> None:
    if compat not in COMPAT_MODES:
        raise ValueError(f"compat must be one of {COMPAT_MODES}, got {compat!r}")


def check_model(model: object, root_arg: str) -> None:
    """``model`` names one folder directly under the generated-images root ``root_arg``."""
    if not isinstance(model, str) or not model or Path(model).name != model:
        raise ValueError(f"model must be a folder name under {root_arg}, got {model!r}")


def existing_dir(path: str | os.PathLike[str], arg: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{arg}: {folder} is not a directory")
    return folder


def run_identity(benchmark: str, model: str, judge: Judge, **settings: Any) -> dict[str, Any]:
    """The settings that decide what a score means; a run directory refuses to resume under others."""
    return {"benchmark": benchmark, "model": model, "judge_model": judge.name, **settings}


def judge_details(judge: Judge) -> dict[str, Any]:
    """The judge's own description for run metadata (no credentials), or just its model name."""
    describe = getattr(judge, "describe", None)
    return describe() if callable(describe) else {"model": judge.name}


class JudgedScorer:
    """Record-building helpers for a per-benchmark scorer dataclass.

    The dataclass provides ``judge``, ``parse_retries`` and ``keep_replies``; a mixin
    (not a dataclass base) so each scorer keeps its own field order and defaults.
    """

    judge: Judge
    parse_retries: int
    keep_replies: bool

    @staticmethod
    def new_record(benchmark: str, task: str, case_id: str, **extra: Any) -> dict[str, Any]:
        """An unfinished record; ``extra`` keys sit between ``score`` and ``failures``."""
        return {"benchmark": benchmark, "task": task, "case_id": case_id, "status": None, "score": None, **extra, "failures": []}

    @staticmethod
    def input_error(record: dict[str, Any], kind: str, errors: Sequence[str]) -> dict[str, Any]:
        """Mark ``record`` an ``input_error``, one failure entry per reason."""
        record["status"] = STATUS_INPUT_ERROR
        record["failures"] += [{"stage": "inputs", "kind": kind, "error": error} for error in errors]
        return record

    @staticmethod
    def not_images(paths: Sequence[Path]) -> list[str]:
        """Reasons for the existing files among ``paths`` that are not PNG/JPEG/WebP images."""
        return [problem for path in paths if (problem := image_content_problem(path)) is not None]

    @staticmethod
    def attach_output(record: dict[str, Any], root: Path, model: str, extensions: Sequence[str]) -> Path | None:
        """Find ``<root>/<model>/<task>/<case_id>.<ext>`` and note it (and its hash) in ``record``.

        Returns ``None`` after marking the record ``missing_output`` when there is no such file,
        or ``generation_error`` when the file is not a PNG, JPEG or WebP image by its first bytes
        (an empty or failed generation): such an output is never sent to the judge nor scored.
        """
        output = find_output(root, model, record["task"], record["case_id"], extensions)
        if output is None:
            record["status"] = STATUS_MISSING
            return None
        record["output"] = str(output.relative_to(root))
        record["output_sha256"] = image_sha256(output)
        problem = image_content_problem(output)
        if problem is not None:
            record["status"] = STATUS_GENERATION_ERROR
            record["failures"].append({"stage": "output", "kind": "not_an_image", "error": problem})
            return None
        return output

    def ask(
        self,
        replies: dict[str, Any],
        stage: str,
        prompt: str,
        images: Sequence[str | os.PathLike[str]],
        parse: Callable[[str], Any],
        *,
        system: str | None = None,
    ) -> ParsedReply:
        """One judge stage: ask (with parse retries) and keep its raw replies under ``replies[stage]``.

        Every image was checked before (benchmark images by the runner, the output by
        :meth:`attach_output`); checking again here keeps the first-bytes rule true for every
        image sent, whatever a future stage passes.
        """
        refused = self.not_images(images)
        if refused:
            raise ValueError(f"images: refusing to send non-images to the judge: {refused}")
        parsed = ask_parsed(self.judge, prompt, images, parse, system=system, parse_retries=self.parse_retries)
        replies[stage] = [r[:REPLY_KEEP_CHARS] for r in parsed.replies] if self.keep_replies else []
        return parsed

    @staticmethod
    def failure(stage: str, parsed: ParsedReply) -> dict[str, Any]:
        return {"stage": stage, "kind": parsed.kind, "error": parsed.error, "attempts": parsed.attempts}

    def judge_failed(self, record: dict[str, Any], stage: str, parsed: ParsedReply) -> dict[str, Any]:
        """Record a stage whose reply could not be used: the case is a ``judge_failure``, left unscored."""
        record["failures"].append(self.failure(stage, parsed))
        record["status"] = STATUS_JUDGE_FAILURE
        return record


def score_run(
    out_dir: str | os.PathLike[str],
    cases: Iterable[C],
    key: Callable[[C], tuple[str, str]],
    evaluate: Callable[[C], dict[str, Any]],
    *,
    identity: Mapping[str, Any],
    details: Mapping[str, Any],
    desc: str,
    concurrency: int,
    retry_failed: bool,
    progress: bool,
) -> RunSummary:
    """Open (or resume) the run directory for ``cases`` and evaluate every unfinished one."""
    cases = list(cases)
    expected: dict[str, list[str]] = {}
    for case in cases:
        task, case_id = key(case)
        expected.setdefault(task, []).append(case_id)
    with RunStore.open(out_dir, identity, details, expected) as store:
        return run_cases(
            store,
            cases,
            key=key,
            evaluate=evaluate,
            concurrency=concurrency,
            retry_failed=retry_failed,
            desc=desc,
            progress=progress,
        )
