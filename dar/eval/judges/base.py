"""The judge interface shared by the HTTP and local judges, and the parse-and-retry loop."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, TypeVar, runtime_checkable

from ..replies import ReplyParseError

if TYPE_CHECKING:  # cache.py imports this module
    from .cache import ResponseCache

logger = logging.getLogger(__name__)

T = TypeVar("T")

IMAGE_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


class JudgeError(RuntimeError):
    """The judge could not be reached or kept failing after its retries (transport level)."""


@runtime_checkable
class Judge(Protocol):
    """Anything that answers a prompt about a list of images with text.

    ``name`` identifies the judge model (it is recorded in run metadata and used in cache
    keys). ``complete`` raises :class:`JudgeError` when no reply could be obtained;
    ``refresh=True`` asks a caching judge to bypass its cache for this call (used when a
    cached reply turned out to be unparseable).
    """

    name: str

    def complete(
        self,
        prompt: str,
        images: Sequence[str | os.PathLike[str]] = (),
        *,
        system: str | None = None,
        refresh: bool = False,
    ) -> str: ...


def image_mime(path: str | os.PathLike[str]) -> str:
    suffix = Path(path).suffix.lower()
    try:
        return IMAGE_MIME[suffix]
    except KeyError:
        raise ValueError(f"unsupported image type {suffix!r} for {path}; expected one of {sorted(IMAGE_MIME)}") from None


def image_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def image_data_url(path: str | os.PathLike[str]) -> str:
    """The image file as a ``data:`` URL (sent as-is: no re-encoding, so the hash is of what is sent)."""
    mime = image_mime(path)
    payload = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"data:{mime};base64,{payload}"


class CachingJudge:
    """:meth:`Judge.complete` for the concrete judges: argument checks, the reply cache, then :meth:`_ask`.

    A subclass sets ``name`` and ``cache`` (a :class:`~dar.eval.judges.cache.ResponseCache`
    or ``None``) and implements :meth:`_cache_settings` and :meth:`_ask`.
    """

    name: str
    cache: ResponseCache | None

    def _cache_settings(self) -> dict[str, Any]:
        """Generation settings that change the reply; part of the cache key."""
        raise NotImplementedError

    def _ask(self, prompt: str, paths: list[Path], system: str | None) -> str:
        """Ask the model (no cache); raise :class:`JudgeError` when no reply can be had."""
        raise NotImplementedError

    def complete(self, prompt: str, images: Sequence[str | os.PathLike[str]] = (), *, system: str | None = None, refresh: bool = False) -> str:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be a non-empty string")
        paths = [Path(p) for p in images]
        for path in paths:
            image_mime(path)  # validates the type before any model or network work
            if not path.is_file():
                raise FileNotFoundError(f"judge image not found: {path}")

        key = None
        if self.cache is not None:
            key = self.cache.key(self.name, prompt, paths, system=system, settings=self._cache_settings())
            if not refresh:
                cached = self.cache.get(key)
                if cached is not None:
                    return cached
        reply = self._ask(prompt, paths, system)
        # Empty replies are not cached: asking again may help.
        if self.cache is not None and key is not None and reply.strip():
            self.cache.put(key, reply, model=self.name)
        return reply


@dataclass
class ParsedReply:
    """Outcome of :func:`ask_parsed`: the value, or the error after all attempts, plus raw replies."""

    value: object | None
    error: str | None
    kind: str | None  # None on success, "parse" or "transport" on failure
    replies: list[str] = field(default_factory=list)
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


def ask_parsed(
    judge: Judge,
    prompt: str,
    images: Sequence[str | os.PathLike[str]],
    parse: Callable[[str], T],
    *,
    system: str | None = None,
    parse_retries: int = 2,
) -> ParsedReply:
    """Ask ``judge`` and parse the reply, asking again (bypassing caches) when it does not parse.

    Transport retries (timeouts, 429, 5xx) happen inside the judge; this loop only
    handles replies that arrived but are unusable. It never raises for judge problems:
    the failure is returned so the caller can record it.
    """
    if parse_retries < 0:
        raise ValueError(f"parse_retries must be >= 0, got {parse_retries}")
    result = ParsedReply(value=None, error=None, kind=None)
    for attempt in range(parse_retries + 1):
        result.attempts = attempt + 1
        try:
            reply = judge.complete(prompt, images, system=system, refresh=attempt > 0)
        except JudgeError as err:
            result.error, result.kind = str(err), "transport"
            return result
        result.replies.append(reply)
        try:
            result.value = parse(reply)
        except ReplyParseError as err:
            result.error, result.kind = str(err), "parse"
            logger.warning("unparseable judge reply (attempt %d of %d): %s", attempt + 1, parse_retries + 1, err)
            continue
        result.error, result.kind = None, None
        return result
    return result
