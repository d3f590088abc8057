"""Checks on what a benchmark names -- case ids and image paths -- before anything is read or sent to a judge.

Manifests (MICo-Bench JSONL) and task cards (MICON-Bench YAML) come from third parties.
They name images by path, and each case by an id that becomes a file name (the generated
image, the case record). A ``../`` or an absolute path there would make the judge read,
and upload, files from anywhere. So:

- a case id must be a plain file name: not empty, no ``/`` or ``\\``, not ``.`` or
  ``..``, no NUL character, at most :data:`MAX_CASE_ID_BYTES` bytes as UTF-8 (a name or path
  the file system still refuses as too long is recorded as ``input_error`` by the run loop);
- an image path must end in an image extension (:data:`IMAGE_EXTENSIONS`) and resolve
  inside the benchmark's root folder, symlinks followed (so a link pointing out of the
  folder is refused like a ``../``);
- before an image is sent, its first bytes must be those of a PNG, JPEG or WebP file.

A case that breaks a rule does not stop the run: its loader lists the reasons on the case
(``input_errors``) and the runner records it as ``input_error``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .judges.base import IMAGE_MIME

IMAGE_EXTENSIONS = tuple(IMAGE_MIME)
# NAME_MAX of common file systems (255 bytes) less the longest image extension.
MAX_CASE_ID_BYTES = 255 - max(len(ext) for ext in IMAGE_EXTENSIONS)


def case_id_problem(case_id: str) -> str | None:
    """Why ``case_id`` cannot be used as a file name, or ``None``."""
    if not case_id or case_id.strip() == "":
        return "case id is empty"
    if "\x00" in case_id:
        return f"case id {case_id!r} contains a NUL character"
    if "/" in case_id or "\\" in case_id or case_id in (".", ".."):
        return f"case id {case_id!r} is not a plain file name (no '/', '\\\\', '.' or '..')"
    size = len(case_id.encode("utf-8", "surrogatepass"))
    if size > MAX_CASE_ID_BYTES:
        return (f"case id {case_id[:40]!r}... is {size} bytes as UTF-8, too long for a file name "
                f"(at most {MAX_CASE_ID_BYTES}, so that '<case_id>.jpeg' fits the usual 255-byte limit)")
    return None


def image_path_problem(root: str | os.PathLike[str], path: str | os.PathLike[str], what: str) -> str | None:
    """Why the image file ``path`` (as it would be opened) may not be read as part of ``root``, or ``None``.

    ``what`` names the path in the message, e.g. ``"input 0"`` or ``"reference 'RA'"``.
    """
    text = os.fspath(path)
    if "\x00" in text:
        return f"{what} path {text!r} contains a NUL character"
    if Path(text).suffix.lower() not in IMAGE_EXTENSIONS:
        return f"{what} {text!r} is not an image path (the name must end in one of {', '.join(IMAGE_EXTENSIONS)})"
    base = Path(root).resolve()
    target = Path(text).resolve()  # follows symlinks
    if not target.is_relative_to(base):
        return f"{what} {text!r} resolves to {target}, outside the benchmark folder {base}"
    return None


def image_content_problem(path: str | os.PathLike[str]) -> str | None:
    """``None`` when the file starts like a PNG, JPEG or WebP image, else why it is refused."""
    with open(path, "rb") as handle:
        head = handle.read(12)
    if head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    return f"{path} is not a PNG, JPEG or WebP image (judged by its first bytes), so it is not sent to the judge"
