"""Every error the gateway reports, and the two shapes it reports them in.

The tree (status, OpenAI ``type``, ``code``)::

    GatewayError                  500 server_error           internal_error
    ├── InvalidRequest            400 invalid_request_error  invalid_request
    │   └── StreamNotSupported    400 invalid_request_error  stream_not_supported
    ├── AuthenticationFailed      401 authentication_error   invalid_api_key
    ├── PermissionDenied          403 permission_error       model_not_allowed
    ├── NotFound                  404 invalid_request_error  not_found
    ├── MethodNotAllowed          405 invalid_request_error  method_not_allowed
    ├── PayloadTooLarge           413 invalid_request_error  request_too_large
    ├── UnsupportedMediaType      415 invalid_request_error  unsupported_media_type
    ├── RateLimited               429 rate_limit_error       rate_limit_exceeded
    ├── ServiceUnavailable        503 server_error           service_unavailable
    │   └── ShuttingDown          503 server_error           gateway_restarting
    └── UpstreamFailure           502 upstream_error         upstream_error
        ├── UpstreamStatus        (the upstream's 4xx/5xx: its status, see below)
        │                         502 upstream_error         upstream_auth_failed (its 401/403)
        │                         502 upstream_error         upstream_bad_status (3xx, ...)
        ├── UpstreamUnreachable   502 upstream_error         upstream_unreachable
        ├── UpstreamTimeout       504 upstream_error         upstream_timeout
        └── UpstreamProtocolError 502 upstream_error         upstream_bad_stream
            └── UpstreamAnswerTooLarge 502 upstream_error    upstream_answer_too_large

Before response headers are sent an error is a response with its true status: a JSON body
``{"error": {"message", "type", "param", "code"}}`` or, for a client reading an event stream, the
same object as one SSE frame. After headers are sent the status can no longer change; the relay
then writes the frame and ends the stream. ``"error"`` is always an object: a bare string makes
the OpenAI SDK drop the message.

What the upstream says reaches a client only through this module (``from_upstream`` for an
error status, ``stream_error`` for an error inside a stream, ``redact_strings`` for an upstream
event relayed whole), because an upstream may echo anything it was sent, the operator's key
included. The rules: every string is redacted (``redact``) before it is cut to size, never after,
so a key cannot straddle the cut; ``code`` and ``type`` pass only when they look like identifiers;
``Retry-After`` and ``retry-after-ms`` only as numbers. A 4xx's JSON message describes the
client's request and passes (redacted, bounded); a 5xx's message, and any body that is not a
JSON error, may hold stack traces and internal host names, so the client gets a generic message
and the detail, redacted and bounded, goes to one warning line of the ``gateway.upstream`` log.
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

log = logging.getLogger("gateway.upstream")

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"
    outcome = "error"
    """How the request ended, for the access log and metrics."""
    kind: str | None = None
    """For upstream failures: a short label for logs and metrics."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def json_bytes(self) -> bytes:
        return orjson.dumps(self.body())

    def sse_frame(self) -> bytes:
        return b"data: " + orjson.dumps(self.body()) + b"\n\n"

    def response_error_frame(self, sequence_number: int | None = None) -> bytes:
        """The Responses API's own stream error event, which its SDK raises as ``APIError``.

        The documented event (the SDK's ``ResponseErrorEvent``) has ``code``, ``message`` and
        ``param`` at the top level; the OpenAI service nests them under ``"error"`` too, and that
        key is what the Python and Node SDKs raise on. The frame carries both shapes.
        """
        event: dict[str, Any] = {"type": "error", "code": self.code, "message": self.message,
                                 "param": self.param, "error": self.body()["error"]}
        if sequence_number is not None:
            event["sequence_number"] = sequence_number
        return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class StreamNotSupported(InvalidRequest):
    code = "stream_not_supported"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class RateLimited(GatewayError):
    outcome = "refused"
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class ShuttingDown(ServiceUnavailable):
    outcome = "shutdown"
    code = "gateway_restarting"


class UpstreamFailure(GatewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"
    outcome = "upstream_error"
    kind = "error"


class UpstreamStatus(UpstreamFailure):
    kind = "status"

    def __init__(self, status: int, message: str, *, type: str | None = None,
                 code: str | None = None, param: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message, param=param, code=code, headers=headers)
        self.status = status
        if type:
            self.type = type


class UpstreamUnreachable(UpstreamFailure):
    code = "upstream_unreachable"
    kind = "unreachable"


class UpstreamTimeout(UpstreamFailure):
    outcome = "timeout"
    status = 504
    code = "upstream_timeout"
    kind = "timeout"


class UpstreamProtocolError(UpstreamFailure):
    code = "upstream_bad_stream"
    kind = "bad_stream"


class UpstreamAnswerTooLarge(UpstreamProtocolError):
    """A plain answer longer than ``[upstream] max_answer_bytes``: refused, not buffered."""

    code = "upstream_answer_too_large"


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
    text = redact(text, secrets)
    return text if len(text) <= limit else text[:limit] + "..."


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


def _log_withheld(status: int, body: bytes, secrets: tuple[str, ...]) -> None:
    """One warning line with what the upstream said and the client was not told: redacted,
    bounded, and quoted, so that a body with line breaks is still one line."""
    text = None
    if len(body) <= _MAX_DETAIL_SOURCE:
        try:  # re-encoded from the parsed value: an escaped key (\u0078ai-...) is redacted too
            text = orjson.dumps(redact_strings(orjson.loads(body), secrets)).decode()
        except orjson.JSONDecodeError:
            pass
    if text is None:
        head = body[:_MAX_DETAIL_SOURCE].decode("utf-8", "replace")
        text = _redact_cut_tail(redact(head, secrets), secrets)
    detail = text if len(text) <= _MAX_DETAIL else text[:_MAX_DETAIL] + "..."
    log.warning("upstream answered HTTP %d; withheld from the client: %r", status, detail)


def _redact_cut_tail(text: str, secrets: tuple[str, ...]) -> str:
    """A body looked at only up to a limit (here, or by a reader) may end in the first part of
    a key (four characters or more), which no search for the whole key finds: such an ending
    is redacted too."""
    for secret in secrets:
        for n in range(min(len(secret) - 1, len(text)), 3, -1):
            if text.endswith(secret[:n]):
                return text[:-n] + "[redacted]"
    return text


_KEYLIKE = re.compile(r"\b(?:sk|xai)-[A-Za-z0-9_\-*]{6,}")


def redact(message: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove anything that looks like a credential before a message reaches a client."""
    for secret in secrets:
        if secret:
            message = message.replace(secret, "[redacted]")
    return _KEYLIKE.sub("[redacted]", message)
