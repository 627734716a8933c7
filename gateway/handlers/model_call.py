"""The tail every model request shares once its handler has checked it: model aliases, the
vision check and stream fallback, the upstream call, and the relay of the answer; for a key with
token or spend limits, the reservation before the call and its settlement after it
(``gateway/ratelimit/spend.py``).

``model_call`` is not a coroutine: it decides everything and serializes the upstream body now,
and returns the awaitable that answers. So the handler's ``return await model_call(...)``
holds no parsed body, base64 images included, while the answer streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..aliases import apply_alias
from ..appkeys import LIMITER, PROXY, SETTINGS
from ..errors import InvalidRequest, PermissionDenied
from ..ratelimit.charges import worst_case
from ..ratelimit.spend import Spend
from ..records import Recorder
from ..request_info import REQUEST_INFO, RequestInfo
from ..stream import fallback
from ..stream.dialect import CHAT, RESPONSES, Dialect
from ..stream.render import Rewrite
from ..vision import require_vision_model

Fallback = Callable[[web.Request, dict[str, Any], Rewrite | None, Recorder | None],
                    Awaitable[web.Response]]


@dataclass(frozen=True, slots=True)
class ModelApi:
    path: str  # on the upstream
    dialect: Dialect
    fallback: Fallback  # a vision request that asks to stream


CHAT_API = ModelApi("chat/completions", CHAT, fallback.chat)
RESPONSES_API = ModelApi("responses", RESPONSES, fallback.responses)


def model_call(request: web.Request, api: ModelApi, body: dict[str, Any], images: list[str],
               recorder: Recorder | None = None) -> Awaitable[web.StreamResponse]:
    """``images`` are the request's image parts (their ``param`` paths), found by the caller;
    ``recorder`` records the response the answer creates (``handlers/owned.py``)."""
    settings = request.app[SETTINGS]
    info = request[REQUEST_INFO]
    model = body["model"]
    rewrite = apply_alias(settings.models.aliases, body)
    spend = spend_for(request, info, body, model)
    whole = False  # a vision request that asked to stream, answered whole
    if images:
        require_vision_model(settings.vision, model, body["model"], images[0])
        whole = info.stream and settings.vision.stream_fallback != "off"
    streamed = info.stream and not whole
    hide_usage = streamed and api.dialect is CHAT and _ask_usage(body)
    proxy = request.app[PROXY]

    def answer() -> Awaitable[web.StreamResponse]:
        """Made only once the reservation is taken: nothing reaches the upstream before."""
        if whole:
            return api.fallback(request, body, rewrite, recorder)
        call = proxy.post(request, api.path, body)
        if streamed:
            return proxy.stream(request, call, dialect=api.dialect, rewrite=rewrite,
                                hide_usage=hide_usage, spend=spend, recorder=recorder)
        return proxy.plain.relay(info, call, rewrite, recorder=recorder)
    return answer() if spend is None else _charged(request, spend, body, answer, streamed)


def _ask_usage(body: dict[str, Any]) -> bool:
    """Every chat stream asks for its usage (``stream_options.include_usage``): the key's token
    limits settle from it, the access log and metrics count it. True when the client had not
    asked: its stream then goes without the usage chunk, as it would have."""
    options = body.get("stream_options")
    if options is None:
        body["stream_options"] = {"include_usage": True}
        return True
    if isinstance(options, dict) and options.get("include_usage") is not True:
        body["stream_options"] = {**options, "include_usage": True}
        return True
    return False  # asked for; or not an object, which the upstream refuses


def spend_for(request: web.Request, info: RequestInfo, body: dict[str, Any], model: str
              ) -> Spend | None:
    """The request's charge, for a key with token or spend limits (``model``: as the client
    named it; ``body``'s, the upstream's name for it); a key with a spend limit may use only
    models with a price."""
    key = info.key
    budget = None if key is None else key.budget
    if key is None or budget is None:
        return None
    if body.get("background") is True:
        # Answered at once, without usage, and made later: nothing could settle it.
        raise InvalidRequest("Background responses cannot be counted against this API key's "
                             "token or spend limits; leave out \"background\"",
                             param="background", code="background_not_supported")
    settings = request.app[SETTINGS]
    price = settings.models.price_of(model, body["model"])
    if price is None and budget.spends:
        raise PermissionDenied(
            f"Model '{model}' has no price, and this API key has a spend limit: the gateway "
            f"cannot count what it would cost (the operator sets prices in "
            f"[models.prices])", param="model", code="model_not_priced")
    return Spend(request.app[LIMITER], key, budget, price,
                 settings.limits.on_token_overrun == "cut")


async def _charged(request: web.Request, spend: Spend, body: dict[str, Any],
                   answer: Callable[[], Awaitable[web.StreamResponse]], streamed: bool
                   ) -> web.StreamResponse:
    """Reserve, answer, settle (a stream settles itself as it ends, to tell the client in its
    closing comment; whatever it left unsettled, and every other answer, settles here)."""
    info = request[REQUEST_INFO]
    await spend.reserve(info, worst_case(body, info.body_bytes,
                                         request.app[SETTINGS].limits.default_output_tokens,
                                         spend.price))
    try:
        response = await answer()
        if not streamed:
            spend.answered = True  # a plain answer that came back is a 2xx, used
        return response
    finally:
        if not spend.settled:
            relayed = info.chunks if streamed else -(-info.bytes_out // 4)
            # Shielded: a client that leaves cancels the handler, and the charge must settle.
            await asyncio.shield(spend.settle(info, info.usage, relayed))
