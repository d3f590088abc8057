"""Crash-safe, resumable run directories shared by both benchmarks.

Layout::

    <run>/run.json                    settings that define the run (never credentials)
    <run>/expected.json               case ids the run was asked to score, per task/group
    <run>/cases/<task>/<case_id>.json one result per case, written atomically when known
                                      (the id percent-quoted; a long one as prefix + hash)

Because each case is its own file, replaced atomically, a process killed at any moment
leaves every case either complete or absent: a rerun skips the complete ones, redoes the
absent ones, and can never produce two results for one case.

A case file that cannot be read as a record anyway (truncated or emptied by a full disk,
garbage, another JSON shape -- written by something other than this module) never stops
a run: a scoring run moves it aside to ``<name>.json.corrupt`` (``.corrupt-1``, ... when
taken), says so in a warning naming both files, and scores the case again; a read-only
reader (reports, comparisons) warns and treats the case as not yet scored.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import numbers
import os
import re
import sys
import urllib.parse
import warnings
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from tqdm.auto import tqdm

from .atomic import atomic_write_json, is_temp_file, remove_stale_temp_files

logger = logging.getLogger(__name__)

C = TypeVar("C")

STATUS_OK = "ok"
STATUS_MISSING = "missing_output"
STATUS_JUDGE_FAILURE = "judge_failure"
STATUS_INPUT_ERROR = "input_error"
STATUS_GENERATION_ERROR = "generation_error"  # the generated image exists but is not an image
STATUSES = (STATUS_OK, STATUS_MISSING, STATUS_JUDGE_FAILURE, STATUS_INPUT_ERROR, STATUS_GENERATION_ERROR)

RUN_FILE = "run.json"
EXPECTED_FILE = "expected.json"
CASES_DIR = "cases"
LOCK_FILE = ".lock"
CORRUPT_SUFFIX = ".corrupt"

def current_identity(identity: Mapping[str, Any]) -> dict[str, Any]:
    """``identity`` with values renamed since a run directory was written under their current names.

    Old runs keep their meaning, so resuming, reporting and comparing them go on working.
    """
    from .mico.scoring import DEPRECATED_FORMULAS  # here, not at the top: dar.eval.mico imports this module

    formula = identity.get("formula")
    if isinstance(formula, str) and formula in DEPRECATED_FORMULAS:
        return {**identity, "formula": DEPRECATED_FORMULAS[formula]}
    return dict(identity)


def find_output(root: Path, model: str, task: str, case_id: str, extensions: Sequence[str]) -> Path | None:
    """``<root>/<model>/<task>/<case_id>.<ext>``, trying ``extensions`` in order."""
    folder = root / model / task
    found = [folder / f"{case_id}{ext}" for ext in extensions if (folder / f"{case_id}{ext}").is_file()]
    if len(found) > 1:
        logger.warning("several outputs for %s/%s: %s; using %s", task, case_id, [p.name for p in found], found[0].name)
    return found[0] if found else None


# A record name is kept as it always was (the quoted id) while the quoted id fits in this many bytes,
# so resuming an older run directory finds its records; longer ids get a bounded name instead. 200
# leaves room, under the 255-byte NAME_MAX of common file systems, for ".json", the atomic writer's
# temp name (".<name>.tmp-<pid>-<random>") and ".corrupt-N" (see keep_aside).
MAX_NAME_BYTES = 200
_PREFIX_BYTES = MAX_NAME_BYTES - 1 - 32  # readable prefix + "+" + 32 hex digits of SHA-256


def _file_name(case_id: str) -> str:
    """The file-name form of a case id or task: the id percent-quoted, bounded in length.

    Case ids come from benchmark files; anything that is not a plain file name is quoted. A quoted
    id longer than :data:`MAX_NAME_BYTES` becomes ``<quoted prefix>+<sha256 of the id>``: "+" is
    always quoted, so such a name never equals a short one, and distinct ids stay distinct.
    """
    case_id = str(case_id)
    name = urllib.parse.quote(case_id, safe="-_")
    name = name if not name.startswith(".") else "%2E" + name[1:]
    if len(name) <= MAX_NAME_BYTES:  # quoted names are ASCII: characters are bytes
        return name
    prefix = name[:_PREFIX_BYTES]
    cut = prefix.rfind("%", len(prefix) - 2)  # never split a %XX escape
    if cut != -1:
        prefix = prefix[:cut]
    return f"{prefix}+{hashlib.sha256(case_id.encode('utf-8', 'surrogatepass')).hexdigest()[:32]}"


def name_too_long(exc: BaseException) -> bool:
    """Whether ``exc`` is the file system refusing a file name or path as too long."""
    return isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG


def too_long_reason(exc: OSError) -> str:
    name = str(exc.filename) if exc.filename is not None else ""
    shown = name if len(name) <= 160 else f"{name[:80]}...{name[-60:]} ({len(os.fsencode(name))} bytes)"
    return f"a file name or path is too long for the file system ({exc.strerror}): {shown}"


def record_problem(record: object) -> str | None:
    """Why ``record`` is not a usable case record, or ``None`` if it is."""
    if not isinstance(record, dict):
        return f"a case record must be a JSON object, got {type(record).__name__}"
    for key in ("task", "case_id"):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
            return f"{key!r} must be a non-empty string or integer, got {value!r}"
    if record.get("status") not in STATUSES:
        return f"'status' must be one of {STATUSES}, got {record.get('status')!r}"
    if record["status"] == STATUS_OK:
        score = record.get("score")
        if isinstance(score, bool) or not isinstance(score, numbers.Real) or not math.isfinite(score):
            return f"a scored record needs a finite 'score', got {score!r}"
    return None


def _read_json(path: Path) -> tuple[Any, str | None]:
    """``(value, None)``, or ``(None, why it cannot be read)``; ``FileNotFoundError`` passes through."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        return None, f"not UTF-8 text ({err.reason} at byte {err.start})"
    if not text.strip():
        return None, "empty file"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        return None, f"invalid JSON ({err.msg} at line {err.lineno} column {err.colno})"


def keep_aside(path: Path) -> Path:
    """Rename ``path`` to a free ``<name>.corrupt[-N]`` next to it (never overwriting one) and return it."""
    for n in range(10_000):
        target = path.with_name(path.name + CORRUPT_SUFFIX + (f"-{n}" if n else ""))
        if not target.exists():
            os.replace(path, target)
            return target
    raise RuntimeError(f"{path}: too many corrupt copies kept aside already")


class RunStore:
    """A run directory. Open it with :meth:`open` (for writing) or :meth:`load` (read-only)."""

    def __init__(self, run_dir: str | os.PathLike[str]):
        self.run_dir = Path(run_dir)
        self._lock_handle = None

    # -- opening -----------------------------------------------------------------------
    @classmethod
    def open(cls, run_dir: str | os.PathLike[str], identity: Mapping[str, Any], details: Mapping[str, Any], expected: Mapping[str, Sequence[str]]) -> "RunStore":
        """Create or resume a run.

        ``identity`` holds the settings that decide what a score means (benchmark, model,
        judge, formula, compatibility mode ...). Resuming with a different identity would
        mix incomparable scores in one directory, so it raises ``ValueError``.
        """
        store = cls(run_dir)
        store.run_dir.mkdir(parents=True, exist_ok=True)
        store._acquire_lock()
        # Only our own files: a judge cache may live below the run directory and be shared.
        remove_stale_temp_files(store.run_dir / CASES_DIR)
        for leftover in store.run_dir.glob(".*"):
            if leftover.is_file() and is_temp_file(leftover):
                leftover.unlink(missing_ok=True)
        identity = dict(identity)
        meta_path = store.run_dir / RUN_FILE
        if meta_path.is_file():
            try:
                old = store._read_meta()
            except ValueError:
                store.close()
                raise
            old_identity = current_identity(old.get("identity", {}))
            diff = {k: (old_identity.get(k), identity.get(k)) for k in set(old_identity) | set(identity) if old_identity.get(k) != identity.get(k)}
            if diff:
                store.close()
                detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
                raise ValueError(f"run_dir: {store.run_dir} holds a run with different settings ({detail}); use a new directory")
        atomic_write_json(meta_path, {"identity": identity, "details": dict(details)})
        merged = {k: list(v) for k, v in store.expected().items()}
        for task, ids in expected.items():
            known = merged.setdefault(task, [])
            known_set = set(known)
            known.extend(i for i in ids if i not in known_set)
        atomic_write_json(store.run_dir / EXPECTED_FILE, merged)
        return store

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> "RunStore":
        store = cls(run_dir)
        if not (store.run_dir / RUN_FILE).is_file():
            raise FileNotFoundError(f"run_dir: {store.run_dir} is not a run directory (no {RUN_FILE})")
        return store

    def _acquire_lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            logger.warning("file locking unavailable on this platform; do not score into one run directory twice at once")
            return
        handle = open(self.run_dir / LOCK_FILE, "a+")
        try:
            # flock is released by the kernel when the process dies, so a killed run never blocks its rerun.
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise RuntimeError(f"run_dir: another process is scoring into {self.run_dir}") from None
        self._lock_handle = handle

    def close(self) -> None:
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- metadata ----------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        return self._read_meta()

    def _read_meta(self) -> dict[str, Any]:
        path = self.run_dir / RUN_FILE
        meta, problem = _read_json(path)
        if problem is None and not isinstance(meta, dict):
            problem = f"expected a JSON object, got {type(meta).__name__}"
        if problem is not None:
            # Not recoverable by rescoring: it holds the settings every score of the run depends on.
            raise ValueError(f"run_dir: {path} is unreadable ({problem}); restore it or score into a new directory")
        return meta

    @property
    def identity(self) -> dict[str, Any]:
        return current_identity(self.meta.get("identity", {}))

    @property
    def writable(self) -> bool:
        """Opened for scoring (holding the run's lock) rather than loaded read-only."""
        return self._lock_handle is not None

    def expected(self) -> dict[str, list[str]]:
        path = self.run_dir / EXPECTED_FILE
        try:
            expected, problem = _read_json(path)
        except FileNotFoundError:
            return {}
        if problem is None and not (
            isinstance(expected, dict) and all(isinstance(v, list) and all(isinstance(i, str) for i in v) for v in expected.values())
        ):
            problem = "expected an object of task -> list of case ids"
        if problem is not None:
            # Rebuilt from the cases asked for when a scoring run opens the directory.
            self._unreadable(path, problem, "the case list is rebuilt from this run's cases" if self.writable
                             else "expected counts cover only cases with records")
            return {}
        return expected

    @property
    def _rescored(self) -> str:
        return "the case is scored again" if self.writable else "the case counts as not scored until a scoring run redoes it"

    def _unreadable(self, path: Path, problem: str, consequence: str) -> None:
        """Warn about an unreadable file; a scoring run also moves it aside so the next write starts clean."""
        where = f"{path}"
        if self.writable:
            where += f" (kept as {keep_aside(path).name})"
        warnings.warn(f"unreadable run file {where}: {problem}; {consequence}", RuntimeWarning, stacklevel=3)

    # -- records -----------------------------------------------------------------------
    def record_path(self, task: str, case_id: str) -> Path:
        return self.run_dir / CASES_DIR / _file_name(task) / f"{_file_name(case_id)}.json"

    def load_record(self, task: str, case_id: str) -> dict[str, Any] | None:
        """The case's record, or ``None`` when it has none or its file is unreadable (see module docs)."""
        return self._read_record(self.record_path(task, case_id))

    def _read_record(self, path: Path) -> dict[str, Any] | None:
        try:
            record, problem = _read_json(path)
        except FileNotFoundError:
            return None
        if problem is None:
            problem = record_problem(record)
        if problem is None and self.record_path(str(record["task"]), str(record["case_id"])) != path:
            problem = f"it holds case {record['task']}/{record['case_id']}, which is not this file's case"
        if problem is not None:
            self._unreadable(path, problem, self._rescored)
            return None
        return record

    def write_record(self, record: Mapping[str, Any]) -> Path:
        for key in ("task", "case_id", "status"):
            if key not in record:
                raise ValueError(f"record: missing {key!r}")
        if record["status"] not in STATUSES:
            raise ValueError(f"record: status must be one of {STATUSES}, got {record['status']!r}")
        return atomic_write_json(self.record_path(record["task"], record["case_id"]), dict(record))

    def records(self) -> list[dict[str, Any]]:
        """Every case record in the run, sorted by task then case id."""
        root = self.run_dir / CASES_DIR
        out = []
        if root.is_dir():
            for path in sorted(root.rglob("*.json")):
                if is_temp_file(path):
                    continue
                record = self._read_record(path)
                if record is not None:
                    out.append(record)
        out.sort(key=lambda r: (str(r["task"]), _natural_key(str(r["case_id"]))))
        return out


def _natural_key(text: str) -> tuple:
    """Sort "2" before "10" and "case_2" before "case_10"."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


@dataclass
class RunSummary:
    total: int = 0
    skipped: int = 0
    scored: int = 0
    ok: int = 0
    missing_output: int = 0
    judge_failure: int = 0
    input_error: int = 0
    generation_error: int = 0

    def add(self, status: str) -> None:
        self.scored += 1
        setattr(self, status, getattr(self, status) + 1)


def is_finished(record: Mapping[str, Any] | None, retry_failed: bool) -> bool:
    """Whether a rerun may skip this case.

    Successful cases are final. Judge failures are final too (they are reported) unless
    ``retry_failed``. Missing outputs, input errors and generation errors are always
    re-checked: they cost no judge call and the user may have fixed them since.
    """
    if record is None:
        return False
    status = record.get("status")
    if status == STATUS_OK:
        return True
    if status == STATUS_JUDGE_FAILURE:
        return not retry_failed
    return False


def run_cases(
    store: RunStore,
    cases: Iterable[C],
    key: Callable[[C], tuple[str, str]],
    evaluate: Callable[[C], dict[str, Any]],
    *,
    concurrency: int = 4,
    retry_failed: bool = False,
    desc: str = "scoring",
    progress: bool = True,
) -> RunSummary:
    """Evaluate every unfinished case with up to ``concurrency`` in flight, writing each result as it lands."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be a positive integer, got {concurrency!r}")
    summary = RunSummary()
    benchmark = store.identity.get("benchmark")
    pending: list[C] = []
    for case in cases:
        summary.total += 1
        task, case_id = key(case)
        if is_finished(store.load_record(task, case_id), retry_failed):
            summary.skipped += 1
        else:
            pending.append(case)
    if summary.skipped:
        logger.info("%d of %d cases already finished; skipping them", summary.skipped, summary.total)

    bar = tqdm(total=len(pending), desc=desc, unit="case", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="dar-eval")
    try:
        # Submit lazily (at most 2x concurrency queued) so an interrupt leaves little queued work.
        queue = iter(pending)
        in_flight = set()
        for case in queue:
            in_flight.add(executor.submit(_evaluate_and_store, store, evaluate, case, key, benchmark))
            if len(in_flight) >= 2 * concurrency:
                break
        while in_flight:
            done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                record = future.result()  # re-raises unexpected errors: a bug must not pass silently
                summary.add(record["status"])
                bar.update(1)
                bar.set_postfix(ok=summary.ok, failed=summary.judge_failure, missing=summary.missing_output, refresh=False)
                nxt = next(queue, None)
                if nxt is not None:
                    in_flight.add(executor.submit(_evaluate_and_store, store, evaluate, nxt, key, benchmark))
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return summary


def _evaluate_and_store(store: RunStore, evaluate: Callable[[C], dict[str, Any]], case: C,
                        key: Callable[[C], tuple[str, str]], benchmark: Any) -> dict[str, Any]:
    try:
        record = evaluate(case)
    except OSError as exc:
        if not name_too_long(exc):
            raise
        # A name the benchmark gave (case id, image path) that this file system cannot hold: the
        # case cannot be judged, which is an input error of that case, not of the run.
        task, case_id = key(case)
        record = {"benchmark": benchmark, "task": task, "case_id": case_id, "status": STATUS_INPUT_ERROR,
                  "score": None, "failures": [{"stage": "inputs", "kind": "name_too_long", "error": too_long_reason(exc)}]}
    store.write_record(record)
    return record
