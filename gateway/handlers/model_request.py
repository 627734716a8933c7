"""The shared second half of the handlers that forward a model request as the client sent it
(chat completions, the Responses API): model aliases, the vision check and stream fallback,
then the relay."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..aliases import aliased, upstream_model
from ..appkeys import REQUEST_INFO, SETTINGS
from ..forward import upstream_post
from ..relay import CHAT, Rewrite, StreamDialect, relay_json, relay_stream
from ..vision import require_vision_model

Fallback = Callable[[web.Request, dict[str, Any], Rewrite | None], Awaitable[web.Response]]


async def forward(request: web.Request, path: str, body: dict[str, Any], images: list[str], *,
                  fallback: Fallback, dialect: StreamDialect = CHAT) -> web.StreamResponse:
    """``images`` are the request's image parts (their ``param`` paths), found by the caller."""
    settings = request.app[SETTINGS]
    model = body["model"]
    up_body, rewrite = aliased(settings.models.aliases, body)  # None: the client's own bytes
    if images:
        require_vision_model(settings.vision, model,
                             upstream_model(settings.models.aliases, model), images[0])
        if request[REQUEST_INFO].stream and settings.vision.stream_fallback != "off":
            return await fallback(request, up_body or body, rewrite)
    call = upstream_post(request, path, up_body)
    if request[REQUEST_INFO].stream:
        return await relay_stream(request, call, rewrite=rewrite, dialect=dialect)
    return await relay_json(request, call, rewrite=rewrite)
