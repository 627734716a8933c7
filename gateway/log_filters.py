"""What keeps aiohttp's own server log (requests it could not parse, bodies it could not read)
free of credentials and of a traceback per bad request. Installed once, by the app factory,
on ``http_server_log()``."""

from __future__ import annotations

import logging
import re

from aiohttp import web

from .errors import redact

_CREDENTIAL_HEADER = re.compile(r"(?i)\b(authorization|x-api-key)(\s*:\s*)[^\n'\"\\]*")


class RedactCredentials(logging.Filter):
    """Takes credential headers and key-like strings out of a record, its exception included,
    before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = _scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info:
            record.exc_text = _scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None  # handlers print exc_text instead
        elif record.exc_text:
            record.exc_text = _scrub(record.exc_text)
        return True


def _scrub(text: str) -> str:
    return redact(_CREDENTIAL_HEADER.sub(r"\1\2[redacted]", text))


class DropUnreadableBodyRepeats(logging.Filter):
    """Drops aiohttp's ``Unhandled exception`` record for a body it could not read (a bad
    ``Content-Encoding``, a body cut short).

    The request has its answer already: a 400 from ``json_body``, which logged one line, or
    one given without reading the body (a 401). aiohttp meets the error again when it drains
    the rest of the body after the answer, logs it with a multi-line traceback, and closes the
    connection (right: its framing is lost). A traceback per bad request would let anyone fill
    the log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, web.RequestPayloadError)


def http_server_log() -> logging.Logger:
    """``gateway.http``, the logger aiohttp's server is given, with both filters on it (once)."""
    logger = logging.getLogger("gateway.http")
    if not any(isinstance(f, RedactCredentials) for f in logger.filters):
        logger.addFilter(DropUnreadableBodyRepeats())  # first: it reads exc_info
        logger.addFilter(RedactCredentials())
    return logger
