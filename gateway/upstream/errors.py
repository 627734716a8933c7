"""What an upstream says, made safe to show a client: it reaches a client only through this
module (``from_upstream`` for an error status, ``stream_error`` for an error inside a stream,
``redact_strings`` for an upstream event or answer relayed whole), because an upstream may echo
anything it was sent, the operator's key included, whole or in part. What is withheld travels
as one ``Secrets`` value (``gateway/upstream/secrets.py``).

The rules: every string is redacted (``redact``, ``gateway/errors.py``) before it is cut to
size, never after, so a key cannot straddle the cut; ``code`` and ``type`` pass only when they
look like identifiers; ``Retry-After`` and ``retry-after-ms`` only as numbers. A 4xx's JSON
message describes the client's request and passes (redacted, bounded); a 5xx's message, and any
body that is not a JSON error, may hold stack traces and internal host names, so the client gets
a generic message and the detail, redacted and bounded, goes to one warning line of the
``gateway.upstream`` log.
"""

from __future__ import annotations

import email.utils
import logging
import math
import re
import time
from collections.abc import Mapping
from datetime import timezone
from typing import Any, TypeGuard

import orjson

from ..errors import UpstreamFailure, UpstreamProtocolError, UpstreamStatus, bounded, redact

log = logging.getLogger("gateway.upstream")

_IDENTIFIER = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_MAX_MESSAGE = 2000  # characters of an upstream message a client gets
_MAX_PARAM = 256
_MAX_DETAIL = 1000  # characters of a withheld upstream answer the log gets
_MAX_DETAIL_SOURCE = 64 * 1024  # bytes of it looked at for them
_MAX_RETRY_SECONDS = 86400
_DELAY_SECONDS = re.compile(r"\d{1,10}(?:\.\d{1,6})?")


def from_upstream(status: int, body: bytes, headers: Mapping[str, str],
                  secrets: tuple[str, ...] = ()) -> UpstreamFailure:
    """Map an upstream answer whose status is not 2xx to the gateway's error shape.

    Client errors (4xx) keep the upstream's JSON message, since it describes the client's
    request. A 5xx, or a body that is not an OpenAI- or xAI-shaped JSON error, gets a generic
    message: what it said is logged, never sent. The upstream rejecting the *operator's*
    credentials (401/403) is the gateway's fault, not the client's, so it becomes 502 and says
    nothing of the key. Any other status (a 3xx redirect, a 1xx or 6xx that should not be) is
    not the gateway's to pass on: 502 ``upstream_bad_status``, and no ``Location`` goes out.
    """
    if status in (401, 403):
        _log_withheld(status, body, secrets)
        return UpstreamStatus(502, "The upstream provider rejected the gateway's credentials",
                              type="upstream_error", code="upstream_auth_failed")
    if not 400 <= status < 600:
        _log_withheld(status, body, secrets)
        return UpstreamStatus(502, f"The upstream answered with an unexpected status "
                                   f"(HTTP {status})",
                              type="upstream_error", code="upstream_bad_status")
    passed = _retry_headers(headers)
    if status >= 500:
        _log_withheld(status, body, secrets)
        return UpstreamStatus(status, f"The upstream failed (HTTP {status})",
                              type="upstream_error", code=f"upstream_http_{status}",
                              headers=passed)
    message, type_, code, param = _error_fields(body, secrets)
    if message is None:
        _log_withheld(status, body, secrets)
        message = f"The upstream refused the request (HTTP {status})"
    default_type, default_code = (("rate_limit_error", "rate_limit_exceeded") if status == 429
                                  else ("invalid_request_error", f"upstream_http_{status}"))
    return UpstreamStatus(status, message, type=type_ or default_type, code=code or default_code,
                          param=param, headers=passed)


def stream_error(obj: Any, secrets: tuple[str, ...] = ()) -> UpstreamFailure:
    """The gateway's error for an error found inside an upstream stream.

    ``obj`` is what the upstream sent: the value of an event's ``error`` member (an object, a
    bare string from some providers, or anything at all), or a whole Responses API error event
    (``{"type": "error", "code", "message", "param", "error": {...}}``, which has the fields
    flat and, from the OpenAI service, nested as well). Its message is redacted and bounded, its
    code kept only when it is an identifier; anything else it held stays behind.
    """
    message: Any = None
    code: Any = None
    if isinstance(obj, dict):
        message, code = obj.get("message"), obj.get("code")
        nested = obj.get("error")
        if isinstance(nested, dict):
            if not _text(message):
                message = nested.get("message")
            if _identifier(code, secrets) is None:
                code = nested.get("code")
        elif isinstance(nested, str) and not _text(message):
            message = nested
    elif isinstance(obj, str):
        message = obj
    text = _clean(message, secrets, _MAX_MESSAGE) if _text(message) else None
    failure = UpstreamFailure(f"Upstream error: {text or 'The upstream reported an error'}")
    identifier = _identifier(code, secrets)
    if identifier is not None:
        failure.code = identifier
    return failure


def redact_strings(value: Any, secrets: tuple[str, ...] = ()) -> Any:
    """A copy of a parsed JSON value with every string in it, object keys too, redacted: for
    an upstream event that is relayed whole (a Responses ``response.failed``).

    Walked with a stack, not recursion: orjson parses nesting deeper than Python's recursion
    limit allows."""
    if isinstance(value, str):
        return redact(value, secrets)
    if not isinstance(value, (dict, list)):
        return value
    root: dict[str, Any] | list[Any] = {} if isinstance(value, dict) else []
    stack: list[tuple[Any, Any]] = [(value, root)]
    while stack:
        source, copy = stack.pop()
        items = source.items() if isinstance(source, dict) else enumerate(source)
        for key, item in items:
            if isinstance(item, dict):
                new: Any = {}
                stack.append((item, new))
            elif isinstance(item, list):
                new = []
                stack.append((item, new))
            elif isinstance(item, str):
                new = redact(item, secrets)
            else:
                new = item
            if isinstance(copy, dict):
                copy[redact(key, secrets) if isinstance(key, str) else key] = new
            else:
                copy.append(new)
    return root


def _error_fields(body: bytes, secrets: tuple[str, ...]
                  ) -> tuple[str | None, str | None, str | None, str | None]:
    """Message, type, code and param of an OpenAI-shaped (``{"error": {...}}``) or xAI-shaped
    (``{"error": "<message>", "code": "..."}``) JSON body, each made safe to send; a message
    of None when the body is neither."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None, None, None
    if not isinstance(data, dict):
        return None, None, None, None
    err = data.get("error")
    if isinstance(err, dict):
        message, type_, code, param = (err.get("message"), err.get("type"), err.get("code"),
                                       err.get("param"))
    elif isinstance(err, str):
        message, type_, code, param = err, None, data.get("code"), None
    else:
        return None, None, None, None
    return (_clean(message, secrets, _MAX_MESSAGE) if _text(message) else None,
            _identifier(type_, secrets), _identifier(code, secrets),
            _clean(param, secrets, _MAX_PARAM) if _text(param) else None)


def _text(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and bool(value.strip())


def _clean(text: str, secrets: tuple[str, ...], limit: int) -> str:
    """Redacted, then bounded: in that order, or a key straddling the cut would survive it."""
    return bounded(redact(text, secrets), limit)


def _identifier(value: Any, secrets: tuple[str, ...]) -> str | None:
    """``value`` as a code or type, if it is one: letters, digits, ``_.-``, at most 64. Checked
    after redaction, so a code that is (or holds) the key is dropped, not passed."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = redact(str(value), secrets)
    return text if _IDENTIFIER.fullmatch(text) else None


def _retry_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """``Retry-After`` (delay-seconds, or an HTTP-date turned into seconds; RFC 9110 10.2.3)
    and ``retry-after-ms`` (OpenAI's), rewritten as the numbers they hold; anything else the
    upstream put there is dropped."""
    seen: dict[str, str] = {}
    for name, value in headers.items():
        seen.setdefault(name.lower(), value)
    passed: dict[str, str] = {}
    if "retry-after" in seen:
        seconds = _delay_seconds(seen["retry-after"])
        if seconds is not None:
            passed["Retry-After"] = str(seconds)
    millis = seen.get("retry-after-ms", "").strip()
    if _DELAY_SECONDS.fullmatch(millis):
        passed["retry-after-ms"] = str(min(math.ceil(float(millis)),
                                           _MAX_RETRY_SECONDS * 1000))
    return passed


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """How long a 429 asks the gateway to wait (``Retry-After``, else ``retry-after-ms``), or
    None when it does not say (in a form this module reads)."""
    passed = _retry_headers(headers)
    if "Retry-After" in passed:
        return float(passed["Retry-After"])
    if "retry-after-ms" in passed:
        return int(passed["retry-after-ms"]) / 1000
    return None


def _delay_seconds(value: str) -> int | None:
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):
        return min(math.ceil(float(value)), _MAX_RETRY_SECONDS)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": UTC with no claim about local time (RFC 5322)
        when = when.replace(tzinfo=timezone.utc)
    return min(max(0, math.ceil(when.timestamp() - time.time())), _MAX_RETRY_SECONDS)


def not_json(status: int, content_type: str | None, body: bytes, secrets: tuple[str, ...]
             ) -> UpstreamProtocolError:
    """A plain answer of success that is not JSON (an HTML page from a proxy or a portal in
    front of the upstream): the client gets a 502 in the error shape and nothing of it; one
    warning line says what it was, redacted and bounded."""
    _log_withheld(status, body, secrets, f" with {content_type or 'no content type'} that is "
                                         f"not JSON ({len(body)} bytes)")
    return UpstreamProtocolError("The upstream answered with something that is not JSON")


def _log_withheld(status: int, body: bytes, secrets: tuple[str, ...], what: str = "") -> None:
    """One warning line with what the upstream said and the client was not told: redacted,
    bounded, and quoted, so that a body with line breaks is still one line."""
    text = None
    if len(body) <= _MAX_DETAIL_SOURCE:
        try:  # re-encoded from the parsed value: an escaped key (\u0078ai-...) is redacted too
            text = orjson.dumps(redact_strings(orjson.loads(body), secrets)).decode()
        except (orjson.JSONDecodeError, orjson.JSONEncodeError):  # not JSON, or too deep to write
            pass
    if text is None:
        head = body[:_MAX_DETAIL_SOURCE].decode("utf-8", "replace")
        text = _redact_cut_tail(redact(head, secrets), secrets)
    log.warning("upstream answered HTTP %d%s; withheld from the client: %r", status, what,
                bounded(text, _MAX_DETAIL))


def _redact_cut_tail(text: str, secrets: tuple[str, ...]) -> str:
    """A body looked at only up to a limit (here, or by a reader) may end in the first part of
    a key (four characters or more), shorter than the parts ``redact`` finds: such an ending is
    redacted too."""
    for secret in secrets:
        for n in range(min(len(secret) - 1, len(text)), 3, -1):
            if text.endswith(secret[:n]):
                return text[:-n] + "[redacted]"
    return text
