"""POST chat/completions: streamed or not."""

from __future__ import annotations

from aiohttp import web

from ..appkeys import REQUEST_INFO, UPSTREAM
from ..body import json_body, require
from ..relay import relay_json, relay_stream


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    require(body, "model", str, "a string")
    require(body, "messages", list, "an array of messages")
    info = request[REQUEST_INFO]
    call = request.app[UPSTREAM].request(
        "POST", "chat/completions", body=await request.read(),
        headers={"Content-Type": "application/json", "X-Request-ID": info.request_id})
    if info.stream:
        return await relay_stream(request, call)
    return await relay_json(request, call)
