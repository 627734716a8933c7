"""What the mock upstream answers when asked to fail (``gateway/mock/upstream.py`` documents
the options): error statuses shaped as xAI's (the default) or OpenAI's, echoes of the key it was
sent (whole or in part) into any field, header, answer text or line of an event stream, error
events inside a stream, and answers too long to hold.

xAI's error body is ``{"code": "<a gRPC status, in words>", "error": "<message>"}``: a string
``error``, and a ``code`` that is a phrase, not an identifier (``XAI_CODES``). OpenAI's is
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

XAI_CODES = {400: "Client specified an invalid argument",
             401: "The request does not have valid authentication credentials",
             403: "The caller does not have permission to execute the specified operation",
             404: "Some requested entity was not found",
             429: "Some resource has been exhausted",
             500: "Internal error",
             503: "The service is currently unavailable"}
"""xAI's ``code`` for a status, when the mock is given none (``error_code``)."""


def error_body(shape: str, status: int, err: dict[str, Any]) -> dict[str, Any]:
    """``err`` (OpenAI's fields) as the body of an error answer in ``shape``."""
    if shape == "openai":
        return {"error": err}
    return {"code": err["code"] or XAI_CODES.get(status, "Unknown error"),
            "error": err["message"]}


def error(status: int, message: str, shape: str, code: str | None = None) -> web.Response:
    """An error answer in ``shape`` (``xai`` or ``openai``)."""
    err = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    return web.json_response(error_body(shape, status, err), status=status)


ERROR_FIELDS = ("message", "type", "code", "param")
STREAM_LINES = {"comment_line": b": debug auth=", "event": b"event: ", "id": b"id: ",
                "retry": b"retry: "}
"""``echo_auth`` places that are a line of the stream's first event, and the line's start."""
STREAM_PLACES = (*STREAM_LINES, "comment", "event_name")
NOT_HEADERS = frozenset((*ERROR_FIELDS, *STREAM_PLACES, "text"))


def echoed_key(request: web.Request, opts: dict[str, Any]) -> str:
    """The request's key (its ``Authorization``, ``Bearer`` taken off), or the part of it that
    ``echo_slice`` (``[start, end]``, Python's slice bounds, either null) names: an upstream
    that echoes the key less a few characters at either end."""
    key = request.headers.get("Authorization", "").removeprefix("Bearer ")
    part = opts.get("echo_slice")
    if isinstance(part, list) and len(part) == 2 and all(
            p is None or (isinstance(p, int) and not isinstance(p, bool)) for p in part):
        key = key[part[0]:part[1]]
    return key


def echoing_text(request: web.Request, opts: dict[str, Any]) -> dict[str, Any]:
    """``opts`` with the answer's ``text`` holding the key when ``echo_auth`` names ``text``."""
    if "text" not in (opts.get("echo_auth") or []):
        return opts
    return {**opts, "text": f"the key is {echoed_key(request, opts)} as it was sent"}


def echoing_events(request: web.Request, opts: dict[str, Any], events: list[bytes]
                   ) -> list[bytes]:
    """``events`` with the key outside their ``data:`` lines where ``echo_auth`` says: a
    comment event of its own before the first (``comment``), a line of the first event (a
    comment, ``event:``, ``id:``, ``retry:``), or after every event's name (``event_name``,
    the Responses API's)."""
    places = opts.get("echo_auth") or []
    if not events or not any(place in STREAM_PLACES for place in places):
        return events
    key = echoed_key(request, opts).encode()
    lines = b"".join(start + key + b"\n" for place, start in STREAM_LINES.items()
                     if place in places)
    events = [lines + events[0], *events[1:]]
    if "event_name" in places:
        events = [_named(e, key) if e.startswith(b"event: ") else e for e in events]
    if "comment" in places:
        events = [b": debug auth=" + key + b"\n\n", *events]
    return events


def _named(event: bytes, key: bytes) -> bytes:
    """The event with `` <key>`` after its name (its first line, however it ends)."""
    end = min(at for at in (event.find(b"\r"), event.find(b"\n"), len(event)) if at >= 0)
    return event[:end] + b" " + key + event[end:]


def refusal(request: web.Request, status: int, opts: dict[str, Any], shape: str
            ) -> web.Response:
    """The answer to ``status``, shaped (``shape`` unless ``error_shape`` says) and leaking as
    the options ask."""
    echo = opts.get("echo_auth") or []
    key = echoed_key(request, opts)
    headers = {str(k): str(v) for k, v in (opts.get("error_headers") or {}).items()}
    if opts.get("location"):
        headers["Location"] = str(opts["location"])
    headers.update({name: key for name in echo if name not in NOT_HEADERS})
    size = opts.get("error_text_bytes")
    if isinstance(size, int):
        text = b"x" * size
        if isinstance(opts.get("key_at"), int):
            text = text[:opts["key_at"]] + key.encode() + text[opts["key_at"]:]
        return web.Response(status=status, body=text, content_type="text/html",
                            headers=headers)
    err: dict[str, Any] = {
        "message": opts.get("message", f"mock upstream error {status}"),
        "type": "rate_limit_error" if status == 429 else
                "server_error" if status >= 500 else "invalid_request_error",
        "param": None, "code": opts.get("error_code")}
    err.update({name: key for name in echo if name in err})
    body = error_body(str(opts.get("error_shape", shape)), status, err)
    return web.json_response(body, status=status, headers=headers)


def no_vision(model: str, shape: str) -> web.Response:
    return error(400, f"Model {model} does not support image input", shape,
                 code="model_not_vision_capable")


def no_model(model: str, shape: str) -> web.Response:
    """xAI's answer for a model it does not serve: 404."""
    return error(404, f"The model {model} does not exist or your team does not have access to "
                      f"it.", shape, code=None if shape == "xai" else "model_not_found")


def chat_error_event(sequence_number: int) -> bytes:
    return (b'data: {"error": {"message": "mock mid-stream failure",'
            b' "type": "server_error", "code": "mock_failure"}}\n\n')


def leaky_error(request: web.Request, opts: dict[str, Any]) -> dict[str, Any]:
    """The ``error_after`` error object with ``error_code`` and ``echo_auth`` applied."""
    err: dict[str, Any] = {"message": "mock mid-stream failure", "type": "server_error",
                           "param": None, "code": opts.get("error_code", "mock_failure")}
    err.update({name: echoed_key(request, opts) for name in opts.get("echo_auth") or []
                if name in err})
    return err


def chat_leaky_error_event(err: dict[str, Any], sequence_number: int) -> bytes:
    return b"data: " + orjson.dumps({"error": err}) + b"\n\n"


def responses_leaky_error_event(err: dict[str, Any], sequence_number: int) -> bytes:
    return b"event: error\ndata: " + orjson.dumps({
        "type": "error", "code": err["code"], "message": err["message"], "param": err["param"],
        "error": err, "sequence_number": sequence_number}) + b"\n\n"


async def long_answer(request: web.Request, state: Any, size: int, chunked: bool
                      ) -> web.StreamResponse:
    """A plain answer of ``size`` bytes (valid JSON, if read whole), never held in memory;
    ``state`` (``MockState``) counts what the socket took."""
    head, tail = b'{"id": "chatcmpl-long", "object": "chat.completion", "padding": "', b'"}'
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    if chunked:
        response.enable_chunked_encoding()
    else:
        response.content_length = max(size, len(head) + len(tail))
    await response.prepare(request)
    piece = b"x" * 65536
    finished = False
    try:
        await response.write(head)
        left = size - len(head) - len(tail)
        while left > 0:
            n = min(left, len(piece))
            await response.write(piece[:n])
            state.answer_bytes_sent += n
            left -= n
        await response.write(tail)
        await response.write_eof()
        finished = True
        return response
    finally:
        if not finished:
            state.note_disconnect()
