"""POST responses: the Responses API, its named-event stream relayed byte for byte."""

from __future__ import annotations

from aiohttp import web

from .. import stream_fallback
from ..appkeys import SETTINGS
from ..relay import RESPONSES
from ..request_body import json_body, require
from ..vision import responses_images
from .model_request import forward


async def create_response(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    require(body, "model", str, "a string")
    images = responses_images(body.get("input"), request.app[SETTINGS].vision.max_image_bytes)
    return await forward(request, "responses", body, images,
                         fallback=stream_fallback.responses, dialect=RESPONSES)
