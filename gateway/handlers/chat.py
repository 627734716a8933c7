"""POST chat/completions: streamed or not; model aliases; image parts (the vision fallback)."""

from __future__ import annotations

from aiohttp import web

from .. import stream_fallback
from ..aliases import aliased, upstream_model
from ..appkeys import REQUEST_INFO, SETTINGS
from ..body import json_body, require
from ..forward import upstream_post
from ..relay import relay_json, relay_stream
from ..vision import chat_images, require_vision_model


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    model = require(body, "model", str, "a string")
    messages = require(body, "messages", list, "an array of messages")
    settings = request.app[SETTINGS]
    info = request[REQUEST_INFO]
    images = chat_images(messages, settings.vision.max_image_bytes)
    up_body, rewrite = aliased(settings.models.aliases, body)
    if images:
        require_vision_model(settings.vision, model,
                             upstream_model(settings.models.aliases, model), images[0])
        if info.stream and settings.vision.stream_fallback != "off":
            return await stream_fallback.chat(request, up_body or body, rewrite)
    call = upstream_post(request, "chat/completions", up_body)
    if info.stream:
        return await relay_stream(request, call, rewrite=rewrite)
    return await relay_json(request, call, rewrite=rewrite)
