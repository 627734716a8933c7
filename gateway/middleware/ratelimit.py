"""One token per request from the key's bucket, and a lease on one of its stream slots for a
stream, held until the handler returns, whichever way it returns. A WebSocket's upgrade takes
none: its turns do, each as a request of its own."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.typedefs import Handler

from ..appkeys import LIMITER
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
        raise decision.refusal(key)
    if decision.lease is None:
        return await handler(request)
    try:
        return await handler(request)
    finally:
        # Shielded: a disconnect cancels the handler, and the slot must come back regardless.
        await asyncio.shield(limiter.release(key, decision.lease))
