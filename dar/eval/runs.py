"""Crash-safe, resumable run directories shared by both benchmarks.

Layout::

    <run>/run.json                    settings that define the run (never credentials)
    <run>/expected.json               case ids the run was asked to score, per task/group
    <run>/cases/<task>/<case_id>.json one result per case, written atomically when known

Because each case is its own file, replaced atomically, a process killed at any moment
leaves every case either complete or absent: a rerun skips the complete ones, redoes the
absent ones, and can never produce two results for one case.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import urllib.parse
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
STATUSES = (STATUS_OK, STATUS_MISSING, STATUS_JUDGE_FAILURE, STATUS_INPUT_ERROR)

RUN_FILE = "run.json"
EXPECTED_FILE = "expected.json"
CASES_DIR = "cases"
LOCK_FILE = ".lock"

# Identity values renamed since a run directory may have been written: (setting, old value)
# -> new value. Old runs keep their meaning, so resuming, reporting and comparing them go on working.
RENAMED_IDENTITY_VALUES = {("formula", "released"): "legacy"}


def current_identity(identity: Mapping[str, Any]) -> dict[str, Any]:
    """``identity`` with renamed values (:data:`RENAMED_IDENTITY_VALUES`) under their current names."""
    return {k: RENAMED_IDENTITY_VALUES.get((k, v), v) if isinstance(v, str) else v for k, v in identity.items()}


def find_output(root: Path, model: str, task: str, case_id: str, extensions: Sequence[str]) -> Path | None:
    """``<root>/<model>/<task>/<case_id>.<ext>``, trying ``extensions`` in order."""
    folder = root / model / task
    found = [folder / f"{case_id}{ext}" for ext in extensions if (folder / f"{case_id}{ext}").is_file()]
    if len(found) > 1:
        logger.warning("several outputs for %s/%s: %s; using %s", task, case_id, [p.name for p in found], found[0].name)
    return found[0] if found else None


def _file_name(case_id: str) -> str:
    # Case ids come from benchmark files; quote anything that is not a plain file name.
    name = urllib.parse.quote(case_id, safe="-_")
    return name if not name.startswith(".") else "%2E" + name[1:]


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
            old = json.loads(meta_path.read_text(encoding="utf-8"))
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
        return json.loads((self.run_dir / RUN_FILE).read_text(encoding="utf-8"))

    @property
    def identity(self) -> dict[str, Any]:
        return current_identity(self.meta.get("identity", {}))

    def expected(self) -> dict[str, list[str]]:
        path = self.run_dir / EXPECTED_FILE
        if not path.is_file():
            return {}
        return json.loads(path.read_text(encoding="utf-8"))

    # -- records -----------------------------------------------------------------------
    def record_path(self, task: str, case_id: str) -> Path:
        return self.run_dir / CASES_DIR / _file_name(task) / f"{_file_name(case_id)}.json"

    def load_record(self, task: str, case_id: str) -> dict[str, Any] | None:
        path = self.record_path(task, case_id)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

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
                out.append(json.loads(path.read_text(encoding="utf-8")))
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

    def add(self, status: str) -> None:
        self.scored += 1
        setattr(self, status, getattr(self, status) + 1)


def is_finished(record: Mapping[str, Any] | None, retry_failed: bool) -> bool:
    """Whether a rerun may skip this case.

    Successful cases are final. Judge failures are final too (they are reported) unless
    ``retry_failed``. Missing outputs and input errors are always re-checked: they cost
    no judge call and the user may have fixed them since.
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
            in_flight.add(executor.submit(_evaluate_and_store, store, evaluate, case))
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
                    in_flight.add(executor.submit(_evaluate_and_store, store, evaluate, nxt))
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return summary


def _evaluate_and_store(store: RunStore, evaluate: Callable[[C], dict[str, Any]], case: C) -> dict[str, Any]:
    record = evaluate(case)
    store.write_record(record)
    return record
