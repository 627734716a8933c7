"""POST chat/completions: streamed or not; model aliases; image parts (the vision fallback)."""

from __future__ import annotations

from aiohttp import web

from .. import stream_fallback
from ..appkeys import SETTINGS
from ..request_body import json_body, require
from ..vision import chat_images
from .model_request import forward


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    require(body, "model", str, "a string")
    messages = require(body, "messages", list, "an array of messages")
    images = chat_images(messages, request.app[SETTINGS].vision.max_image_bytes)
    return await forward(request, "chat/completions", body, images,
                         fallback=stream_fallback.chat)
