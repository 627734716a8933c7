"""What the mock upstream answers when asked to fail (``gateway/mock/upstream.py`` documents
the options): error statuses shaped as xAI's (the default) or OpenAI's, echoes of the key it was
sent into any field or header, error events inside a stream, and answers too long to hold.

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


def echoed_key(request: web.Request) -> str:
    return request.headers.get("Authorization", "").removeprefix("Bearer ")


def refusal(request: web.Request, status: int, opts: dict[str, Any], shape: str
            ) -> web.Response:
    """The answer to ``status``, shaped (``shape`` unless ``error_shape`` says) and leaking as
    the options ask."""
    echo = opts.get("echo_auth") or []
    key = echoed_key(request)
    headers = {str(k): str(v) for k, v in (opts.get("error_headers") or {}).items()}
    if opts.get("location"):
        headers["Location"] = str(opts["location"])
    headers.update({name: key for name in echo
                    if name not in ("message", "type", "code", "param")})
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
    err.update({name: echoed_key(request) for name in opts.get("echo_auth") or []
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
