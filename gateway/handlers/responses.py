"""POST responses: the Responses API, its named-event stream relayed byte for byte."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from ..appkeys import SETTINGS
from ..request_body import require, take_body
from ..vision import responses_images
from .model_call import RESPONSES_API, model_call


async def create_response(request: web.Request) -> web.StreamResponse:
    return await _checked(request, await take_body(request))


def _checked(request: web.Request, body: dict[str, Any]) -> Awaitable[web.StreamResponse]:
    require(body, "model", str, "a string")
    images = responses_images(body.get("input"), request.app[SETTINGS].vision.max_image_bytes)
    return model_call(request, RESPONSES_API, body, images)
