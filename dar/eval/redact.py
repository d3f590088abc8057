"""Keeping credentials out of everything the evaluation writes or prints.

A judge's key reaches us in two ways: by the name of an environment variable (the
supported way) and, by mistake or habit, inside the server URL
(``https://user:sk-...@host/v1`` or ``...?api-key=sk-...``). The URL is stored in run
metadata and may appear in error messages, so every stored copy goes through
:func:`redact_url` and every error text through :func:`redact`. The HTTP stack logs each
request's full URL (``HTTP Request: POST http://user:key@host/...`` at INFO), so
:func:`redact_http_logs` adds a filter to those loggers as well.
"""

from __future__ import annotations

import logging
import re
import threading
import urllib.parse
from typing import Iterable

MASK = "***"

# Query parameters that carry credentials in the APIs a judge is usually served from
# (Azure's ``api-key``, Google's ``key``, signed URLs' ``sig`` ...).
_CREDENTIAL_NAME = r"[^=&#\s]*(?:key|token|secret|passw|pwd|auth|sig|credential)[^=&#\s]*"
_CREDENTIAL_PARAM = re.compile(_CREDENTIAL_NAME, re.IGNORECASE)
# In free text: the user info of any URL, and the value of any credential-like query parameter.
_USERINFO_IN_TEXT = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@?#]+@")
_PARAM_IN_TEXT = re.compile(r"([?&]" + _CREDENTIAL_NAME + r"=)[^&#\s'\"]+", re.IGNORECASE)
# Shorter literal pieces are masked only where they sit in a URL: replacing, say, a
# two-letter user name everywhere would garble the message without protecting anything.
_MIN_LITERAL = 6


def _split(url: str) -> urllib.parse.SplitResult | None:
    try:
        return urllib.parse.urlsplit(url)
    except ValueError:  # e.g. an invalid IPv6 host
        return None


def url_secrets(url: str) -> list[str]:
    """The parts of ``url`` that may be credentials (user name, password, credential-like
    query values), as written and percent-decoded."""
    parts = _split(url)
    if parts is None:
        return []
    found: set[str] = set()
    if "@" in parts.netloc:
        for piece in parts.netloc.rpartition("@")[0].split(":", 1):
            found.update({piece, urllib.parse.unquote(piece)})
    for name, value in urllib.parse.parse_qsl(parts.query):
        if _CREDENTIAL_PARAM.fullmatch(name):
            found.update({value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value)})
    return sorted((s for s in found if s), key=len, reverse=True)


def redact_url(url: str) -> str:
    """``url`` with its user info and credential-like query values replaced by ``***``.

    ``http://u:sk-1@host:8000/v1?api-key=sk-2&x=1`` -> ``http://***@host:8000/v1?api-key=***&x=1``.
    """
    return redact(url)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with URL user info, credential-like query values and each of ``secrets`` masked.

    ``secrets`` shorter than 6 characters are masked only inside URLs (see above).
    """
    text = _USERINFO_IN_TEXT.sub(lambda m: m.group(1) + MASK + "@", text)
    text = _PARAM_IN_TEXT.sub(lambda m: m.group(1) + MASK, text)
    for secret in sorted({s for s in secrets if len(s) >= _MIN_LITERAL}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


# Loggers of the HTTP stack under the openai client that write request URLs (httpx2 is the
# fork newer openai releases use). A logger's filters see only its own records, hence each name.
HTTP_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "openai._base_client")


class _RedactingFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        with self.lock:
            secrets = tuple(self.secrets)
        clean = redact(message, secrets)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


_FILTER = _RedactingFilter()


def redact_http_logs(secrets: Iterable[str] = ()) -> None:
    """Mask URL credentials (and ``secrets``) in what the HTTP stack's loggers write, from now on."""
    with _FILTER.lock:
        _FILTER.secrets.update(s for s in secrets if s)
    for name in HTTP_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
