"""GET responses, upgraded: the Responses API's WebSocket mode (``stream/socket.py`` relays it).

The upgrade was authenticated from its headers by the auth middleware (no key or a bad one:
401, and no socket) and took no rate-limit token (``middleware/ratelimit.py``). Each
``response.create`` message is admitted here as ``POST responses`` would be: its fields, the
key's model allow-list, the vision rules, a model alias applied, its ``previous_response_id``
the key's own (``handlers/owned.py``), then one token and a stream slot, held until its turn
ends.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web

from ..aliases import apply_alias
from ..appkeys import IN_FLIGHT, LIMITER, RECORDS, SETTINGS, UPSTREAM_SOCKETS
from ..errors import InvalidRequest, PermissionDenied
from ..ratelimit.charges import worst_case
from ..request_body import MAX_MODEL_CHARS, require
from ..request_info import REQUEST_INFO
from ..stream.socket import SocketSession, Turn
from ..vision import require_vision_model, responses_images
from .model_call import spend_for
from .owned import recorder_for, require_own_previous


async def responses_socket(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    ws = web.WebSocketResponse(heartbeat=settings.stream.keepalive_seconds,
                               max_msg_size=settings.stream.max_body_bytes)
    if not ws.can_prepare(request).ok:
        raise InvalidRequest("GET responses opens the Responses API's WebSocket mode: send "
                             "an Upgrade: websocket request (POST responses creates one over "
                             "HTTP)", code="websocket_upgrade_required")
    await ws.prepare(request)
    info = request[REQUEST_INFO]
    in_flight = request.app[IN_FLIGHT]
    session = SocketSession(ws, request.app[UPSTREAM_SOCKETS], settings.stream, info,
                            in_flight, lambda text: _admit(request, text))
    with in_flight.track_socket(session, info.key):
        await session.run()
    return ws


async def _admit(request: web.Request, text: str) -> Turn:
    """One ``response.create``: what the message itself says checked first; then its token
    and stream slot, which every later refusal gives back (its ownership of what it
    continues, a price for a key with a spend limit, its token reservation)."""
    app = request.app
    settings = app[SETTINGS]
    info = request[REQUEST_INFO]
    key = info.key
    assert key is not None  # the auth middleware let the upgrade through
    message = _message(text)
    model = require(message, "model", str, "a string")
    if len(model) > MAX_MODEL_CHARS:
        raise InvalidRequest(f"'model' is {len(model)} characters long; model names have at "
                             f"most {MAX_MODEL_CHARS}", param="model")
    if not key.may_use(model):
        raise PermissionDenied(f"This API key may not use model '{model}'", param="model")
    images = responses_images(message.get("input"), settings.vision.max_image_bytes)
    rewrite = apply_alias(settings.models.aliases, message)
    if images:
        require_vision_model(settings.vision, model, message["model"], images[0])
    try:
        # Re-encoded, as ``Proxy.post`` does: the upstream gets exactly what was checked (a
        # duplicate key cannot name another model than the one allowed).
        payload = orjson.dumps(message).decode()
    except orjson.JSONEncodeError:  # orjson writes 254 levels of nesting, reads 1024
        raise InvalidRequest("The message nests arrays and objects too deeply") from None
    limiter = app[LIMITER]
    decision = await limiter.acquire(key, stream=True)
    if not decision.allowed:
        raise decision.refusal(key)
    lease = decision.lease

    async def release() -> None:
        if lease is not None:
            await limiter.release(key, lease)

    try:
        pinned = await require_own_previous(app[RECORDS], info, message)
        spend = spend_for(request, info, message, model)  # 403 for a model unpriced
        if spend is not None:  # the turn's worst case, as for POST responses; settled at its end
            await spend.reserve(info, worst_case(message, len(text.encode()),
                                                 settings.limits.default_output_tokens,
                                                 spend.price), tell=False)
    except BaseException:
        await asyncio.shield(release())
        raise
    return Turn(payload, release, recorder_for(app[RECORDS], info, message), rewrite,
                model=message["model"], pinned=pinned, spend=spend)


def _message(text: str) -> dict[str, Any]:
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"The message is not valid JSON: {e}") from None
    if not isinstance(message, dict):
        raise InvalidRequest("The message must be a JSON object")
    if message.get("type") != "response.create":
        raise InvalidRequest("This socket takes 'response.create' messages only",
                             param="type", code="unsupported_message_type")
    return message
