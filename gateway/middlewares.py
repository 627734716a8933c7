"""The middleware chain, outermost first: errors -> auth -> rate limit.

``errors_middleware`` is the one place that turns exceptions into responses. The others raise;
handlers never build error responses themselves.

A request aiohttp cannot parse (a header with a bare CR or LF, an absurd ``Content-Length``)
never reaches the chain: ``server_limits.py`` answers it with a JSON 400 that quotes nothing of
it. aiohttp's own log lines go to ``HTTP_SERVER_LOG``, whose filter takes credentials out first.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import random
import re

from aiohttp import web
from aiohttp.typedefs import Handler

from .accesslog import log_request
from .appkeys import AUTH_FAILURES, KEYSTORE, LIMITER, METRICS, SETTINGS
from .auth import bearer_token
from .errors import (
    SSE_HEADERS,
    AuthenticationFailed,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    redact,
)
from .request_body import json_body
from .request_info import REQUEST_INFO, RequestInfo

log = logging.getLogger("gateway")

PUBLIC_PATHS = frozenset(("/healthz", "/readyz", "/metrics"))
AUTH_FAILURES_CODE = "too_many_auth_failures"
"""The 429 ``code`` of a client throttled for presenting unknown keys (``auth.py``)."""
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
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
    the rest of the body after the answer, logs it with a traceback of some 40 lines, and
    closes the connection (right: its framing is lost). A traceback per bad request would let
    anyone fill the log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, web.RequestPayloadError)


HTTP_SERVER_LOG = logging.getLogger("gateway.http")
"""aiohttp's own server errors (requests it could not parse), credentials taken out."""
HTTP_SERVER_LOG.addFilter(DropUnreadableBodyRepeats())  # first: it reads exc_info
HTTP_SERVER_LOG.addFilter(RedactCredentials())


def _client_ip(request: web.Request, trusted: tuple[str, ...]) -> str:
    peer = request.remote or ""
    forwarded = request.headers.get("X-Forwarded-For")
    if forwarded and peer in trusted:
        candidate = forwarded.split(",")[-1].strip()
        try:
            return str(ipaddress.ip_address(candidate))
        except ValueError:
            pass
    return peer


def _error_response(err: GatewayError, *, event_stream: bool) -> web.Response:
    if event_stream:
        return web.Response(status=err.status, body=err.sse_frame(),
                            headers={**SSE_HEADERS, **err.headers})
    return web.Response(status=err.status, body=err.json_bytes(),
                        content_type="application/json", headers=err.headers)


def _wants_event_stream(request: web.Request) -> bool:
    """Should an error be an SSE frame? Only when ``Accept`` names ``text/event-stream``.

    Never the body's ``"stream": true``: reading it would mean reading (up to
    ``max_body_bytes``) and parsing a body before authentication, for anyone. And clients that
    send no ``Accept`` or ``*/*`` (the AI SDK providers, LiteLLM, curl) parse an error as JSON,
    as the upstreams answer it; the status is the true one either way.
    """
    for part in request.headers.get("Accept", "").split(","):
        media, *params = part.split(";")
        if media.strip().lower() == "text/event-stream":
            return not any(_zero_quality(p) for p in params)
    return False


def _zero_quality(param: str) -> bool:
    """``q=0`` (or ``0.0``...): the type is named only to refuse it (RFC 9110, 12.4.2)."""
    name, _, value = param.strip().partition("=")
    value = value.strip()
    return (name.strip().lower() == "q" and bool(value)
            and value.rstrip("0").rstrip(".") in ("0", ""))


def _from_http_exception(exc: web.HTTPException) -> GatewayError:
    if isinstance(exc, web.HTTPNotFound):
        return NotFound("Unknown route; see /api/v1/chat/completions, /api/v1/responses, "
                        "/api/v1/models, /api/v1/images/generations, /api/v1/vision/analyze")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return MethodNotAllowed(f"Method {exc.method} is not allowed here; use {allowed}",
                                headers={"Allow": allowed})
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge("Request body is too large")
    err = GatewayError(exc.reason)
    err.status = exc.status
    err.type = "invalid_request_error" if exc.status < 500 else "server_error"
    err.code = exc.reason.lower().replace(" ", "_")
    return err


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    rid = request.headers.get("X-Request-ID", "")
    info = RequestInfo(
        # Unique, not secret: no need for uuid4's syscall per request.
        request_id=rid if rid and _REQUEST_ID.fullmatch(rid) else f"{random.getrandbits(128):032x}",
        route=request.match_info.route.resource.canonical
        if request.match_info.route.resource is not None else "unmatched",
        client_ip=_client_ip(request, settings.server.trusted_proxies),
    )
    request[REQUEST_INFO] = info
    response: web.StreamResponse | None = None
    try:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            raise _from_http_exception(exc) from None
        except GatewayError:
            raise
        except asyncio.CancelledError:
            info.outcome = info.outcome or "client_disconnect"
            raise
        except Exception:
            log.exception("request %s failed", info.request_id)
            raise GatewayError("The gateway failed to handle this request") from None
    except GatewayError as err:
        # Answered here and never logged with its trace, which is dropped: its frames hold
        # whatever raised it (a relay, in a local) in a cycle with the error itself.
        err.__traceback__ = None
        info.note_error(err)
        err.headers = {"X-Request-ID": info.request_id, **info.limit_headers, **err.headers}
        response = _error_response(err, event_stream=_wants_event_stream(request))
    finally:
        if info.status == 0:
            # 499: the client closed the connection before any response (nginx's convention).
            info.status = response.status if response is not None else 499
        info.outcome = info.outcome or "completed"
        # The one place a finished request is recorded: its access-log line and its metrics.
        if settings.server.access_log:
            log_request(info)
        request.app[METRICS].observe(info)
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS or request.match_info.http_exception is not None:
        return await handler(request)
    token = bearer_token(request.headers.get("Authorization"), request.headers.get("x-api-key"))
    if token is None:
        raise AuthenticationFailed("Missing or malformed API key; send 'Authorization: Bearer "
                                   "<key>'")
    info = request[REQUEST_INFO]
    store = request.app[KEYSTORE]
    failures = request.app[AUTH_FAILURES]
    # A client throttled for its failures is answered from the cache: the keys this process
    # knows still pass, and its guesses cost no lookup.
    wait = failures.wait(info.client_ip)
    key = await store.lookup(token, cached_only=wait > 0)
    if key is None:
        if wait > 0:
            raise _too_many_failures(wait)
        failures.failed(info.client_ip)
        raise AuthenticationFailed("Invalid authentication token")
    info.key = key
    return await handler(request)


def _rate(per_minute: float) -> str:
    """1000000 as "1,000,000", 0.5 as "0.5": never "1e+06"."""
    return f"{per_minute:,.0f}" if per_minute == int(per_minute) else f"{per_minute:,.6g}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _too_many_failures(wait: float) -> RateLimited:
    return RateLimited(f"Too many requests with invalid API keys from this address; retry in "
                       f"{math.ceil(wait)}s", code=AUTH_FAILURES_CODE,
                       headers={"Retry-After": str(math.ceil(wait)),
                                "retry-after-ms": str(math.ceil(wait * 1000))})


@web.middleware
async def ratelimit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    info = request[REQUEST_INFO]
    key = info.key
    if key is None:
        return await handler(request)
    if request.method == "POST":
        await json_body(request)  # bad requests are refused before they cost a token
        if info.model is None and key.models is not None:
            # Without a model the upstream picks its default, which the allow-list never saw.
            raise InvalidRequest("Missing required parameter: 'model' (this API key may use "
                                 "only some models, so every request must name one)",
                                 param="model", code="missing_required_parameter")
    if info.model is not None and not key.may_use(info.model):
        raise PermissionDenied(f"This API key may not use model '{info.model}'", param="model")
    limiter = request.app[LIMITER]
    decision = await limiter.acquire(key, stream=info.stream)
    info.limit_headers = decision.headers()
    if not decision.allowed:
        retry = info.limit_headers["Retry-After"]
        if decision.refused_by == "concurrency":
            raise RateLimited(f"Concurrency limit reached: this key may hold "
                              f"{_count(key.max_concurrent_streams, 'open stream')} at a time; "
                              f"retry in {retry}s or when one ends",
                              code="concurrency_limit_exceeded")
        raise RateLimited(f"Rate limit reached: this key may send "
                          f"{_count(key.burst, 'request')} in a row, then "
                          f"{_rate(key.requests_per_minute)} a minute; retry in {retry}s")
    if decision.lease is None:
        return await handler(request)
    try:
        return await handler(request)
    finally:
        # Shielded: a disconnect cancels the handler, and the slot must come back regardless.
        await asyncio.shield(limiter.release(key, decision.lease))

