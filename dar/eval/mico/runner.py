"""Scoring a folder of generated images on MICo-Bench (Weighted-Ref-VIEScore)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..judges.base import Judge, ParsedReply, ask_parsed, image_sha256
from ..judges.faces import FaceEmbedder, cosine_similarity_matrix
from ..replies import parse_score_pair, parse_yes_no
from ..runs import (
    STATUS_INPUT_ERROR,
    STATUS_JUDGE_FAILURE,
    STATUS_MISSING,
    STATUS_OK,
    RunStore,
    RunSummary,
    find_output,
    run_cases,
)
from .manifest import Case, load_benchmark
from .prompts import MicoPrompts, load_prompt_file
from .scoring import (
    FORMULA_SCALE,
    FORMULAS,
    MATCHING_MODES,
    case_score,
    face_score,
    match_faces,
    perceptual_quality,
    semantic_consistency,
    visibility_weight,
)

logger = logging.getLogger(__name__)

OUTPUT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
COMPAT_MODES = ("strict", "released")
REPLY_KEEP_CHARS = 4000


@dataclass
class MicoScorer:
    """Everything needed to score one MICo-Bench case; :meth:`evaluate` returns its record.

    ``compat="strict"`` (default): an unusable judge reply (after retries) makes the case a
    ``judge_failure``. ``compat="released"`` mirrors the released scripts: an unclear
    yes/no visibility answer counts as "no", and a face source in which no face is
    detected zeroes every face source of the case. Failed SC/PQ calls leave the case
    unscored in both modes (the released script never writes a final score for them).
    """

    judge: Judge
    bench_dir: Path
    results_dir: Path
    model: str
    embedder: FaceEmbedder | None = None
    formula: str = "paper"
    face_matching: str = "best"
    compat: str = "strict"
    prompts: MicoPrompts = field(default_factory=MicoPrompts)
    parse_retries: int = 2
    keep_replies: bool = True

    def __post_init__(self) -> None:
        if self.formula not in FORMULAS:
            raise ValueError(f"formula must be one of {FORMULAS}, got {self.formula!r}")
        if self.face_matching not in MATCHING_MODES:
            raise ValueError(f"face_matching must be one of {MATCHING_MODES}, got {self.face_matching!r}")
        if self.compat not in COMPAT_MODES:
            raise ValueError(f"compat must be one of {COMPAT_MODES}, got {self.compat!r}")
        self.bench_dir = Path(self.bench_dir)
        self.results_dir = Path(self.results_dir)

    def _replies(self, parsed: ParsedReply) -> list[str]:
        return [r[:REPLY_KEEP_CHARS] for r in parsed.replies] if self.keep_replies else []

    def _faces(self, case: Case, output: Path, record: dict[str, Any]) -> list[float]:
        """Visibility credits of the face sources (in ``human_indices`` order)."""
        if not case.human_indices:
            return []
        if self.embedder is None:
            raise ValueError(f"case {case.case_id} has face sources but no face embedder was given")
        sources = case.input_paths(self.bench_dir)
        source_embeddings = []
        no_face = []
        for index in case.human_indices:
            faces = self.embedder.embed(sources[index])
            if not faces:
                no_face.append(index)
            source_embeddings.append(faces[0] if faces else None)
        output_faces = self.embedder.embed(output)
        record["output_faces"] = len(output_faces)
        if no_face:
            logger.warning("case %s: no face detected in source image(s) %s; they score 0", case.case_id, no_face)
            record["sources_without_face"] = no_face
        present = [e for e in source_embeddings if e is not None]
        matched_present = match_faces(cosine_similarity_matrix(present, output_faces), self.face_matching)
        it = iter(matched_present)
        matched = [next(it) if e is not None else None for e in source_embeddings]
        record["face_similarities"] = matched
        credits = [face_score(s) if s is not None else 0.0 for s in matched]
        if no_face and self.compat == "released":
            # Released quirk: one undetectable source face zeroes all face sources of the case.
            credits = [0.0] * len(credits)
        record["face_credits"] = credits
        return credits

    def evaluate(self, case: Case) -> dict[str, Any]:
        record: dict[str, Any] = {
            "benchmark": "mico",
            "task": case.group,
            "case_id": case.case_id,
            "status": None,
            "score": None,
            "formula": self.formula,
            "failures": [],
        }
        output = find_output(self.results_dir, self.model, case.group, case.case_id, OUTPUT_EXTENSIONS)
        if output is None:
            record["status"] = STATUS_MISSING
            return record
        record["output"] = str(output.relative_to(self.results_dir))
        record["output_sha256"] = image_sha256(output)
        needed = case.input_paths(self.bench_dir) + [case.reference_path(self.bench_dir)]
        missing = [str(p) for p in needed if not p.is_file()]
        if missing:
            record["status"] = STATUS_INPUT_ERROR
            record["failures"].append({"stage": "inputs", "kind": "missing_input", "error": f"benchmark images not found: {missing}"})
            return record

        replies: dict[str, Any] = {}
        record["judge_replies"] = replies
        face_credits = self._faces(case, output, record)

        sources = case.input_paths(self.bench_dir)
        element_present: dict[str, bool] = {}
        for index in range(len(sources)):
            if index in case.human_indices:
                continue
            parsed = ask_parsed(self.judge, self.prompts.visibility, [sources[index], output], parse_yes_no, parse_retries=self.parse_retries)
            replies[f"visibility_{index}"] = self._replies(parsed)
            if parsed.ok:
                element_present[str(index)] = bool(parsed.value)
                continue
            failure = {"stage": f"visibility_{index}", "kind": parsed.kind, "error": parsed.error, "attempts": parsed.attempts}
            if self.compat == "released" and parsed.kind == "parse":
                failure["scored_as"] = 0.0  # released: an unclear answer counts as "no"
                record["failures"].append(failure)
                element_present[str(index)] = False
                continue
            record["failures"].append(failure)
            record["status"] = STATUS_JUDGE_FAILURE
            return record
        record["element_present"] = element_present
        w = visibility_weight(face_credits, list(element_present.values()))
        record["w"] = w

        sc = ask_parsed(self.judge, self.prompts.sc_for(case.prompt), [case.reference_path(self.bench_dir), output], parse_score_pair, parse_retries=self.parse_retries)
        replies["sc"] = self._replies(sc)
        if not sc.ok:
            record["failures"].append({"stage": "sc", "kind": sc.kind, "error": sc.error, "attempts": sc.attempts})
            record["status"] = STATUS_JUDGE_FAILURE
            return record
        pf, sr = sc.value  # type: ignore[misc]
        record.update(pf=pf, sr=sr, sc=semantic_consistency(pf, sr))

        pq = ask_parsed(self.judge, self.prompts.pq, [output], parse_score_pair, parse_retries=self.parse_retries)
        replies["pq"] = self._replies(pq)
        if not pq.ok:
            record["failures"].append({"stage": "pq", "kind": pq.kind, "error": pq.error, "attempts": pq.attempts})
            record["status"] = STATUS_JUDGE_FAILURE
            return record
        naturalness, artifacts = pq.value  # type: ignore[misc]
        record.update(naturalness=naturalness, artifacts=artifacts, pq=perceptual_quality(naturalness, artifacts))
        record["score"] = case_score(w, pf, sr, naturalness, artifacts, self.formula)
        record["status"] = STATUS_OK
        return record


def run_mico(
    *,
    bench_dir: str | os.PathLike[str],
    results_dir: str | os.PathLike[str],
    model: str,
    out_dir: str | os.PathLike[str],
    judge: Judge,
    embedder: FaceEmbedder | None = None,
    groups: Sequence[str] | None = None,
    formula: str = "paper",
    face_matching: str = "best",
    compat: str = "strict",
    prompt_file: str | os.PathLike[str] | None = None,
    concurrency: int = 4,
    retry_failed: bool = False,
    parse_retries: int = 2,
    progress: bool = True,
) -> RunSummary:
    """Score ``<results_dir>/<model>/<group>/<case_id>.(png|jpg|jpeg|webp)`` into the run directory ``out_dir``."""
    if not isinstance(model, str) or not model or Path(model).name != model:
        raise ValueError(f"model must be a folder name under results_dir, got {model!r}")
    if formula not in FORMULAS:
        raise ValueError(f"formula must be one of {FORMULAS}, got {formula!r}")
    results = Path(results_dir)
    if not results.is_dir():
        raise FileNotFoundError(f"results_dir: {results} is not a directory")
    cases = load_benchmark(bench_dir, groups)
    if embedder is None and any(c.human_indices for c in cases):
        raise ValueError("embedder: these cases have face sources (human_indices); pass a FaceEmbedder such as ArcFaceEmbedder")
    prompts = load_prompt_file(prompt_file) if prompt_file is not None else MicoPrompts()
    scorer = MicoScorer(
        judge=judge,
        bench_dir=Path(bench_dir),
        results_dir=results,
        model=model,
        embedder=embedder,
        formula=formula,
        face_matching=face_matching,
        compat=compat,
        prompts=prompts,
        parse_retries=parse_retries,
    )
    identity = {
        "benchmark": "mico",
        "model": model,
        "judge_model": judge.name,
        "formula": formula,
        "face_matching": face_matching,
        "compat": compat,
        "prompts": prompts.source if prompts.source == "default" else "custom",
        "face_embedder": getattr(embedder, "name", None) if embedder is not None else None,
    }
    describe = getattr(judge, "describe", None)
    details = {
        "bench_dir": str(Path(bench_dir).resolve()),
        "results_dir": str(results.resolve()),
        "judge": describe() if callable(describe) else {"model": judge.name},
        "prompt_file": str(prompt_file) if prompt_file is not None else None,
        "parse_retries": parse_retries,
        "score_scale": FORMULA_SCALE[formula],
    }
    expected: dict[str, list[str]] = {}
    for case in cases:
        expected.setdefault(case.group, []).append(case.case_id)
    with RunStore.open(out_dir, identity, details, expected) as store:
        return run_cases(
            store,
            cases,
            key=lambda c: (c.group, c.case_id),
            evaluate=scorer.evaluate,
            concurrency=concurrency,
            retry_failed=retry_failed,
            desc="MICo-Bench",
            progress=progress,
        )
