"""One token per request from the key's bucket, and a lease on one of its stream slots for a
stream, held until the handler returns, whichever way it returns. A WebSocket's upgrade takes
none: its turns do, each as a request of its own."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.typedefs import Handler

from ..appkeys import LIMITER
from ..errors import RateLimited
from ..request_info import REQUEST_INFO
from .admission import admit

SOCKET_PATHS = frozenset(("/api/v1/responses", "/v1/responses"))
"""``GET`` here opens the Responses API's WebSocket mode."""


@web.middleware
async def ratelimit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    info = request[REQUEST_INFO]
    key = info.key
    if key is None or (request.method == "GET" and request.path in SOCKET_PATHS):
        # A WebSocket's upgrade takes no token: each turn on it takes one
        # (``handlers/socket.py``).
        return await handler(request)
    await admit(request, info, key)
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


def _rate(per_minute: float) -> str:
    """1000000 as "1,000,000", 0.5 as "0.5": never "1e+06"."""
    return f"{per_minute:,.0f}" if per_minute == int(per_minute) else f"{per_minute:,.6g}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
