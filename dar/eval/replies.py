"""Parsing of judge replies.

Judges are language models: they wrap JSON in prose or code fences, drop the wrapper
object, or answer with something unusable. Every parser here either returns a fully
validated value or raises :class:`ReplyParseError`; nothing is ever defaulted to 0, so
the caller decides (retry, record a failure, or -- only in ``compat="released"`` mode --
score 0 like the released scripts).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

CHECKPOINT_ID = re.compile(r"^[A-G]_check_\d+$")

_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)
_PAIR = re.compile(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]")

_TRUE_WORDS = {"1", "pass", "passed", "yes", "true"}
_FALSE_WORDS = {"0", "fail", "failed", "no", "false"}


class ReplyParseError(ValueError):
    """A judge reply could not be turned into the value the protocol needs."""

    def __init__(self, message: str, reply: str | None = None):
        super().__init__(message)
        self.reply = reply


def _json_objects(text: str) -> list[dict[str, Any]]:
    """All JSON objects found in ``text``: the whole text, fenced blocks, then embedded objects."""
    found: list[dict[str, Any]] = []
    stripped = text.strip()
    candidates = [stripped] + [m.group(1).strip() for m in _FENCE.finditer(text)]
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(value, dict):
            found.append(value)
    # Objects embedded in prose: let the JSON decoder find where each object ends
    # (handles nesting and braces inside strings, which a regex cannot).
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            found.append(value)
        start = text.find("{", end)
    return found


def extract_json_object(reply: str) -> dict[str, Any]:
    """Return the first JSON object in ``reply`` (bare, fenced, or inside prose)."""
    if not isinstance(reply, str):
        raise TypeError(f"reply must be a str, got {type(reply).__name__}")
    objects = _json_objects(reply)
    if not objects:
        raise ReplyParseError("no JSON object found in judge reply", reply)
    return objects[0]


def _binary(value: Any, key: str) -> int:
    """Normalise one checkpoint verdict to 0/1; raise on anything ambiguous."""
    if isinstance(value, dict):
        if "pass" not in value:
            raise ReplyParseError(f"checkpoint {key!r} has no 'pass' field: {value!r}")
        value = value["pass"]
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value in (0, 1):
            return int(value)
        raise ReplyParseError(f"checkpoint {key!r} must be 0 or 1, got {value!r}")
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return 1
        if word in _FALSE_WORDS:
            return 0
    raise ReplyParseError(f"checkpoint {key!r} must be 0 or 1, got {value!r}")


def parse_checkpoints(reply: str) -> dict[str, int]:
    """Checkpoint verdicts ``{"A_check_1": 0|1, ...}`` from a MICON-Bench judge reply.

    Accepted shapes (possibly fenced or wrapped in prose):
    ``{"checkpoint_results": {"A_check_1": {"pass": 1}}}``,
    ``{"checkpoint_results": {"A_check_1": 1}}``, the legacy key ``"checkpoints"``, and
    checkpoints at the top level of the object.
    """
    objects = _json_objects(reply) if isinstance(reply, str) else None
    if objects is None:
        raise TypeError(f"reply must be a str, got {type(reply).__name__}")
    if not objects:
        raise ReplyParseError("no JSON object found in judge reply", reply)
    for obj in objects:
        table = obj.get("checkpoint_results")
        if not isinstance(table, dict) or not table:
            table = obj.get("checkpoints")
        if not isinstance(table, dict) or not table:
            table = {k: v for k, v in obj.items() if CHECKPOINT_ID.match(str(k))}
        verdicts = {str(k): v for k, v in table.items() if CHECKPOINT_ID.match(str(k))}
        if not verdicts:
            continue
        try:
            return {key: _binary(value, key) for key, value in verdicts.items()}
        except ReplyParseError as err:
            raise ReplyParseError(str(err), reply) from None
    raise ReplyParseError("judge reply contains no checkpoint verdicts (X_check_N keys)", reply)


def _score_in_range(value: Any, what: str, low: float = 0.0, high: float = 10.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ReplyParseError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ReplyParseError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise ReplyParseError(f"{what} must be within [{low:g}, {high:g}], got {value!r}")
    return number


def parse_score(reply: str, key: str = "score") -> float:
    """A single 0-10 score from a JSON reply such as ``{"score": 7, "reasoning": "..."}``."""
    if not isinstance(reply, str):
        raise TypeError(f"reply must be a str, got {type(reply).__name__}")
    objects = [obj for obj in _json_objects(reply) if key in obj]
    if not objects:
        raise ReplyParseError(f"no JSON object with a {key!r} field in judge reply", reply)
    try:
        return _score_in_range(objects[0][key], key)
    except ReplyParseError as err:
        raise ReplyParseError(str(err), reply) from None


def parse_score_pair(reply: str) -> tuple[float, float]:
    """Two 0-10 scores, e.g. ``{"score": [8, 7]}`` or the VIEScore style ``score = [8, 7]``.

    A JSON object whose ``score``/``scores`` field is a two-number list wins; otherwise the
    first ``[a, b]`` list in the text is used (this is what the published VIEScore-style
    prompts ask for, so official prompt texts supplied by the user parse too).
    """
    if not isinstance(reply, str):
        raise TypeError(f"reply must be a str, got {type(reply).__name__}")
    pair: list[Any] | None = None
    for obj in _json_objects(reply):
        for key in ("score", "scores"):
            value = obj.get(key)
            if isinstance(value, list):
                pair = value
                break
        if pair is not None:
            break
    if pair is None:
        match = _PAIR.search(reply)
        if match:
            pair = [match.group(1), match.group(2)]
    if pair is None:
        raise ReplyParseError("no [score1, score2] pair found in judge reply", reply)
    if len(pair) != 2:
        raise ReplyParseError(f"expected exactly two scores, got {len(pair)}", reply)
    try:
        first = _score_in_range(pair[0], "first score")
        second = _score_in_range(pair[1], "second score")
    except ReplyParseError as err:
        raise ReplyParseError(str(err), reply) from None
    return first, second


def parse_yes_no(reply: str) -> bool:
    """``True``/``False`` from a yes/no answer; ambiguous replies (both or neither) raise."""
    if not isinstance(reply, str):
        raise TypeError(f"reply must be a str, got {type(reply).__name__}")
    text = reply
    for obj in _json_objects(reply):
        answer = obj.get("answer")
        if isinstance(answer, bool):
            return answer
        if isinstance(answer, str):
            text = answer
            break
    lowered = text.lower()
    has_yes = re.search(r"\byes\b", lowered) is not None
    has_no = re.search(r"\bno\b", lowered) is not None
    if has_yes == has_no:
        raise ReplyParseError("judge reply is not a clear yes or no", reply)
    return has_yes
