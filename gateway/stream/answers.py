"""Plain answers: the upstream's whole answer, read within bounds, and the answers the gateway
builds itself (a model list, the vision stream fallback). No streaming here
(``gateway/stream/relay.py``).

An upstream answer is read whole only up to ``[upstream] max_answer_bytes``: past it the
request fails with 502 and the connection is closed, so one huge answer cannot take the
process's memory. The client gets JSON or nothing of it: a success that is not JSON (an HTML
page from whatever stands in front of the upstream) is a 502 in the error shape
(``not_json``). An answer that echoes the operator's key, or part of it, has it taken out, as
in a stream.
Like a stream, a plain request is tracked by ``InFlight``: at shutdown, past
the drain time, it is answered 503 ``gateway_restarting`` (nothing was sent yet, so the status
can still say so).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

import orjson
import simdjson
from aiohttp import web

from ..errors import (
    SSE_HEADERS,
    ShuttingDown,
    UpstreamAnswerTooLarge,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from ..inflight import InFlight
from ..records import Recorder, created_id
from ..request_info import RequestInfo
from ..upstream.errors import from_upstream, not_json, redact_strings
from ..upstream.http1 import AnswerTooLarge, InvalidHTTP, UpstreamResponse
from ..upstream.secrets import Secrets
from .dialect import usage_of
from .render import Rewrite

_MAX_USAGE_PARSE = 1024 * 1024
"""A plain answer is parsed for its token counts (access log, metrics) only up to this size;
a longer one is only validated (simdjson builds no Python objects)."""
_VALIDATOR = simdjson.Parser()


def response_headers(info: RequestInfo) -> dict[str, str]:
    """What every answer carries: the request id and the key's rate-limit state."""
    return {"X-Request-ID": info.request_id, **info.limit_headers}


class PlainAnswers:
    """Reads upstream answers whole; one per app, handed what it needs at start-up."""

    def __init__(self, in_flight: InFlight, timeout: float, max_bytes: int,
                 secrets: Secrets) -> None:
        self.in_flight = in_flight
        self.timeout = timeout  # for the whole answer: the first-byte timeout
        self.max_bytes = max_bytes
        self.secrets = secrets

    async def relay(self, info: RequestInfo, call: Awaitable[UpstreamResponse],
                    rewrite: Rewrite | None = None,
                    extra_headers: dict[str, str] | None = None,
                    recorder: Recorder | None = None) -> web.Response:
        """The upstream's status and JSON, to the client (model aliases rewritten back), as
        ``application/json`` whatever the upstream called it: what is decided is the body.
        With a ``recorder``, the response the answer is is recorded before it goes out."""
        upstream, body = await self.read(call)
        obj = self._parsed(upstream, body, whole=rewrite is not None or recorder is not None)
        if recorder is not None:
            await recorder(created_id(obj))
        body, obj = self._without_secrets(body, obj)
        if rewrite is not None:
            rewrite(obj)
            body = _dumps(obj)
        info.usage = usage_of(obj) or info.usage
        info.first_byte = time.monotonic()
        info.bytes_out = len(body)
        return web.Response(status=upstream.status, body=body, content_type="application/json",
                            headers={**response_headers(info), **(extra_headers or {})})

    async def fetch_json(self, call: Awaitable[UpstreamResponse]) -> Any:
        """The upstream's JSON answer, parsed, for answers the gateway reshapes or keeps."""
        upstream, body = await self.read(call)
        obj = self._without_secrets(body, self._parsed(upstream, body, whole=True))[1]
        _dumps(obj)  # the caller re-encodes it: a value too deep for that is the upstream's fault
        return obj

    def _parsed(self, upstream: UpstreamResponse, body: bytes, whole: bool) -> Any:
        """The answer's JSON value (None when it was only validated: a long answer that no
        rewrite needs); an answer that is not JSON fails, as ``not_json``."""
        try:
            if whole or len(body) <= _MAX_USAGE_PARSE or not _valid(body):
                return orjson.loads(body)  # where simdjson refuses, orjson decides
            return None
        except orjson.JSONDecodeError:
            raise not_json(upstream.status, upstream.content_type, body,
                           self.secrets.text) from None

    def _without_secrets(self, body: bytes, obj: Any) -> tuple[bytes, Any]:
        """The answer with every operator secret, and every part of one, taken out of its
        strings (an upstream may echo what it was sent), as bytes and as the parsed value (None
        if not parsed). Looked for in the bytes, and, where escapes could spell it otherwise,
        in the parsed strings."""
        secrets = self.secrets
        if not secrets.probes:
            return body, obj
        try:
            if obj is None and (b"\\" in body or secrets.may_be_in(body)):
                obj = orjson.loads(body)  # a long answer, parsed only where it must be
            if obj is None or not secrets.may_hold(body, obj):
                return body, obj
        except orjson.JSONDecodeError:  # what simdjson took and orjson does not
            raise UpstreamProtocolError("The upstream answered with invalid JSON") from None
        except orjson.JSONEncodeError:
            raise _too_deep() from None
        obj = redact_strings(obj, secrets.text)
        return _dumps(obj), obj

    async def read(self, call: Awaitable[UpstreamResponse]) -> tuple[UpstreamResponse, bytes]:
        """The upstream's whole answer; a status that is not 2xx raises as the gateway's
        error. Tracked, so that a shutdown can end it (``stop``)."""
        stopped = _Stoppable()
        with self.in_flight.track(stopped):
            task = asyncio.ensure_future(self._read(call))
            try:
                await asyncio.wait((task, stopped.future), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not task.done():
                    task.cancel()  # its connection is closed as the task unwinds
                    task.add_done_callback(_retrieve)
            if not task.done() or task.cancelled():
                raise ShuttingDown("The gateway is restarting; retry the request")
            return task.result()

    async def _read(self, call: Awaitable[UpstreamResponse]) -> tuple[UpstreamResponse, bytes]:
        try:
            async with asyncio.timeout(self.timeout):
                upstream = await call
                try:
                    body = await upstream.read_all(self.max_bytes)
                except AnswerTooLarge:
                    raise UpstreamAnswerTooLarge(
                        f"The upstream's answer is longer than the limit of {self.max_bytes} "
                        f"bytes") from None
                except (OSError, InvalidHTTP) as e:
                    raise UpstreamProtocolError(
                        f"The upstream connection broke while reading its answer "
                        f"({type(e).__name__})") from e
                finally:
                    upstream.release()
        except TimeoutError:
            raise UpstreamTimeout(f"The upstream did not answer within "
                                  f"{self.timeout:g} seconds") from None
        if not 200 <= upstream.status < 300:
            raise from_upstream(upstream.status, body, upstream.headers, self.secrets.text)
        return upstream, body


def _valid(body: bytes) -> bool:
    """Whether simdjson reads ``body`` as one JSON value, which it does without building Python
    objects; it also skips a UTF-8 BOM, which a client's parser refuses."""
    if body[:1] == b"\xef":
        return False
    try:
        _VALIDATOR.parse(body)  # the proxy is dropped at once: the parser is free again
    except ValueError:
        return False
    return True


def _dumps(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError:
        raise _too_deep() from None


def _too_deep() -> UpstreamProtocolError:
    """orjson reads 1024 levels of nesting and writes 254: an answer between the two cannot
    be re-encoded, and is refused as malformed (a 502), not left to fail as a bug (a 500)."""
    return UpstreamProtocolError("The upstream answered with JSON nested too deeply")


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # an error after the answer was given up: nobody to tell


class _Stoppable:
    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def stop(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


def json_answer(info: RequestInfo, obj: Any,
                extra_headers: dict[str, str] | None = None) -> web.Response:
    """An answer the gateway built (a model list, a vision fallback's JSON)."""
    return _answer(info, orjson.dumps(obj), "application/json", extra_headers)


def sse_answer(info: RequestInfo, events: list[bytes],
               extra_headers: dict[str, str] | None = None) -> web.Response:
    """A complete event stream, sent at once (the events are already framed)."""
    info.chunks += len(events)
    return _answer(info, b"".join(events), None, {**SSE_HEADERS, **(extra_headers or {})})


def _answer(info: RequestInfo, body: bytes, content_type: str | None,
            headers: dict[str, str] | None) -> web.Response:
    info.first_byte = time.monotonic()
    info.bytes_out += len(body)
    return web.Response(body=body, content_type=content_type,
                        headers={**response_headers(info), **(headers or {})})
