"""POST images/generate (the documented path) and images/generations (the OpenAI SDK's): plain
JSON only, since image generation never streams."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from ..aliases import apply_alias
from ..appkeys import PROXY, SETTINGS
from ..errors import PermissionDenied, StreamNotSupported
from ..request_body import require, take_body
from ..request_info import REQUEST_INFO


async def generate_images(request: web.Request) -> web.Response:
    return await _checked(request, await take_body(request))


def _checked(request: web.Request, body: dict[str, Any]) -> Awaitable[web.Response]:
    info = request[REQUEST_INFO]
    if info.stream:
        # Not a stream and never one: the refusal is a JSON body, not an event-stream frame.
        info.stream = False
        raise StreamNotSupported("Image generation does not stream; leave out \"stream\" or "
                                 "send \"stream\": false", param="stream")
    require(body, "prompt", str, "a string")
    budget = None if info.key is None else info.key.budget
    if budget is not None and budget.spends:
        raise PermissionDenied(
            "Image generation has no price in the gateway, and this API key has a spend "
            "limit: the gateway cannot count what it would cost", param="model",
            code="model_not_priced")
    if "n" in body:
        require(body, "n", int, "an integer")
    rewrite = apply_alias(request.app[SETTINGS].models.aliases, body)
    proxy = request.app[PROXY]
    return proxy.plain.relay(info, proxy.post(request, "images/generations", body), rewrite)
