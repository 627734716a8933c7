"""POST vision/analyze: one image and a prompt, answered by an upstream chat completion.

Request: ``{"model", "image": "https://..." | "data:image/...;base64,...", "prompt",
"detail"?: "auto" | "low" | "high", "stream"?}``; any other field (``max_tokens``,
``temperature``, ...) goes to the chat completion as it is. The answer is the upstream's
``chat.completion`` (or, with ``"stream": true``, the vision stream fallback).
"""

from __future__ import annotations

from aiohttp import web

from .. import stream_fallback
from ..aliases import model_rewriter, upstream_model
from ..appkeys import REQUEST_INFO, SETTINGS
from ..errors import InvalidRequest
from ..forward import upstream_post
from ..relay import relay_json, relay_stream
from ..request_body import json_body, require
from ..vision import analyze_to_chat, check_detail, check_image_url, require_vision_model


async def analyze(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    model = require(body, "model", str, "a string")
    image = require(body, "image", str, "a string (an https:// or data: URL)")
    require(body, "prompt", str, "a string")
    check_detail(body.get("detail"), "detail")
    if "messages" in body:
        raise InvalidRequest("vision/analyze takes 'image' and 'prompt', not 'messages'; "
                             "send messages to chat/completions", param="messages")
    settings = request.app[SETTINGS]
    info = request[REQUEST_INFO]
    check_image_url(image, "image", settings.vision.max_image_bytes)
    upstream = upstream_model(settings.models.aliases, model)
    require_vision_model(settings.vision, model, upstream, "model")
    chat_body = analyze_to_chat(body, upstream)
    rewrite = model_rewriter(model) if upstream != model else None
    if info.stream and settings.vision.stream_fallback != "off":
        return await stream_fallback.chat(request, chat_body, rewrite)
    call = upstream_post(request, "chat/completions", chat_body)
    if info.stream:
        return await relay_stream(request, call, rewrite=rewrite)
    return await relay_json(request, call, rewrite=rewrite)
