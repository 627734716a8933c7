"""Reading and checking a request's JSON body, once, with errors that name what is wrong."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from .appkeys import REQUEST_INFO, SETTINGS
from .errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

_JSON_TYPES = ("application/json", "text/plain", "application/x-www-form-urlencoded", "")


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
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes") from None
    if not raw:
        raise InvalidRequest("Request body is empty; send a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"Request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"Request body must be a JSON object, not {kind_of(body)}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest(f"'stream' must be a boolean, not {kind_of(stream)}", param="stream")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest(f"'model' must be a string, not {kind_of(model)}", param="model")
    info.body = body
    info.stream = stream
    info.model = model
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


def kind_of(value: Any) -> str:
    """How an error message names a JSON value's type ("an object", "a string", ...)."""
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), "a value")
