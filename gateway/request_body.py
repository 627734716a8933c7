"""Reading and checking a request's JSON body, once, with errors that name what is wrong.

Called after authentication only: no one reads or parses a body for an unknown client.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError

from .appkeys import SETTINGS
from .errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from .request_info import REQUEST_INFO

log = logging.getLogger("gateway")

_JSON_TYPES = ("application/json", "text/plain", "application/x-www-form-urlencoded", "")
MAX_MODEL_CHARS = 256
"""Longer ``model`` names get 400: no provider's names come near it (xAI's, OpenAI's fine-tuned
``ft:...`` ones stay under 100), and the name goes into log lines and error messages."""
_ENCODINGS = frozenset(("gzip", "x-gzip", "deflate", "br", "zstd", "identity"))
MAX_NESTING = 254
"""Arrays and objects nested deeper are refused with a 400: orjson reads 1,024 levels but writes
254 at most, and the gateway re-encodes every body it sends on (``gateway/stream/proxy.py``)."""


async def json_body(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, parsed once per request (middlewares and handlers share it)."""
    info = request[REQUEST_INFO]
    if info.body is not None:
        return info.body  # type: ignore[no-any-return]
    limit = request.app[SETTINGS].stream.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"Request body is {request.content_length} bytes; "
                              f"the limit is {limit} bytes")
    # curl -d sends form-urlencoded by default; accept any type that may carry JSON text.
    ctype = request.content_type
    if not (ctype in _JSON_TYPES or ctype.endswith("+json")):
        raise UnsupportedMediaType(f"Content-Type {ctype!r} is not supported; "
                                   "send application/json")
    try:
        raw = await _read(request, limit)
    except web.RequestPayloadError as exc:
        raise _unreadable(request, exc) from None
    if not raw:
        raise InvalidRequest("Request body is empty; send a JSON object")
    info.body_bytes = len(raw)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"Request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"Request body must be a JSON object, not {kind_of(body)}")
    # Counting brackets only bounds the depth (those in strings count too); the parsed body
    # decides, and is walked only when the count allows a body too deep.
    if raw.count(b"[") + raw.count(b"{") > MAX_NESTING and _nested_past(body, MAX_NESTING):
        raise InvalidRequest(f"Request body nests arrays and objects more than {MAX_NESTING} "
                             f"levels deep")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest(f"'stream' must be a boolean, not {kind_of(stream)}", param="stream")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest(f"'model' must be a string, not {kind_of(model)}", param="model")
    if model is not None and len(model) > MAX_MODEL_CHARS:
        raise InvalidRequest(f"'model' is {len(model)} characters long; model names have at "
                             f"most {MAX_MODEL_CHARS}", param="model")
    info.body = body
    info.stream = stream
    info.model = model
    return body


async def _read(request: web.Request, limit: int) -> bytes:
    """The body's bytes, at most ``limit`` of them. Not ``request.read()``: aiohttp keeps what
    that returns for the request's life, the whole stream's for a streamed answer."""
    body = bytearray()
    while chunk := await request.content.readany():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes")
    return bytes(body)


def _unreadable(request: web.Request, exc: web.RequestPayloadError) -> InvalidRequest:
    """A body aiohttp could not read: not what its ``Content-Encoding`` says, or cut short.

    aiohttp puts its parser's error in ``__cause__``. The client gets a 400 in the error shape;
    the log gets one line, since a traceback per bad request would let anyone fill the log.
    """
    said = request.headers.get("Content-Encoding", "").strip().lower()
    # The header is the client's string: named in the log and the answer only when known.
    encoding = said if said in _ENCODINGS else "other" if said else "none"
    cause = exc.__cause__ or exc
    log.info("request %s: unreadable body (Content-Encoding: %s): %s",
             request[REQUEST_INFO].request_id, encoding, type(cause).__name__)
    # The connection's framing is lost, so aiohttp closes it after the answer; the header tells
    # the client first, so that it does not send its next request into a closing socket.
    close = {"Connection": "close"}
    if isinstance(cause, ContentEncodingError) or encoding not in ("none", "identity"):
        return InvalidRequest("Request body could not be decoded as its Content-Encoding "
                              f"({encoding}) says", headers=close)
    return InvalidRequest("Request body is malformed or incomplete", headers=close)


async def take_body(request: web.Request) -> dict[str, Any]:
    """The body for the handler, which becomes its only owner: the request forgets it, so it is
    not kept (base64 images included) while the answer streams."""
    body = await json_body(request)
    request[REQUEST_INFO].body = None
    return body


def require(body: dict[str, Any], field: str, kind: type, what: str) -> Any:
    """A required field of the given type, or a 400 naming it."""
    if field not in body:
        raise InvalidRequest(f"Missing required parameter: '{field}'", param=field,
                             code="missing_required_parameter")
    value = body[field]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidRequest(f"'{field}' must be {what}, not {kind_of(value)}", param=field)
    return value


def _nested_past(value: Any, most: int) -> bool:
    """Whether ``value`` holds arrays and objects nested more than ``most`` levels deep (the
    value itself is the first level). Iterative: the depth is the attacker's."""
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        container, depth = pending.pop()
        if depth > most:
            return True
        items = container.values() if isinstance(container, dict) else container
        pending.extend((item, depth + 1) for item in items if isinstance(item, (dict, list)))
    return False


def kind_of(value: Any) -> str:
    """How an error message names a JSON value's type ("an object", "a string", ...)."""
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), "a value")
