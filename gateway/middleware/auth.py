"""The client's key, checked before anything else is read: no body, no token, no upstream
call for a request without a known key. A client that keeps presenting unknown keys is
throttled per address (``gateway/auth.py``'s ``AuthFailureThrottle``)."""

from __future__ import annotations

import math

from aiohttp import web
from aiohttp.typedefs import Handler

from ..appkeys import AUTH_FAILURES, KEYSTORE
from ..auth import bearer_token
from ..errors import AuthenticationFailed, RateLimited
from ..request_info import REQUEST_INFO

PUBLIC_PATHS = frozenset(("/healthz", "/readyz", "/metrics"))
"""Answered without a client key (``gateway/handlers/health.py``)."""
AUTH_FAILURES_CODE = "too_many_auth_failures"
"""The 429 ``code`` of a client throttled for presenting unknown keys."""


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


def _too_many_failures(wait: float) -> RateLimited:
    return RateLimited(f"Too many requests with invalid API keys from this address; retry in "
                       f"{math.ceil(wait)}s", code=AUTH_FAILURES_CODE,
                       headers={"Retry-After": str(math.ceil(wait)),
                                "retry-after-ms": str(math.ceil(wait * 1000))})
