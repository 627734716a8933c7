"""POST responses: the Responses API, its named-event stream relayed byte for byte."""

from __future__ import annotations

from aiohttp import web

from .. import stream_fallback
from ..aliases import aliased, upstream_model
from ..appkeys import REQUEST_INFO, SETTINGS
from ..body import json_body, require
from ..forward import upstream_post
from ..relay import RESPONSES, relay_json, relay_stream
from ..vision import require_vision_model, responses_images


async def create_response(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    model = require(body, "model", str, "a string")
    settings = request.app[SETTINGS]
    info = request[REQUEST_INFO]
    images = responses_images(body.get("input"), settings.vision.max_image_bytes)
    up_body, rewrite = aliased(settings.models.aliases, body)
    if images:
        require_vision_model(settings.vision, model,
                             upstream_model(settings.models.aliases, model), images[0])
        if info.stream and settings.vision.stream_fallback != "off":
            return await stream_fallback.responses(request, up_body or body, rewrite)
    call = upstream_post(request, "responses", up_body)
    if info.stream:
        return await relay_stream(request, call, rewrite=rewrite, dialect=RESPONSES)
    return await relay_json(request, call, rewrite=rewrite)
