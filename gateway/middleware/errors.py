"""The outermost middleware: the one place exceptions become responses, and the one place a
finished request is recorded (its access-log line and its metrics)."""

from __future__ import annotations

import asyncio
import logging
import random
import re

from aiohttp import web
from aiohttp.typedefs import Handler

from ..accesslog import log_request
from ..addresses import client_ip
from ..appkeys import METRICS, SETTINGS
from ..errors import SSE_HEADERS, GatewayError, MethodNotAllowed, NotFound, PayloadTooLarge
from ..request_info import REQUEST_INFO, RequestInfo
from .negotiation import wants_event_stream

log = logging.getLogger("gateway")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    rid = request.headers.get("X-Request-ID", "")
    info = RequestInfo(
        # Unique, not secret: no need for uuid4's syscall per request.
        request_id=rid if rid and _REQUEST_ID.fullmatch(rid) else f"{random.getrandbits(128):032x}",
        route=request.match_info.route.resource.canonical
        if request.match_info.route.resource is not None else "unmatched",
        client_ip=client_ip(request, settings.server.trusted_proxies),
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
        response = _error_response(err, event_stream=wants_event_stream(request))
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


def _error_response(err: GatewayError, *, event_stream: bool) -> web.Response:
    if event_stream:
        return web.Response(status=err.status, body=err.sse_frame(),
                            headers={**SSE_HEADERS, **err.headers})
    return web.Response(status=err.status, body=err.json_bytes(),
                        content_type="application/json", headers=err.headers)


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
