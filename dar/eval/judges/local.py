"""Judge running a local image-text-to-text model through ``transformers``.

Any checkpoint that ``transformers.pipeline("image-text-to-text")`` can load works
(Qwen2.5-VL, Qwen3-VL, LLaVA-style models, ...). ``transformers`` and ``torch`` are
imported only when the model is first used.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from .base import CachingJudge, JudgeError
from .cache import ResponseCache


class TransformersJudge(CachingJudge):
    """Greedy-decoding local judge behind the same interface as :class:`OpenAIJudge`.

    Args:
        model: local path (or hub id) of an image-text-to-text checkpoint.
        device: passed to the pipeline (``"cuda"``, ``"cpu"``, ``None`` for auto).
        dtype: torch dtype name for the weights (``"bfloat16"``, ``"float16"``, ``"auto"``).
        max_new_tokens: cap on reply length.
        cache_dir: on-disk reply cache, as for :class:`OpenAIJudge`.
        local_files_only: require ``model`` to be a local directory, so nothing is ever
            downloaded; on by default because judge weights are large and a silent
            download is rarely what a user wants. Set ``False`` to allow hub ids.
        pipeline: an already-built pipeline-like callable (``pipe(text=messages, ...)``);
            when given, ``model`` is only used as the judge's name.
    """

    def __init__(
        self,
        model: str,
        *,
        device: str | None = None,
        dtype: str = "auto",
        max_new_tokens: int = 1024,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool = True,
        pipeline: Any = None,
    ):
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty string, got {model!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if pipeline is not None and not callable(pipeline):
            raise TypeError("pipeline must be callable like a transformers pipeline")
        self.name = model
        self.device = device
        self.dtype = dtype
        self.max_new_tokens = max_new_tokens
        self.local_files_only = local_files_only
        self.cache = ResponseCache(cache_dir) if cache_dir is not None else None
        if pipeline is None and local_files_only and not Path(model).is_dir():
            raise FileNotFoundError(
                f"model: {model!r} is not a local directory (pass local_files_only=False to allow hub downloads)"
            )
        self._pipeline = pipeline
        # One generate() at a time: a single model instance is not safe to share across threads.
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"backend": "transformers", "model": self.name, "max_new_tokens": self.max_new_tokens, "temperature": 0.0}

    def _load(self) -> Any:
        if self._pipeline is None:
            try:
                from transformers import pipeline
            except ImportError as err:  # pragma: no cover - depends on the environment
                raise ImportError("TransformersJudge needs 'transformers' and 'torch' installed") from err
            self._pipeline = pipeline(
                "image-text-to-text",
                model=self.name,
                device=self.device,
                dtype=self.dtype,
            )
        return self._pipeline

    def _cache_settings(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "decoding": "greedy"}

    def _ask(self, prompt: str, paths: list[Path], system: str | None) -> str:
        from PIL import Image

        pictures = []
        for path in paths:
            with Image.open(path) as img:
                pictures.append(img.convert("RGB"))
        # Same order as the HTTP judge: the instruction text first, then the images.
        content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
        content += [{"type": "image", "image": picture} for picture in pictures]
        messages: list[dict[str, Any]] = []
        if system:
            messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        messages.append({"role": "user", "content": content})

        with self._lock:
            pipe = self._load()
            try:
                outputs = pipe(
                    text=messages,
                    return_full_text=False,
                    generate_kwargs={"max_new_tokens": self.max_new_tokens, "do_sample": False},
                )
            except (RuntimeError, ValueError) as err:
                raise JudgeError(f"local judge failed: {type(err).__name__}: {err}") from err
        return _generated_text(outputs)


def _generated_text(outputs: Any) -> str:
    """The assistant text from a pipeline result (a list of dicts, possibly nested once)."""
    item = outputs
    while isinstance(item, list):
        if not item:
            raise JudgeError("local judge returned no output")
        item = item[0]
    if not isinstance(item, dict) or "generated_text" not in item:
        raise JudgeError(f"unexpected local judge output: {type(item).__name__}")
    text = item["generated_text"]
    if isinstance(text, list):
        # Chat-format output: the last message is the assistant's.
        text = text[-1].get("content", "") if text and isinstance(text[-1], dict) else ""
    if not isinstance(text, str):
        raise JudgeError("local judge output text is not a string")
    return text
