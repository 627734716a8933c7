"""POST responses: the Responses API, its named-event stream relayed byte for byte. A
continuation (``previous_response_id``) only of the key's own responses, and the response it
creates recorded as the key's (``handlers/owned.py``)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from ..appkeys import RECORDS, SETTINGS
from ..request_body import require, take_body
from ..request_info import REQUEST_INFO
from ..vision import responses_images
from .model_call import RESPONSES_API, model_call
from .owned import recorder_for, require_own_previous


async def create_response(request: web.Request) -> web.StreamResponse:
    # No local holds the body while the answer streams (``model_call`` says why).
    return await _call(request, *await _checked(request, await take_body(request)))


async def _checked(request: web.Request, body: dict[str, Any]
                   ) -> tuple[dict[str, Any], list[str]]:
    require(body, "model", str, "a string")
    images = responses_images(body.get("input"), request.app[SETTINGS].vision.max_image_bytes)
    await require_own_previous(request.app[RECORDS], request[REQUEST_INFO], body)
    return body, images


def _call(request: web.Request, body: dict[str, Any], images: list[str]
          ) -> Awaitable[web.StreamResponse]:
    recorder = recorder_for(request.app[RECORDS], request[REQUEST_INFO], body)
    return model_call(request, RESPONSES_API, body, images, recorder)
