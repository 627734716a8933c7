"""The tail every model request shares once its handler has checked it: model aliases, the
vision check and stream fallback, the upstream call, and the relay of the answer.

``model_call`` is not a coroutine: it decides everything and serializes the upstream body now,
and returns the awaitable that answers. So the handler's ``return await model_call(...)``
holds no parsed body, base64 images included, while the answer streams.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..aliases import apply_alias
from ..records import Recorder
from ..appkeys import PROXY, SETTINGS
from ..request_info import REQUEST_INFO
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
    if images:
        require_vision_model(settings.vision, model, body["model"], images[0])
        if info.stream and settings.vision.stream_fallback != "off":
            return api.fallback(request, body, rewrite, recorder)
    proxy = request.app[PROXY]
    call = proxy.post(request, api.path, body)
    if info.stream:
        return proxy.stream(request, call, dialect=api.dialect, rewrite=rewrite,
                            recorder=recorder)
    return proxy.plain.relay(info, call, rewrite, recorder=recorder)
