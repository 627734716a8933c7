"""The mock's WebSocket mode (``GET /v1/responses`` upgraded), as xAI and OpenAI serve it: each
``response.create`` message (the fields of ``POST /v1/responses``, flat) is answered with the
events a stream of it would carry, one JSON text message each, and stored like any response.
A message refused (not JSON, another type, an unknown model, a ``previous_response_id`` the mock
does not hold, or the ``status`` mock option) gets one ``{"type": "error", "status", "error"}``
message and the socket stays open. The upgrade is refused (401) without a ``Bearer`` key, as
xAI refuses it. Of the mock options, ``chunk_delay`` (between messages), ``echo_auth: ["text"]``
and ``status`` apply here, and one of its own: ``close_after_turn`` closes the socket once the
turn's messages are sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from . import faults
from .bounds import out_of_bounds
from .stored import MOCK_STORE
from .stream import MOCK_STATE

Answer = Callable[..., tuple[dict[str, Any], list[bytes]]]


def _error(status: int, message: str, code: str | None = None,
           param: str | None = None) -> str:
    return orjson.dumps({"type": "error", "status": status, "error": {
        "type": "invalid_request_error", "code": code, "message": message,
        "param": param}}).decode()


async def responses_socket(request: web.Request, answer: Answer) -> web.StreamResponse:
    if not request.headers.get("Authorization", "").startswith("Bearer "):
        return web.json_response({"error": {"message": "missing key", "type": "auth",
                                            "param": None, "code": None}}, status=401)
    ws = web.WebSocketResponse(max_msg_size=64 * 1024 * 1024)
    await ws.prepare(request)
    state = request.app[MOCK_STATE]
    state.sockets_opened += 1
    async for msg in ws:
        if msg.type is not WSMsgType.TEXT:
            continue
        try:
            body = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            await ws.send_str(_error(400, "invalid JSON"))
            continue
        state.record(request, body, msg.data.encode())
        opts = body.get("mock") if isinstance(body, dict) else None
        delay = opts.get("chunk_delay") if isinstance(opts, dict) else None
        for i, out in enumerate(_turn(request, body, answer)):
            if i and isinstance(delay, (int, float)):
                await asyncio.sleep(delay)
            await ws.send_str(out)
        if isinstance(opts, dict) and opts.get("close_after_turn"):
            await ws.close()  # as an upstream that closes idle sockets would, between turns
    return ws


def _turn(request: web.Request, body: Any, answer: Answer) -> list[str]:
    """The messages that answer one client message."""
    if not isinstance(body, dict) or body.get("type") != "response.create":
        return [_error(400, "expected a response.create message", param="type")]
    opts = body.get("mock") or {}
    if not isinstance(opts, dict):
        return [_error(400, "mock options must be an object")]
    if (problem := out_of_bounds(opts)) is not None:
        return [_error(400, problem)]
    opts = faults.echoing_text(request, opts)  # ``echo_auth``: the key in the answer's text
    if isinstance(opts.get("status"), int):
        return [_error(opts["status"], "refused as asked (mock status)")]
    model = body.get("model")
    if not isinstance(model, str) or model not in request.app[MOCK_STATE].models:
        return [_error(404, f"The model {model} does not exist", code="model_not_found")]
    missing = request.app[MOCK_STORE].missing_previous(body)
    if missing is not None:
        err = missing["error"]
        return [_error(404, err["message"], err["code"], err["param"])]
    _, events = answer(request, body, opts, model, request.app[MOCK_STATE].style)
    # The data of each event as the stream would carry it (``event: ...\ndata: {...}\n\n``).
    return [e.split(b"\ndata: ", 1)[1].rstrip(b"\n").decode() for e in events]
