"""The byte path: upstream response in, client response out.

``relay_stream`` forwards Server-Sent Events as they arrive, one write per upstream read. Events
already in the one-line form pass as the very bytes the upstream sent; only events that must
change (multi-line JSON, CR line endings, upstream error objects, model aliases) are re-encoded.
Every event's JSON is validated, so a malformed event ends the stream with an error frame
instead of reaching the client. The common case, a read that completes a run of one-line
``data:`` events, is forwarded whole after one simdjson pass (``_render_simple``); anything else
goes event by event (``_render``).

All of that runs inside the upstream socket's read callback (``http1.UpstreamResponse.stream``),
which writes straight to the client's transport, in HTTP/1.1 chunks framed here: no task switch
and no coroutine per chunk, the cost that dominated a relay built on aiohttp's client and
``StreamResponse.write``. The handler's task only waits for the stream's end. The relay never
holds more than one incomplete event; when the client's transport pauses writing (its buffer is
past the high-water mark, 64 KB), the upstream socket stops being read until it drains, so a
slow client slows the upstream.

Response headers wait for the upstream's, so an upstream error keeps its true status. Only if
the upstream is silent for one keep-alive interval does the gateway commit ``200`` and start
writing ``: keep-alive`` comments; from then on errors can only be SSE frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import simdjson
from aiohttp import HttpVersion11, web

from .appkeys import IN_FLIGHT, METRICS, REQUEST_INFO, SETTINGS, UPSTREAM
from .errors import (
    SSE_HEADERS,
    GatewayError,
    ShuttingDown,
    UpstreamFailure,
    UpstreamProtocolError,
    UpstreamTimeout,
    from_upstream,
    redact,
)
from .http1 import InvalidHTTP, UpstreamResponse
from .request_info import RequestInfo
from .sse import (
    DONE,
    KEEPALIVE,
    Event,
    SSEFramer,
    SSEProtocolError,
    encode_event,
    one_line_data_payloads,
)

log = logging.getLogger("gateway.relay")

Rewrite = Callable[[Any], Any]
"""Changes a parsed response object in place (model aliases); None when nothing changes."""

_MAX_ERROR_BODY = 64 * 1024
_DONE_EVENT = b"data: " + DONE + b"\n\n"
_AFTER_DONE = b"\n\n" + _DONE_EVENT
_MAX_USAGE_PARSE = 1024 * 1024
_RESPONSES_TERMINAL = (b"response.completed", b"response.failed", b"response.incomplete",
                       b"error")
_RESPONSES_FAILED = (b"response.failed", b"error")

UpstreamCall = Awaitable[UpstreamResponse]


def response_headers(info: RequestInfo) -> dict[str, str]:
    return {"X-Request-ID": info.request_id, **info.limit_headers}


async def relay_json(request: web.Request, upstream_call: UpstreamCall,
                     rewrite: Rewrite | None = None,
                     extra_headers: dict[str, str] | None = None) -> web.Response:
    """Forward a plain (non-streamed) request; the upstream's status and JSON come back."""
    info = request[REQUEST_INFO]
    upstream, body = await _read_answer(request, upstream_call)
    obj = None
    if rewrite is not None:
        obj = _answer_json(body)
        rewrite(obj)
        body = orjson.dumps(obj)
    _note_usage(info, body, obj)
    info.first_byte = asyncio.get_running_loop().time()
    info.bytes_out = len(body)
    return web.Response(status=upstream.status, body=body,
                        content_type=upstream.content_type or "application/json",
                        headers={**response_headers(info), **(extra_headers or {})})


async def fetch_json(request: web.Request,
                     upstream_call: UpstreamCall) -> Any:
    """The upstream's complete JSON answer, parsed, for answers the gateway reshapes (the vision
    stream fallback) or keeps (the model list). Upstream errors raise as in ``relay_json``."""
    _, body = await _read_answer(request, upstream_call)
    return _answer_json(body)


def _answer_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError("The upstream answered with invalid JSON") from None


def _note_usage(info: RequestInfo, body: bytes, obj: Any) -> None:
    """Token counts of a plain answer, for the access log and metrics (streams take them from
    their usage chunk). Parsed only when the answer has them and is small."""
    if obj is None:
        if len(body) > _MAX_USAGE_PARSE or b'"usage"' not in body:
            return
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
    usage = obj.get("usage") if isinstance(obj, dict) else None
    if isinstance(usage, dict):
        info.usage = usage


class _PlainRequest:
    __slots__ = ("shutdown",)

    def __init__(self) -> None:
        self.shutdown = False  # set by InFlight before it cancels us


async def _read_answer(request: web.Request, upstream_call: UpstreamCall
                       ) -> tuple[UpstreamResponse, bytes]:
    """Await the upstream's whole answer; an error status raises as the gateway's error.

    Tracked like a stream: at shutdown, past the drain time, the client gets 503
    ``gateway_restarting`` (nothing was sent yet, so the status can still say so).
    """
    plain = _PlainRequest()
    with request.app[IN_FLIGHT].track(plain):
        try:
            return await _await_answer(request, upstream_call)
        except asyncio.CancelledError:
            if not plain.shutdown:
                raise
            _uncancel()
            raise ShuttingDown("The gateway is restarting; retry the request") from None


def _uncancel() -> None:
    """Undo the shutdown's cancellation: the request still has to be answered."""
    current = asyncio.current_task()
    if current is not None:
        current.uncancel()


async def _await_answer(request: web.Request, upstream_call: UpstreamCall
                        ) -> tuple[UpstreamResponse, bytes]:
    settings = request.app[SETTINGS].stream
    try:
        async with asyncio.timeout(settings.first_byte_timeout_seconds):
            upstream = await upstream_call
            try:
                body = await upstream.read()
            except (OSError, InvalidHTTP) as e:
                raise UpstreamProtocolError(
                    f"The upstream connection broke while reading its answer "
                    f"({type(e).__name__})") from e
            finally:
                upstream.release()
    except TimeoutError:
        raise UpstreamTimeout(f"The upstream did not answer within "
                              f"{settings.first_byte_timeout_seconds:g} seconds") from None
    if upstream.status >= 400:
        raise from_upstream(upstream.status, body, upstream.headers,
                            request.app[UPSTREAM].secrets)
    return upstream, body


class StreamDialect:
    """How one API marks the end of a stream and an error inside it."""

    responses_api = False

    def is_terminal(self, event: Event, data: bytes | None) -> bool:
        return data == DONE

    def error_frame(self, err: GatewayError, seq: int) -> bytes:
        return err.sse_frame()


class ResponsesDialect(StreamDialect):
    """The Responses API ends with a named terminal event and has its own error event."""

    responses_api = True

    def is_terminal(self, event: Event, data: bytes | None) -> bool:
        name = event.event
        return name is not None and name in _RESPONSES_TERMINAL

    def error_frame(self, err: GatewayError, seq: int) -> bytes:
        return err.response_error_frame(seq)


CHAT = StreamDialect()
RESPONSES = ResponsesDialect()


async def relay_stream(request: web.Request,
                       upstream_call: UpstreamCall, *,
                       rewrite: Rewrite | None = None,
                       dialect: StreamDialect = CHAT) -> web.StreamResponse:
    """Relay an upstream event stream to the client; see the module docstring."""
    relay = _StreamRelay(request, rewrite, dialect)
    open_streams = request.app[METRICS].open_streams
    open_streams.inc()
    try:
        with request.app[IN_FLIGHT].track(relay):
            return await relay.run(upstream_call)
    finally:
        open_streams.dec()


class _StreamRelay:
    __slots__ = ("request", "info", "settings", "rewrite", "dialect", "response", "seq",
                 "shutdown", "loop", "transport", "protocol", "chunked", "upstream", "framer",
                 "simple", "finished", "upstream_end", "watchdog", "paused", "drainer")

    def __init__(self, request: web.Request, rewrite: Rewrite | None,
                 dialect: StreamDialect) -> None:
        self.request = request
        self.info = request[REQUEST_INFO]
        self.settings = request.app[SETTINGS].stream
        self.rewrite = rewrite
        self.dialect = dialect
        self.response: web.StreamResponse | None = None
        self.seq = 0
        self.shutdown = False  # set by InFlight before it cancels us
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.protocol: web.RequestHandler | None = None  # its writing_paused
        self.chunked = False
        self.upstream: UpstreamResponse | None = None
        self.framer = SSEFramer(self.settings.max_event_bytes)
        self.simple = rewrite is None and not dialect.responses_api
        self.finished: asyncio.Future[None] = self.loop.create_future()
        self.upstream_end: asyncio.Future[BaseException | None] = self.loop.create_future()
        self.watchdog: _Watchdog | None = None
        self.paused = False  # the client's send buffer is full: the upstream is not read
        self.drainer: asyncio.Task[None] | None = None  # waits for it to drain

    async def run(self, upstream_call: UpstreamCall) -> web.StreamResponse:
        info = self.info
        task: asyncio.Future[UpstreamResponse] = asyncio.ensure_future(upstream_call)
        upstream: UpstreamResponse | None = None
        clean = False
        try:
            upstream = await self._await_headers(task)
            if upstream.status >= 400:
                try:  # an error's body follows its headers at once, or is not waited for
                    async with asyncio.timeout(self.settings.keepalive_seconds):
                        body = await upstream.read(_MAX_ERROR_BODY)
                except (OSError, InvalidHTTP):  # TimeoutError is an OSError
                    body = b""
                raise from_upstream(upstream.status, body, upstream.headers,
                                    self.request.app[UPSTREAM].secrets)
            if self.response is None:
                await self._start()
            clean = await self._pump(upstream)
        except GatewayError as err:
            if isinstance(err, UpstreamFailure):
                log.warning("request %s: upstream %s: %s", info.request_id, err.kind, err.message)
            if self.response is None:
                raise  # nothing sent yet: the error middleware answers with the true status
            await self._end_with(err)
        except SSEProtocolError as e:
            log.warning("request %s: upstream bad_stream: %s", info.request_id, e)
            await self._end_with(UpstreamProtocolError(f"The upstream stream was malformed: {e}"))
        except ConnectionResetError:
            info.outcome = "client_disconnect"  # a write found the client gone
        except asyncio.CancelledError:
            if not self.shutdown:
                info.outcome = info.outcome or "client_disconnect"
                raise
            # Graceful shutdown ran out of drain time: tell the client why the stream ends.
            _uncancel()
            restarting = ShuttingDown("The gateway is restarting; retry the request")
            if self.response is None:
                raise restarting from None  # still waiting for the upstream: a true 503
            await self._end_with(restarting)
        except Exception:
            if self.response is None:
                raise  # nothing sent yet: the errors middleware answers a plain 500
            # A bug, after headers: no second response can follow the first (the client would
            # wait on a broken stream), so this one ends with the generic error frame.
            log.exception("request %s: the relay failed", info.request_id)
            await self._end_with(GatewayError("The gateway failed to handle this request"))
        finally:
            if self.watchdog is not None:
                self.watchdog.cancel()
            if self.drainer is not None:
                self.drainer.cancel()
            _dispose(task, upstream, clean)
        assert self.response is not None
        return self.response

    async def _await_headers(self, task: asyncio.Future[UpstreamResponse]
                             ) -> UpstreamResponse:
        """Wait for the upstream's headers; past one keep-alive interval, commit and ping."""
        keepalive = self.settings.keepalive_seconds
        limit = self.settings.first_byte_timeout_seconds
        waited = 0.0
        while True:
            wait = min(keepalive, limit - waited)
            done, _ = await asyncio.wait((task,), timeout=wait)
            if done:
                return task.result()
            waited += wait
            if waited >= limit:
                raise UpstreamTimeout(f"The upstream did not answer within {limit:g} seconds")
            if self.response is None:
                await self._start()
            self._send(KEEPALIVE)

    async def _start(self) -> None:
        response = web.StreamResponse(status=200, headers={**SSE_HEADERS,
                                                           **response_headers(self.info)})
        # HTTP/1.1 chunks are framed by _send; an HTTP/1.0 client reads to the connection's end.
        self.chunked = self.request.version >= HttpVersion11
        if self.chunked:
            response.enable_chunked_encoding()
        await response.prepare(self.request)
        self.response = response
        self.transport = self.request.transport
        self.protocol = self.request.protocol  # a property call: looked up once, not per chunk
        self.info.status = 200

    def _send(self, data: bytes) -> None:
        """Write to the client now; ConnectionResetError when it is gone."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)

    async def _end_with(self, err: GatewayError) -> None:
        """After headers: the error becomes the stream's last event."""
        self.info.note_error(err)
        try:
            self._send(self.dialect.error_frame(err, self.seq))
            assert self.response is not None
            await self.response.write_eof()
        except ConnectionResetError:
            pass

    async def _pump(self, upstream: UpstreamResponse) -> bool:
        """Relay events until the terminal one; True when the upstream ended cleanly.

        The work happens in ``_on_data`` and ``_on_end``, called from the upstream's read
        callback; this task waits for ``finished``, which holds the stream's failure if any.
        """
        self.upstream = upstream
        self.watchdog = _Watchdog(self)
        upstream.stream(self._on_data, self._on_end)
        try:
            await self.finished
        finally:
            self.watchdog.cancel()  # no keep-alive may follow the last event or error frame
        assert self.response is not None
        await self.response.write_eof()
        self.info.outcome = "completed"  # whatever happens while draining the rest
        if not self.upstream_end.done():  # usually the answer's end came with the last event
            try:
                async with asyncio.timeout(self.settings.keepalive_seconds):
                    await self.upstream_end
            except TimeoutError:
                return False
        return self.upstream_end.result() is None

    def _finish(self, failure: BaseException | None = None) -> None:
        """The stream is over: the terminal event went out, or ``failure`` ends it."""
        if self.finished.done():
            return
        if failure is None:
            self.finished.set_result(None)
        else:
            self.finished.set_exception(failure)
        if self.paused and self.upstream is not None:
            self.paused = False
            self.upstream.resume_reading()  # what follows is drained, unread

    def _on_data(self, chunk: bytes) -> None:
        if self.finished.done():
            return  # after the terminal event: drained so the connection can be reused
        assert self.watchdog is not None
        self.watchdog.last = self.loop.time()
        try:
            self._relay(chunk)
        except Exception as e:  # noqa: BLE001 (handed to the task, which decides)
            self._finish(e)

    def _on_end(self, error: BaseException | None) -> None:
        if not self.upstream_end.done():
            self.upstream_end.set_result(error)
        if self.finished.done():
            return
        if error is not None:
            self._finish(UpstreamProtocolError(
                f"The upstream connection broke mid-stream ({type(error).__name__})"))
            return
        try:
            self._relay(b"")
        except Exception as e:  # noqa: BLE001
            self._finish(e)

    def _relay(self, chunk: bytes) -> None:
        """Frame, check and send one upstream read (``b""``: the upstream's end)."""
        framer = self.framer
        if self.simple and chunk[-2:] == b"\n\n" and chunk.find(b"\n") == len(chunk) - 2 \
                and chunk[:6] == b"data: " and b"\r" not in chunk and framer.idle \
                and len(chunk) <= framer.max_event_bytes \
                and (fast := self._render_one(chunk)) is not None:
            out, done, failure = fast  # the common read: one one-line event, nothing held
        elif chunk:
            region = framer.take(chunk)
            held = framer.held_events()
            fast = None
            if region and self.simple and framer.clean and not held \
                    and len(region) <= framer.max_event_bytes \
                    and (payloads := one_line_data_payloads(region)):
                fast = self._render_simple(region, *payloads)
            if fast is not None:
                out, done, failure = fast
            else:
                events = framer.split(region) + held if region else held
                if not events:
                    return
                out, done, failure = self._render(
                    events, region if framer.clean and not held else None)
        else:
            out, done, failure = self._render(framer.close(), None)
        if out:
            if self.info.first_byte is None:
                self.info.first_byte = self.loop.time()
            self._send(out)
            if not self.paused and self.protocol is not None and self.protocol.writing_paused:
                self._pause()
        if failure is not None:
            raise failure
        if done:
            self._finish()
        elif not chunk:
            raise UpstreamProtocolError("The upstream stream ended before it was complete")

    def _pause(self) -> None:
        """A slow client: stop reading the upstream until the client's buffer drains."""
        assert self.upstream is not None
        self.paused = True
        self.upstream.pause_reading()
        self.drainer = self.loop.create_task(self._resume_when_drained())

    async def _resume_when_drained(self) -> None:
        try:
            await self.request.writer.drain()
        except ConnectionError:
            self._finish(ConnectionResetError("the client closed the connection"))
            return
        if self.paused and self.upstream is not None:
            self.paused = False
            self.upstream.resume_reading()

    def _render_one(self, event: bytes) -> tuple[bytes, bool, GatewayError | None] | None:
        """``_render_simple`` for a read that is exactly one one-line ``data:`` event."""
        data = event[6:-2]
        info = self.info
        if data != DONE:
            if b'"error"' in data or not _is_json(data):
                return None
            if b'"usage"' in data:
                usage = orjson.loads(data).get("usage")
                if isinstance(usage, dict):
                    info.usage = usage
            self.seq += 1
        info.chunks += 1
        info.bytes_out += len(event)
        return event, data == DONE, None

    def _render_simple(self, region: bytes, joined: bytes, n: int
                       ) -> tuple[bytes, bool, GatewayError | None] | None:
        """The fast path for a region of ``n`` one-line ``data:`` events (no alias, chat),
        whose payloads ``joined`` holds comma-separated: the region goes out as it is. All its
        events' JSON is validated in one simdjson pass over ``[A,B,...]``; the element count
        must match the event count, so an event holding ``{},{}`` cannot slip through. None
        when anything is unusual (a bad event, an ``"error"`` key, ``[DONE]`` anywhere but
        last: it is not JSON): the exact per-event path then decides.
        """
        done = region == _DONE_EVENT or region.endswith(_AFTER_DONE)  # an event of its own
        k = n - 1 if done else n  # events before [DONE]
        if k:
            if done:
                joined = joined[:-len(DONE) - 1]
            if b'"error"' in joined:
                return None
            if _count_json_values(b"[" + joined + b"]") != k:
                return None
            usage_at = region.rfind(b'"usage"')
            if usage_at != -1:
                start = region.rfind(b"\n\ndata: ", 0, usage_at)
                end = region.find(b"\n\n", usage_at)
                obj = orjson.loads(region[start + 8 if start != -1 else 6:end])
                usage = obj.get("usage") if isinstance(obj, dict) else None
                if isinstance(usage, dict):
                    self.info.usage = usage
        self.seq += k
        self.info.chunks += n
        self.info.bytes_out += len(region)
        return region, done, None

    def _render(self, events: list[Event], whole: bytes | None
                ) -> tuple[bytes, bool, GatewayError | None]:
        """The bytes to send for these events; whether the terminal event was among them; and
        the failure that ends the stream, if one was (the events before it are still sent).

        ``whole`` is the region of upstream bytes that held exactly these events: if they all
        pass verbatim, it is sent as it is, with no join.
        """
        info = self.info
        dialect = self.dialect
        rewrite = self.rewrite
        parts: list[bytes] = []
        verbatim = 0
        terminal = False
        failure: GatewayError | None = None
        for ev in events:
            data = ev.data
            if dialect.is_terminal(ev, data):
                parts.append(self._terminal_bytes(ev, data))
                info.chunks += 1
                terminal = True
                break
            if data is None:
                if ev.raw[:1] != b":":
                    # Fields but no data (an event name, an id): nothing this API sends, and
                    # the mark of a data line merged into another field by broken framing.
                    failure = UpstreamProtocolError(
                        "The upstream stream was malformed: an event without data")
                    break
                parts.append(ev.raw)  # a comment: an upstream's own keep-alive
                continue
            try:
                parts.append(self._event_bytes(ev, data))
            except GatewayError as err:
                failure = err
                break
            except SSEProtocolError as e:
                failure = UpstreamProtocolError(f"The upstream stream was malformed: {e}")
                break
            verbatim += ev.verbatim and rewrite is None
            info.chunks += 1
            self.seq += 1  # events sent: a Responses error event continues their numbering
        if whole is not None and verbatim == len(events):
            out = whole
        else:
            out = b"".join(parts)
        info.bytes_out += len(out)
        return out, terminal, failure

    def _terminal_bytes(self, ev: Event, data: bytes | None) -> bytes:
        """The last event as it goes out: as it came, unless a model alias must be rewritten
        (the Responses API's ``response.completed`` names the model too). A Responses stream
        reports its usage only there, inside ``response``: noted for the log and metrics."""
        if self.dialect.responses_api and data is not None and b'"usage"' in data:
            with contextlib.suppress(orjson.JSONDecodeError):
                event = orjson.loads(data)
                answer = event.get("response") if isinstance(event, dict) else None
                usage = answer.get("usage") if isinstance(answer, dict) else None
                if isinstance(usage, dict):
                    self.info.usage = usage
        if self.rewrite is not None and data is not None and data != DONE:
            obj = _json(data)
            self.rewrite(obj)
            return encode_event(ev, obj)
        if self.dialect.responses_api and data is not None and ev.event in _RESPONSES_FAILED:
            return self._redacted(ev, data)
        return ev.raw if ev.verbatim else encode_event(ev)

    def _redacted(self, ev: Event, data: bytes) -> bytes:
        """A Responses API failure event, relayed as it is, but with any credential in its
        message taken out (the chat dialect's error objects become the gateway's own frame)."""
        text = data.decode("utf-8", "replace")
        clean = redact(text, self.request.app[UPSTREAM].secrets)
        if clean == text:
            return ev.raw if ev.verbatim else encode_event(ev)
        try:
            return encode_event(ev, orjson.loads(clean))
        except orjson.JSONDecodeError:  # a secret with JSON syntax in it: say nothing of it
            return self.dialect.error_frame(UpstreamFailure("The upstream reported an error"),
                                            self.seq)

    def _event_bytes(self, ev: Event, data: bytes) -> bytes:
        """One data event as it goes out. Every event's JSON is parsed (orjson: about a
        microsecond), so a malformed event or an upstream error object ends the stream with a
        proper error frame instead of reaching the client as it is."""
        if data == DONE:
            return ev.raw if ev.verbatim else encode_event(ev)
        obj = _json(data)
        if isinstance(obj, dict):
            if not self.dialect.responses_api and obj.get("error") is not None:
                raise _upstream_stream_error(obj["error"], self.request.app[UPSTREAM].secrets)
            usage = obj.get("usage")
            if usage is not None and isinstance(usage, dict):
                self.info.usage = usage
            if self.rewrite is not None:
                self.rewrite(obj)
                return encode_event(ev, obj)
        if ev.verbatim:
            return ev.raw
        return encode_event(ev, obj)


_VALIDATOR = simdjson.Parser()


def _is_json(data: bytes) -> bool:
    """Whether ``data`` is one valid JSON value (UTF-8 included), checked by simdjson."""
    try:
        _VALIDATOR.parse(data)  # its document proxy is dropped at once: the parser is reused
    except ValueError:
        return False
    return True


def _count_json_values(array: bytes) -> int | None:
    """The length of a JSON array, or None if it is not valid JSON (UTF-8 included).

    simdjson validates without building Python objects: about 0.13 us an event against
    orjson's 1 us, which is most of the relay's cost when events come in bursts.
    """
    try:
        doc = _VALIDATOR.parse(array)
    except ValueError:
        return None
    try:
        return len(doc) if isinstance(doc, simdjson.Array) else None
    finally:
        del doc  # the parser is reused: no proxy into its document may outlive this call


def _json(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise SSEProtocolError("an event's data is not valid JSON") from None


def _upstream_stream_error(err: Any, secrets: tuple[str, ...]) -> UpstreamFailure:
    """An error object (or, from some providers, a bare string) sent inside the stream; its
    message redacted as an error status's is (``errors.from_upstream``)."""
    if isinstance(err, dict):
        message = str(err.get("message") or "The upstream reported an error")
        failure = UpstreamFailure(f"Upstream error: {redact(message, secrets)}")
        if isinstance(err.get("code"), str):
            failure.code = err["code"]
        return failure
    return UpstreamFailure(f"Upstream error: {redact(str(err), secrets)}")


class _Watchdog:
    """One timer per stream for upstream silence, instead of a timeout around every read.

    The read callback only stamps ``last``. When the upstream has been silent for a keep-alive
    interval, the timer writes a ``: keep-alive`` comment (each relay write is one whole batch
    of events, so a comment can only land between events); when the silence reaches the
    first-byte or idle limit, it ends the stream with ``UpstreamTimeout``. A stream paused for
    a slow client is not silent.
    """

    __slots__ = ("relay", "loop", "last", "handle", "interval")

    def __init__(self, relay: _StreamRelay) -> None:
        self.relay = relay
        self.loop = relay.loop
        self.interval = relay.settings.keepalive_seconds
        self.last = self.loop.time()
        self.handle: asyncio.TimerHandle | None = self.loop.call_at(self.last + self.interval,
                                                                    self._tick)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _tick(self) -> None:
        relay = self.relay
        now = self.loop.time()
        silent = now - self.last
        if relay.paused or silent < self.interval:
            self.handle = self.loop.call_at(max(now, self.last) + self.interval, self._tick)
            return
        settings = relay.settings
        limit = (settings.idle_timeout_seconds if relay.info.first_byte is not None
                 else settings.first_byte_timeout_seconds)
        if silent >= limit:
            self.handle = None
            relay._finish(UpstreamTimeout(f"The upstream sent nothing for {silent:.3g} seconds"))
            return
        try:
            relay._send(KEEPALIVE)
        except ConnectionResetError as e:
            self.handle = None
            relay._finish(e)
            return
        self.handle = self.loop.call_at(now + min(self.interval, limit - silent), self._tick)


def _dispose(task: asyncio.Future[UpstreamResponse],
             upstream: UpstreamResponse | None, clean: bool) -> None:
    """Release the upstream connection; close it (so the upstream sees the end) unless clean."""
    if not task.done():
        task.add_done_callback(_close_late_response)
        task.cancel()
    elif upstream is None:
        _close_late_response(task)  # it answered just as the relay gave up waiting
    if upstream is not None:
        if clean:
            upstream.release()
        else:
            upstream.close()


def _close_late_response(task: asyncio.Future[UpstreamResponse]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()
