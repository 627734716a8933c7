"""What handlers share on the way up and back: the upstream call, and answers the gateway builds
itself (the model list, the vision stream fallback)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import orjson
from aiohttp import web

from .appkeys import REQUEST_INFO, UPSTREAM
from .errors import SSE_HEADERS
from .http1 import UpstreamResponse
from .relay import response_headers


def upstream_post(request: web.Request, path: str, body: dict[str, Any] | None = None
                  ) -> Awaitable[UpstreamResponse]:
    """POST to the upstream: the client's own bytes when ``body`` is None, else ``body``."""
    info = request[REQUEST_INFO]

    async def call() -> UpstreamResponse:
        payload = await request.read() if body is None else orjson.dumps(body)
        return await request.app[UPSTREAM].request(
            "POST", path, body=payload,
            headers={"Content-Type": "application/json", "X-Request-ID": info.request_id})

    return call()


def upstream_get(request: web.Request, path: str) -> Awaitable[UpstreamResponse]:
    info = request[REQUEST_INFO]
    return request.app[UPSTREAM].request("GET", path, headers={"X-Request-ID": info.request_id})


def json_answer(request: web.Request, obj: Any,
                extra_headers: dict[str, str] | None = None) -> web.Response:
    return _answer(request, orjson.dumps(obj), "application/json", extra_headers)


def sse_answer(request: web.Request, events: list[bytes],
               extra_headers: dict[str, str] | None = None) -> web.Response:
    """A complete event stream, sent at once (the events are already framed)."""
    request[REQUEST_INFO].chunks += len(events)
    return _answer(request, b"".join(events), None, {**SSE_HEADERS, **(extra_headers or {})})


def _answer(request: web.Request, body: bytes, content_type: str | None,
            headers: dict[str, str] | None) -> web.Response:
    info = request[REQUEST_INFO]
    info.first_byte = asyncio.get_running_loop().time()
    info.bytes_out += len(body)
    return web.Response(body=body, content_type=content_type,
                        headers={**response_headers(info), **(headers or {})})
