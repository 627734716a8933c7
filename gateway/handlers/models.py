"""GET models and models/{id}: the upstream's list with aliases, filtered to the caller's key,
cached per app (``gateway.catalog``)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..appkeys import MODEL_CATALOG, REQUEST_INFO
from ..catalog import Entry, visible
from ..errors import NotFound
from ..forward import json_answer, upstream_get
from ..relay import fetch_json


async def _models(request: web.Request) -> list[Entry]:
    def fetch() -> Any:
        return fetch_json(request, upstream_get(request, "models"))

    entries = await request.app[MODEL_CATALOG].entries(fetch)
    return visible(entries, request[REQUEST_INFO].key)


async def list_models(request: web.Request) -> web.Response:
    return json_answer(request, {"object": "list", "data": await _models(request)})


async def get_model(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    for entry in await _models(request):
        if entry["id"] == model:
            return json_answer(request, entry)
    # The same answer for a model that does not exist and one the key may not use.
    raise NotFound(f"The model '{model}' does not exist or you do not have access to it",
                   param="model", code="model_not_found")
