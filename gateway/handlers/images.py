"""POST images/generate (the documented path) and images/generations (the OpenAI SDK's): plain
JSON only, since image generation never streams."""

from __future__ import annotations

from aiohttp import web

from ..aliases import aliased
from ..appkeys import REQUEST_INFO, SETTINGS
from ..errors import StreamNotSupported
from ..forward import upstream_post
from ..relay import relay_json
from ..request_body import json_body, require


async def generate_images(request: web.Request) -> web.Response:
    body = await json_body(request)
    info = request[REQUEST_INFO]
    if info.stream:
        # Not a stream and never one: the refusal is a JSON body, not an event-stream frame.
        info.stream = False
        raise StreamNotSupported("Image generation does not stream; leave out \"stream\" or "
                                 "send \"stream\": false", param="stream")
    require(body, "prompt", str, "a string")
    if "n" in body:
        require(body, "n", int, "an integer")
    up_body, rewrite = aliased(request.app[SETTINGS].models.aliases, body)
    return await relay_json(request, upstream_post(request, "images/generations", up_body),
                            rewrite=rewrite)
