"""On-disk cache of judge replies.

A judge at temperature 0 asked the same question about the same images should give the
same answer, so rescoring a run (a new report, a second formula, a crash) must not pay
for the calls again. Keys are SHA-256 digests of the model name, the generation
settings, the system and user prompts and the SHA-256 of every image's bytes -- never
of credentials, which are not part of the question.

An entry that cannot be read (truncated, garbage, no ``reply`` string) is a cache miss:
the judge is asked again and the fresh reply replaces the entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from ..atomic import atomic_write_json, remove_orphaned_temp_files
from .base import image_sha256

logger = logging.getLogger(__name__)


class ResponseCache:
    """One JSON file per reply under ``directory/<k[:2]>/<k>.json``, written atomically."""

    def __init__(self, directory: str | os.PathLike[str]):
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path, got {type(directory).__name__}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # A run killed mid-write leaves a temp file; the cache may be shared, so only orphans go.
        remove_orphaned_temp_files(self.directory)

    @staticmethod
    def key(
        model: str,
        prompt: str,
        images: Sequence[str | os.PathLike[str]],
        *,
        system: str | None = None,
        settings: dict[str, Any] | None = None,
    ) -> str:
        material = {
            "model": model,
            "system": system,
            "prompt": prompt,
            "images": [image_sha256(path) for path in images],
            "settings": settings or {},
        }
        blob = json.dumps(material, sort_keys=True, ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        """The cached reply, or ``None`` on a miss (no entry, or one that cannot be read)."""
        path = self._path(key)
        try:
            with open(path, encoding="utf-8") as handle:
                entry = json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:  # ValueError covers JSONDecodeError and UnicodeDecodeError
            logger.warning("unreadable judge cache entry %s (%s); asking the judge again", path, err)
            return None
        reply = entry.get("reply") if isinstance(entry, dict) else None
        if not isinstance(reply, str):
            logger.warning("judge cache entry %s has no 'reply' string; asking the judge again", path)
            return None
        return reply

    def put(self, key: str, reply: str, *, model: str) -> None:
        atomic_write_json(self._path(key), {"model": model, "reply": reply})
