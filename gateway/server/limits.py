"""Limits on client connections, so that the gateway is safe with no proxy in front of it.

nginx's ``client_header_timeout``, ``client_body_timeout``, ``keepalive_timeout`` and
``worker_connections`` are gone when clients connect directly, and aiohttp's server sets no such
limits by itself. ``[server]`` settings, all per process:

=============================  ==================================================================
``header_timeout_seconds``     a request's line and headers must arrive within this time of
                               their first byte; else a 408 and the connection closes (slowloris)
``body_timeout_seconds``       its body, within this time of the end of its headers; else the
                               handler's read fails with aiohttp's 408 (the errors middleware
                               answers it in the error shape) and the connection closes
``keepalive_timeout_seconds``  a connection with no request in progress closes after this; so
                               does a new one that sends nothing, and one that sends a head so
                               slowly that it is not complete by then
``max_connections``            open client connections; one more gets a 503 and is closed at
                               once, until one of them closes
``max_connections_per_address``  open connections from one address (IPv6: one /64), trusted
                               proxies exempt; one more is refused as above, so one host
                               cannot take every slot from the others
=============================  ==================================================================

And every request aiohttp's parser refuses (a NUL or ``\\x0b`` in a header, a bad
``Content-Length``, bytes that are not HTTP) gets a 400 in the error shape that quotes nothing
of the request, logged as one line that names the parser's error class only: aiohttp's own
answer quotes the line it could not parse, ``Authorization: Bearer <key>`` included, to the
client and into the log.

The hot path pays one method call per read: no task, and no timer for a request whose head and
body arrive in one read (nearly every one; nginx sends them so). A timer exists only while a
head or a body is incomplete, at most one per connection.

What this relies on in aiohttp (3.14; ``tests/guarantees/test_server_limits.py`` pins each):

- ``web.Server`` is the protocol factory that the sites hand to ``loop.create_server``: it makes
  a ``RequestHandler(server, loop=..., **kwargs)`` per connection, ``kwargs`` (its private
  ``_kwargs``) being the runner's keywords and the app's ``handler_args``.
  ``GatewayRunner._make_server`` remakes the app's server as a ``GuardedServer`` with the same.
- ``keepalive_timeout``: one timer per connection, armed when it opens and after each response,
  which closes it if the handler is still waiting for a request head when it fires.
- ``RequestHandler._waiter``: the future that ``start()`` awaits for the next request head; it
  is pending exactly while no request is in progress (aiohttp's keep-alive check reads it so).
- ``Server.request_factory`` is handed each request's payload (a ``StreamReader``) before the
  handler runs; ``StreamReader.on_eof`` and ``set_exception`` are public.
- After a response, ``RequestHandler.start`` reads what is left of an unread body for
  ``lingering_time``, and ends that read quietly on a ``TimeoutError``.
- ``RequestHandler.handle_error`` builds the answer to a request the parser refused (400) and
  to a handler failure that escaped the middlewares (500).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import BadHttpMethod
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader

from ..addresses import client_block
from ..errors import GatewayError, InvalidRequest, ServiceUnavailable
from ..settings import ServerSettings
from ..stream.client_stream import response_started

log = logging.getLogger("gateway")

REFUSALS_REPORT_SECONDS = 10.0
"""Connections refused at the cap are logged as one line per this many seconds, with a count."""


class RequestBodyTimeout(web.HTTPRequestTimeout, TimeoutError):
    """What a read of a body that missed ``body_timeout_seconds`` raises.

    An ``HTTPRequestTimeout`` for the handler that was reading it: the errors middleware answers
    it as any aiohttp HTTP error, a 408 in the error shape. A ``TimeoutError`` for aiohttp's
    lingering read after a response given without reading the body, which then ends quietly
    (another exception would be logged with a traceback).
    """


def _raw_response(status_line: str, err: GatewayError, *headers: str) -> bytes:
    """An answer written straight to a transport, where no request object exists."""
    body = err.json_bytes()
    head = [f"HTTP/1.1 {status_line}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", *headers, "Connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _error_body(status: int) -> bytes:
    err = (InvalidRequest("The request is not valid HTTP/1.1 (a malformed or oversized request "
                          "line or header); nothing of it was processed", code="malformed_request")
           if status < 500 else GatewayError("The gateway failed to handle this request"))
    err.status = status
    return err.json_bytes()


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's protocol for one client connection, with the limits above."""

    __slots__ = ("_guard", "_clock", "_counted", "_head_timer", "_body", "_body_timer")

    def __init__(self, guard: GuardedServer, *, loop: asyncio.AbstractEventLoop,
                 **kwargs: Any) -> None:
        super().__init__(guard, loop=loop, **kwargs)
        self._guard = guard
        self._clock = loop
        self._counted: str | None = None  # admitted: its address's block, until lost
        self._head_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        block, refusal = self._guard.admit(peer[0] if isinstance(peer, tuple) else "")
        if refusal is not None:
            # Answered before its request: at the cap, reading it would cost what the cap saves.
            stream = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
            stream.write(refusal)
            stream.close()
            self.force_close()  # anything that still arrives is ignored
            return
        self._counted = block
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted is None:
            return  # refused in connection_made: aiohttp never saw it
        self._guard.release(self._counted)
        self._counted = None
        self._stop_head_timer()
        self._stop_body_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            # No request in progress and bytes came: a head has begun and is not complete.
            if self._head_timer is None:
                self._head_timer = self._clock.call_later(
                    self._guard.limits.header_timeout_seconds, self._head_timed_out)
        elif self._head_timer is not None:  # the head is complete (or refused by the parser)
            self._stop_head_timer()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        waiter = self._waiter
        if waiter is not None and not waiter.done() and self.transport is not None:
            self.transport.write(self._guard.head_timeout_response)
            self.force_close()  # the transport sends the 408, then closes

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def watch_body(self, payload: StreamReader) -> None:
        """Called with each request whose body has not all arrived when its handler starts."""
        self._stop_body_timer()
        self._body = payload
        self._body_timer = self._clock.call_later(self._guard.limits.body_timeout_seconds,
                                                  self._body_timed_out)
        payload.on_eof(self._stop_body_timer)

    def _body_timed_out(self) -> None:
        self._body_timer = None
        payload, self._body = self._body, None
        if payload is not None and not payload.is_eof():
            payload.set_exception(RequestBodyTimeout())
            self.close()  # after the answer: the rest of the body would be read as a request

    def _stop_body_timer(self) -> None:
        self._body = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """The error shape, quoting nothing of the request; ``message`` (the parser's, with the
        line it refused) goes neither to the client nor to the log."""
        if status >= 500:
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
        else:
            # A TLS hello or a scan on a public port is no news: aiohttp logs those at DEBUG too.
            level = logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.INFO
            self.logger.log(level, "Error handling request from %s: %s, answered %d (the "
                            "request is not logged: it may hold a key)", request.remote,
                            type(exc).__name__ if exc is not None else "unknown", status)
        if response_started(request):
            raise ConnectionError("Response is sent already, cannot send another response "
                                  "with the error message")  # as aiohttp's own
        response = web.Response(status=status, body=_error_body(status),
                                content_type="application/json")
        response.force_close()
        return response


RequestFactory = Callable[[RawRequestMessage, StreamReader, web.RequestHandler,
                           AbstractStreamWriter, "asyncio.Task[None]"], web.BaseRequest]
"""What ``web.Server.request_factory`` is (aiohttp's private ``_RequestFactory``)."""


class GuardedServer(web.Server):
    """The app's ``web.Server``, making a ``GuardedRequestHandler`` per connection and counting
    the open ones."""

    def __init__(self, app_server: web.Server, limits: ServerSettings) -> None:
        loop = asyncio.get_running_loop()
        self._handler_kwargs: dict[str, Any] = dict(app_server._kwargs)
        super().__init__(app_server.request_handler, request_factory=app_server.request_factory,
                         handler_cancellation=app_server.handler_cancellation, loop=loop,
                         **self._handler_kwargs)
        self._handler_loop = loop
        self._app_request_factory: RequestFactory = app_server.request_factory
        self.request_factory = self._make_watched_request
        self.limits = limits
        self.open_connections = 0
        self._per_block: dict[str, int] = {}  # open connections per client address block
        self._exempt = frozenset(limits.trusted_proxies)
        self._refused = 0
        self._refusals_reported = -REFUSALS_REPORT_SECONDS
        self.full_response = _raw_response(
            "503 Service Unavailable",
            ServiceUnavailable("The gateway has too many open connections; retry shortly",
                               code="too_many_connections"),
            "Retry-After: 1")
        self.address_full_response = _raw_response(
            "503 Service Unavailable",
            ServiceUnavailable("Too many open connections from this address; close some or "
                               "retry shortly", code="too_many_connections"),
            "Retry-After: 1")
        self.head_timeout_response = _raw_response(
            "408 Request Timeout",
            InvalidRequest(f"The request headers did not arrive within "
                           f"{limits.header_timeout_seconds:g}s", code="request_timeout"))

    def __call__(self) -> GuardedRequestHandler:
        return GuardedRequestHandler(self, loop=self._handler_loop, **self._handler_kwargs)

    def _make_watched_request(self, message: RawRequestMessage, payload: StreamReader,
                              protocol: web.RequestHandler, writer: AbstractStreamWriter,
                              task: asyncio.Task[None]) -> web.BaseRequest:
        request = self._app_request_factory(message, payload, protocol, writer, task)
        if not payload.is_eof() and isinstance(protocol, GuardedRequestHandler):
            protocol.watch_body(payload)
        return request

    def admit(self, address: str) -> tuple[str, bytes | None]:
        """Count one more open connection from ``address``: (its block, None), or (its block,
        the answer that refuses it) past ``max_connections`` or the address's share."""
        block = client_block(address)
        held = self._per_block.get(block, 0)
        if self.open_connections >= self.limits.max_connections:
            return block, self._refuse(self.full_response, "max_connections")
        if held >= self.limits.max_connections_per_address and address not in self._exempt:
            return block, self._refuse(self.address_full_response, "max_connections_per_address")
        self.open_connections += 1
        self._per_block[block] = held + 1
        return block, None

    def _refuse(self, answer: bytes, limit: str) -> bytes:
        self._refused += 1
        now = self._handler_loop.time()
        if now - self._refusals_reported >= REFUSALS_REPORT_SECONDS:
            log.warning("%d open client connections ([server] %s reached): refused %d new "
                        "connections with 503 since the last report", self.open_connections,
                        limit, self._refused)
            self._refused, self._refusals_reported = 0, now
        return answer

    def release(self, block: str) -> None:
        self.open_connections -= 1
        held = self._per_block[block] - 1
        if held:
            self._per_block[block] = held
        else:
            del self._per_block[block]


class GatewayRunner(web.AppRunner):
    """How the gateway is served, by ``gateway serve`` and by the tests alike: an ``AppRunner``
    whose server is a ``GuardedServer``, with handler cancellation on (a client that leaves
    cancels its request) and aiohttp's access log off (the gateway writes its own)."""

    __slots__ = ("_limits",)

    def __init__(self, app: web.Application, limits: ServerSettings, **kwargs: Any) -> None:
        super().__init__(app, handler_cancellation=True, access_log=None,
                         keepalive_timeout=limits.keepalive_timeout_seconds, **kwargs)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        return GuardedServer(await super()._make_server(), self._limits)


def raise_open_file_limit(max_connections: int) -> None:
    """Let the process open the descriptors that ``max_connections`` needs.

    Each client connection is one, and a request in flight holds an upstream connection too.
    With too few allowed, ``accept`` fails (EMFILE) before the cap is reached, and asyncio stops
    accepting for a second at a time, for everyone. The soft limit is raised towards two per
    connection, as far as the hard limit allows; below one per connection (the cap itself out
    of reach) a warning says so.
    """
    wanted, needed = 2 * max_connections + 256, max_connections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        target = soft
    if target < needed:
        log.warning("open-file limit %d is below the %d that [server] max_connections = %d "
                    "needs; raise it (systemd: LimitNOFILE) or lower max_connections",
                    target, needed, max_connections)
