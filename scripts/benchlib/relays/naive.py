#!/usr/bin/env python3
"""The usual relay written on aiohttp: a naive pass-through with no auth, no limits, no
SSE framing and no error handling (what the performance issue calls "a naive 50-line aiohttp
pass-through"): ``ClientSession`` in, ``StreamResponse.write`` out, a task switch per chunk.
scripts/bench.py runs it beside nginx and the gateway, whose relay avoids exactly that cost.

    python scripts/benchlib/relays/naive.py PORT UPSTREAM_BASE_URL
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    yield
    await app[SESSION].close()


def make_app(upstream: str) -> web.Application:
    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with request.app[SESSION].post(f"{upstream}/chat/completions", data=body,
                                             headers={"Content-Type": "application/json"}) as up:
            response = web.StreamResponse(status=up.status, headers={
                "Content-Type": up.headers.get("Content-Type", "text/event-stream")})
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", relay)
    return app


if __name__ == "__main__":
    uvloop.install()
    web.run_app(make_app(sys.argv[2].rstrip("/")), host="127.0.0.1", port=int(sys.argv[1]),
                access_log=None, print=None)
