"""Judge over any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, SGLang, ...).

Why the ``openai`` package instead of a hand-written HTTP client: it already speaks the
wire format every compatible server implements, and its transport retries are exactly
what a long benchmark run needs -- exponential backoff with jitter on timeouts,
connection errors, 408/409/429 and 5xx, honouring ``Retry-After`` -- plus redaction of
the ``Authorization`` header in its own debug logs. It is imported lazily (only when an
:class:`OpenAIJudge` is built) so the scoring functions of :mod:`dar.eval.micon` and
:mod:`dar.eval.mico` work without it installed.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

from ..redact import redact, redact_http_logs, redact_url, url_secrets
from .base import CachingJudge, JudgeError, image_data_url
from .cache import ResponseCache

logger = logging.getLogger(__name__)

# Sent when no key variable is named: local vLLM/SGLang servers accept any bearer token,
# but the openai client refuses to start without one.
PLACEHOLDER_KEY = "EMPTY"
# What an environment variable name looks like. Anything else given as api_key_env is
# probably the key itself, so it is never repeated in a message.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class OpenAIJudge(CachingJudge):
    """Chat-completions judge with timeouts, retries, bounded concurrency and a reply cache.

    Args:
        base_url: server root including ``/v1``, e.g. ``http://127.0.0.1:8000/v1``. Credentials
            in it (user info, ``?api-key=``) are used but never stored or printed: run
            metadata, ``repr`` and error messages show it redacted.
        model: model name as the server knows it (e.g. ``Qwen/Qwen3-VL-32B-Instruct``).
        api_key_env: name of the environment variable holding the API key. The key is read
            once, handed to the HTTP client and never stored in results, caches or logs.
            Error messages about it never repeat the value given (it may be the key itself).
            ``None`` sends a placeholder key (fine for local servers).
        timeout: seconds per HTTP request before it is abandoned (and retried).
        max_retries: transport retries per request (timeouts, connection errors, 429, 5xx).
        concurrency: maximum requests in flight from this judge across all threads.
        cache_dir: directory for the on-disk reply cache; ``None`` disables caching.
        temperature: sampling temperature; 0 for reproducible verdicts.
        max_tokens: cap on reply length.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 4,
        concurrency: int = 4,
        cache_dir: str | os.PathLike[str] | None = None,
        temperature: float = 0.0,
        max_tokens: int = 1024,
    ):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            shown = redact_url(base_url) if isinstance(base_url, str) else type(base_url).__name__
            raise ValueError(f"base_url must be an http(s) URL, got {shown!r}")
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty string, got {model!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be a non-negative integer, got {max_retries!r}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be a positive integer, got {concurrency!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")

        if api_key_env is None:
            secret = PLACEHOLDER_KEY
            logger.info("no api_key_env given; sending a placeholder API key (fine for local servers)")
        else:
            # The value is never echoed: a key passed here by mistake would land in logs.
            if not isinstance(api_key_env, str) or not _ENV_NAME.fullmatch(api_key_env):
                raise ValueError(
                    "api_key_env must be the NAME of an environment variable holding the key (letters, digits, "
                    "underscores), not the key itself; the value given is not repeated here"
                )
            secret = os.environ.get(api_key_env, "")
            if not secret:
                raise ValueError(
                    "api_key_env: the environment variable it names is not set or is empty (the name is not "
                    "repeated here in case it is a key); export the key in a variable and pass that variable's name"
                )

        try:
            import openai
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("OpenAIJudge needs the 'openai' package: pip install 'dar[eval]'") from err

        self.name = model
        self.base_url = redact_url(base_url)  # what is shown and stored; the client gets the real one
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.temperature = float(temperature)
        self.max_tokens = max_tokens
        self.cache = ResponseCache(cache_dir) if cache_dir is not None else None
        self._openai = openai
        self._client = openai.OpenAI(base_url=base_url, api_key=secret, timeout=self.timeout, max_retries=max_retries)
        self._secrets = url_secrets(base_url) + ([secret] if secret != PLACEHOLDER_KEY else [])
        redact_http_logs(self._secrets)
        self._slots = threading.BoundedSemaphore(concurrency)

    def __repr__(self) -> str:
        # Deliberately without the key; base_url is already redacted.
        return f"OpenAIJudge(base_url={self.base_url!r}, model={self.name!r}, api_key_env={self.api_key_env!r})"

    def describe(self) -> dict[str, Any]:
        """Settings safe to write into run metadata (no credentials: the URL is redacted)."""
        return {
            "backend": "openai",
            "base_url": self.base_url,
            "model": self.name,
            "api_key_env": self.api_key_env,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "timeout": self.timeout,
            "max_retries": self.max_retries,
            "concurrency": self.concurrency,
        }

    def _redact(self, text: str) -> str:
        return redact(text, self._secrets)

    def _cache_settings(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens}

    def _ask(self, prompt: str, paths: list[Path], system: str | None) -> str:
        content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
        content += [{"type": "image_url", "image_url": {"url": image_data_url(path)}} for path in paths]
        messages: list[dict[str, Any]] = []
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": content})

        with self._slots:
            try:
                response = self._client.chat.completions.create(
                    model=self.name,
                    messages=messages,
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                )
            except self._openai.APIError as err:
                raise JudgeError(self._redact(f"{type(err).__name__}: {err}")) from None
        try:
            reply = response.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            raise JudgeError("judge response has no choices[0].message") from None
        return reply or ""
