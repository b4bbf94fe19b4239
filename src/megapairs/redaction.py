"""Secrets (API keys, passwords in URLs) kept out of every file, message and log line.

A backend registers each secret it sends (`register_secret`); `redact` replaces every
registered secret in a text with `<redacted>`, and `RedactingFilter` does so for each log
record of the handler it is attached to (the CLI attaches it to the `megapairs` logger's
handler). The registry is per process: a Ray worker registers the secrets it reads itself.
"""

from __future__ import annotations

import logging
import threading
from urllib.parse import urlsplit, urlunsplit

REDACTED = "<redacted>"
MIN_SECRET_CHARS = 4  # shorter values would redact ordinary words

_SECRETS: set[str] = set()
_LOCK = threading.Lock()


def register_secret(value: str | None) -> None:
    """Remember `value` (an API key, a password) so `redact` hides it from now on."""
    if value and len(value) >= MIN_SECRET_CHARS:
        with _LOCK:
            _SECRETS.add(value)


def registered_secrets() -> frozenset[str]:
    with _LOCK:
        return frozenset(_SECRETS)


def redact(text: str, *extra: str) -> str:
    """`text` with every registered secret (and each of `extra`) replaced by `<redacted>`,
    longest first, so a secret that contains another is hidden whole."""
    secrets = registered_secrets() | {s for s in extra if s and len(s) >= MIN_SECRET_CHARS}
    for secret in sorted(secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def strip_credentials(url: str) -> str:
    """`url` without its user info (`http://user:key@host/v1` -> `http://host/v1`); the
    password, if any, is registered as a secret. A string that is no URL is returned as is."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password:
        register_secret(parts.password)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host))


class RedactingFilter(logging.Filter):
    """Rewrites each record's message with the registered secrets redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        if registered_secrets():
            message = redact(record.getMessage())
            record.msg, record.args = message, None
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True


class _Formatter(logging.Formatter):
    """`megapairs: message`, with `warning: ` or `error: ` before the message when it is one."""

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"megapairs: {level}{super().format(record)}"


def configure_logging(level: int = logging.INFO) -> None:
    """Print the `megapairs` loggers' records at `level` and above on stderr, secrets
    redacted (once per process; records still reach the root logger's handlers)."""
    logger = logging.getLogger("megapairs")
    logger.setLevel(level)
    if not any(isinstance(h, _RedactingHandler) for h in logger.handlers):
        handler = _RedactingHandler()
        handler.setFormatter(_Formatter("%(message)s"))
        handler.addFilter(RedactingFilter())
        logger.addHandler(handler)


class _RedactingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr, looked up at each record (so a test's captured stderr gets it)."""

    def emit(self, record: logging.LogRecord) -> None:
        import sys

        self.stream = sys.stderr
        super().emit(record)
