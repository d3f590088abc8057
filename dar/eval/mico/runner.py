"""Scoring a folder of generated images on MICo-Bench (Weighted-Ref-VIEScore)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..judges.base import Judge
from ..judges.faces import FaceEmbedder, cosine_similarity_matrix
from ..replies import parse_score_pair, parse_yes_no
from ..runner_base import COMPAT_MODES, JudgedScorer, check_compat, check_model, existing_dir, judge_details, run_identity, score_run
from ..runs import STATUS_OK, RunSummary
from . import scoring
from .manifest import Case, load_benchmark
from .prompts import MicoPrompts, load_prompt_file

logger = logging.getLogger(__name__)

OUTPUT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
__all__ = ["COMPAT_MODES", "MicoScorer", "run_mico"]


@dataclass
class MicoScorer(JudgedScorer):
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
        self.formula = scoring.resolve_formula(self.formula)
        if self.face_matching not in scoring.MATCHING_MODES:
            raise ValueError(f"face_matching must be one of {scoring.MATCHING_MODES}, got {self.face_matching!r}")
        check_compat(self.compat)
        self.bench_dir = Path(self.bench_dir)
        self.results_dir = Path(self.results_dir)

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
        matched_present = scoring.match_faces(cosine_similarity_matrix(present, output_faces), self.face_matching)
        it = iter(matched_present)
        matched = [next(it) if e is not None else None for e in source_embeddings]
        record["face_similarities"] = matched
        credits = [scoring.face_score(s) if s is not None else 0.0 for s in matched]
        if no_face and self.compat == "released":
            # Released quirk: one undetectable source face zeroes all face sources of the case.
            credits = [0.0] * len(credits)
        record["face_credits"] = credits
        return credits

    def evaluate(self, case: Case) -> dict[str, Any]:
        record = self.new_record("mico", case.group, case.case_id, formula=self.formula)
        if case.input_errors:  # nothing named by this case is read (see dar.eval.inputs)
            return self.input_error(record, "unsafe_input", case.input_errors)
        output = self.attach_output(record, self.results_dir, self.model, OUTPUT_EXTENSIONS)
        if output is None:
            return record
        needed = case.input_paths(self.bench_dir) + [case.reference_path(self.bench_dir)]
        missing = [str(p) for p in needed if not p.is_file()]
        if missing:
            return self.input_error(record, "missing_input", [f"benchmark images not found: {missing}"])
        not_images = self.not_images(needed)
        if not_images:
            return self.input_error(record, "not_an_image", not_images)

        replies: dict[str, Any] = {}
        record["judge_replies"] = replies
        face_credits = self._faces(case, output, record)

        sources = case.input_paths(self.bench_dir)
        element_present: dict[str, bool] = {}
        for index in range(len(sources)):
            if index in case.human_indices:
                continue
            stage = f"visibility_{index}"
            parsed = self.ask(replies, stage, self.prompts.visibility, [sources[index], output], parse_yes_no)
            if parsed.ok:
                element_present[str(index)] = bool(parsed.value)
                continue
            if self.compat != "released" or parsed.kind != "parse":
                return self.judge_failed(record, stage, parsed)
            failure = self.failure(stage, parsed)
            failure["scored_as"] = 0.0  # released: an unclear answer counts as "no"
            record["failures"].append(failure)
            element_present[str(index)] = False
        record["element_present"] = element_present
        w = scoring.visibility_weight(face_credits, list(element_present.values()))
        record["w"] = w

        sc = self.ask(replies, "sc", self.prompts.sc_for(case.prompt), [case.reference_path(self.bench_dir), output], parse_score_pair)
        if not sc.ok:
            return self.judge_failed(record, "sc", sc)
        pf, sr = sc.value  # type: ignore[misc]
        record.update(pf=pf, sr=sr, sc=scoring.semantic_consistency(pf, sr))

        pq = self.ask(replies, "pq", self.prompts.pq, [output], parse_score_pair)
        if not pq.ok:
            return self.judge_failed(record, "pq", pq)
        naturalness, artifacts = pq.value  # type: ignore[misc]
        record.update(naturalness=naturalness, artifacts=artifacts, pq=scoring.perceptual_quality(naturalness, artifacts))
        record["score"] = scoring.case_score(w, pf, sr, naturalness, artifacts, self.formula)
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
    """Score ``<results_dir>/<model>/<group>/<case_id>.(png|jpg|jpeg|webp)`` into the run directory ``out_dir``.

    ``formula``: ``"paper"`` (default, W x SC x PQ on 0-100, upstream since f58070c) or
    ``"legacy"`` (W x sqrt(SC x PQ) on 0-10); ``"released"`` is a deprecated name of ``"legacy"``.
    """
    check_model(model, "results_dir")
    formula = scoring.resolve_formula(formula)  # a run records the current name
    results = existing_dir(results_dir, "results_dir")
    cases = load_benchmark(bench_dir, groups)
    if embedder is None and any(c.human_indices for c in cases):
        raise ValueError("embedder: these cases have face sources (human_indices); pass a FaceEmbedder such as ArcFaceEmbedder")
    prompts = load_prompt_file(prompt_file) if prompt_file is not None else MicoPrompts()
    scorer = MicoScorer(judge=judge, bench_dir=Path(bench_dir), results_dir=results, model=model, embedder=embedder,
                        formula=formula, face_matching=face_matching, compat=compat, prompts=prompts, parse_retries=parse_retries)
    identity = run_identity(
        "mico", model, judge,
        formula=formula,
        face_matching=face_matching,
        compat=compat,
        prompts=prompts.source if prompts.source == "default" else "custom",
        face_embedder=getattr(embedder, "name", None) if embedder is not None else None,
    )
    details = {
        "bench_dir": str(Path(bench_dir).resolve()),
        "results_dir": str(results.resolve()),
        "judge": judge_details(judge),
        "prompt_file": str(prompt_file) if prompt_file is not None else None,
        "parse_retries": parse_retries,
        "score_scale": scoring.FORMULA_SCALE[formula],
    }
    return score_run(out_dir, cases, key=lambda c: (c.group, c.case_id), evaluate=scorer.evaluate, identity=identity,
                     details=details, desc="MICo-Bench", concurrency=concurrency, retry_failed=retry_failed, progress=progress)
