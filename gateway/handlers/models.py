"""GET models and models/{id}: the upstream's list with aliases, filtered to the caller's key,
cached per app (``gateway.catalog``)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..appkeys import MODEL_CATALOG, PROXY
from ..catalog import Entry, visible
from ..errors import NotFound
from ..request_info import REQUEST_INFO
from ..stream.answers import json_answer


async def _models(request: web.Request) -> list[Entry]:
    info = request[REQUEST_INFO]
    proxy = request.app[PROXY]

    def fetch() -> Any:
        return proxy.model_list(request)

    entries = await request.app[MODEL_CATALOG].entries(fetch)
    return visible(entries, info.key)


async def list_models(request: web.Request) -> web.Response:
    data = await _models(request)
    return json_answer(request[REQUEST_INFO], {"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    for entry in await _models(request):
        if entry["id"] == model:
            return json_answer(request[REQUEST_INFO], entry)
    # The same answer for a model that does not exist and one the key may not use.
    raise NotFound(f"The model '{model}' does not exist or you do not have access to it",
                   param="model", code="model_not_found")
