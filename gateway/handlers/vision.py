"""POST vision/analyze: one image and a prompt, answered by an upstream chat completion.

Request: ``{"model", "image": "https://..." | "data:image/...;base64,...", "prompt",
"detail"?: "auto" | "low" | "high", "stream"?}``; any other field (``max_tokens``,
``temperature``, ...) goes to the chat completion as it is. The answer is the upstream's
``chat.completion`` (or, with ``"stream": true``, the vision stream fallback).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from ..appkeys import SETTINGS
from ..errors import InvalidRequest
from ..request_body import require, take_body
from ..vision import analyze_to_chat, check_detail, check_image_url
from .model_call import CHAT_API, model_call


async def analyze(request: web.Request) -> web.StreamResponse:
    return await _checked(request, await take_body(request))


def _checked(request: web.Request, body: dict[str, Any]) -> Awaitable[web.StreamResponse]:
    model = require(body, "model", str, "a string")
    image = require(body, "image", str, "a string (an https:// or data: URL)")
    require(body, "prompt", str, "a string")
    check_detail(body.get("detail"), "detail")
    if "messages" in body:
        raise InvalidRequest("vision/analyze takes 'image' and 'prompt', not 'messages'; "
                             "send messages to chat/completions", param="messages")
    check_image_url(image, "image", request.app[SETTINGS].vision.max_image_bytes)
    return model_call(request, CHAT_API, analyze_to_chat(body, model), ["model"])
