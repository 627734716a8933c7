"""Every error the gateway reports, and the two shapes it reports them in.

The tree (status, OpenAI ``type``, ``code``)::

    GatewayError                  500 server_error           internal_error
    ├── InvalidRequest            400 invalid_request_error  invalid_request
    │   └── StreamNotSupported    400 invalid_request_error  stream_not_supported
    ├── AuthenticationFailed      401 authentication_error   invalid_api_key
    │   └── KeyRevoked            401 authentication_error   api_key_revoked (an open stream's)
    ├── PermissionDenied          403 permission_error       model_not_allowed
    │   └── KeyRecordDamaged      403 permission_error       permission_denied
    ├── NotFound                  404 invalid_request_error  not_found
    ├── MethodNotAllowed          405 invalid_request_error  method_not_allowed
    ├── PayloadTooLarge           413 invalid_request_error  request_too_large
    ├── UnsupportedMediaType      415 invalid_request_error  unsupported_media_type
    ├── RateLimited               429 rate_limit_error       rate_limit_exceeded
    ├── StreamTooLong             504 server_error           stream_max_duration
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
then writes the frame and ends the stream. On a WebSocket (the Responses API's WebSocket
mode) an error is one message, ``{"type": "error", "status", "error": {...}}``, and the socket
stays open. ``"error"`` is always an object: a bare string makes
the OpenAI SDK drop the message.

What an upstream says reaches a client only through ``gateway/upstream/errors.py``, which applies
``redact`` (below) to every string of it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import orjson

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

    def socket_message(self) -> str:
        """The error as the Responses API's WebSocket mode sends it (the SDK's
        ``ResponseWsError``): one text message, after which the socket stays open."""
        return orjson.dumps({"type": "error", "status": self.status, **self.body()}).decode()

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


class KeyRevoked(AuthenticationFailed):
    """The key of an open stream was revoked (``gateway keys revoke``): the stream ends with
    this frame (a request that starts after it gets ``invalid_api_key``)."""

    code = "api_key_revoked"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class KeyRecordDamaged(PermissionDenied):
    """A known key whose record in the key store cannot be read: the key is the client's own,
    so not 401, and the fault is none of the client's making, yet only the operator can mend it
    (by revoking and adding the key again)."""

    code = "permission_denied"


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


class StreamTooLong(GatewayError):
    """A stream that reached ``[stream] max_duration_seconds``: no stream holds its lease, its
    upstream connection and a process's memory for ever."""

    outcome = "timeout"
    status = 504
    code = "stream_max_duration"


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


_KEYLIKE = re.compile(r"\b(?:sk|xai)-[A-Za-z0-9_\-*]{6,}")

PART_CHARS = 8
"""The fewest consecutive characters of a secret that count as a part of it. No run this long
reaches a client or a log line: the rest of a key that is shown less a few characters is
within a guesser's reach, and a shorter run would match ordinary text."""


def bounded(text: str, limit: int) -> str:
    """At most ``limit`` characters of ``text``, then ``...``: whatever goes into an answer or a
    log line from outside is bounded (redact first, or a secret straddling the cut survives)."""
    return text if len(text) <= limit else text[:limit] + "..."


def redact(message: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove anything that looks like a credential before a message reaches a client: every
    run of ``PART_CHARS`` or more consecutive characters of a secret (the whole of it, or what
    an upstream echoed of it less a few characters at either end, or from its middle), each
    run as one ``[redacted]``, and anything key-like."""
    for secret in secrets:
        if len(secret) >= PART_CHARS:
            message = _without_parts(message, secret)
        elif secret:
            message = message.replace(secret, "[redacted]")
    return _KEYLIKE.sub("[redacted]", message)


def _without_parts(text: str, secret: str) -> str:
    """``text`` with each run of the secret's characters (``PART_CHARS`` or more) replaced.

    The leftmost ``PART_CHARS``-character window of the secret is found (one pattern of all
    of them), then the run is followed past it for as long as it goes on matching the secret,
    from every place the window holds in the secret. The search goes on after the run: a run
    that began inside it was taken out with it, up to where it ends."""
    found = _windows(secret).search(text)
    if found is None:
        return text
    pieces: list[str] = []
    done = 0
    while found is not None:
        start, end = found.span()
        for j in _offsets(secret)[found.group()]:
            at, k = start + PART_CHARS, j + PART_CHARS
            while at < len(text) and k < len(secret) and text[at] == secret[k]:
                at, k = at + 1, k + 1
            end = max(end, at)
        pieces += (text[done:start], "[redacted]")
        done = end
        found = _windows(secret).search(text, end)
    pieces.append(text[done:])
    return "".join(pieces)


@functools.lru_cache(maxsize=8)
def _offsets(secret: str) -> dict[str, tuple[int, ...]]:
    """Each ``PART_CHARS``-character window of the secret, and where it starts in it."""
    offsets: dict[str, list[int]] = {}
    for j in range(len(secret) - PART_CHARS + 1):
        offsets.setdefault(secret[j:j + PART_CHARS], []).append(j)
    return {window: tuple(at) for window, at in offsets.items()}


@functools.lru_cache(maxsize=8)
def _windows(secret: str) -> re.Pattern[str]:
    return re.compile("|".join(map(re.escape, _offsets(secret))))
