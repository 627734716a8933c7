"""POST chat/completions: streamed or not; model aliases; image parts (the vision fallback)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from ..appkeys import SETTINGS
from ..request_body import require, take_body
from ..vision import chat_images
from .model_call import CHAT_API, model_call


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _checked(request, await take_body(request))


def _checked(request: web.Request, body: dict[str, Any]) -> Awaitable[web.StreamResponse]:
    require(body, "model", str, "a string")
    messages = require(body, "messages", list, "an array of messages")
    images = chat_images(messages, request.app[SETTINGS].vision.max_image_bytes)
    return model_call(request, CHAT_API, body, images)
