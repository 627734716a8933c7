"""GET models and models/{id}: the upstream's list."""

from __future__ import annotations

from aiohttp import web

from ..appkeys import REQUEST_INFO, UPSTREAM
from ..relay import relay_json


async def list_models(request: web.Request) -> web.Response:
    info = request[REQUEST_INFO]
    return await relay_json(request, request.app[UPSTREAM].request(
        "GET", "models", headers={"X-Request-ID": info.request_id}))


async def get_model(request: web.Request) -> web.Response:
    info = request[REQUEST_INFO]
    model = request.match_info["model"]
    return await relay_json(request, request.app[UPSTREAM].request(
        "GET", f"models/{model}", headers={"X-Request-ID": info.request_id}))
