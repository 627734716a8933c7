"""HTTP/1.1 to the upstream: keep-alive connections on asyncio protocols, parsed by httptools.

Why not aiohttp's client: it hands every read of a response body to a task through a
``StreamReader``, so each streamed chunk costs a task switch and a coroutine resume, which was
most of the relay's CPU (``scripts/bench.py``: a pass-through built this way costs 1.3 ms of
CPU per 50-chunk stream against 2.1 ms for the same on ``ClientSession``). Here the body is
delivered from the read callback itself: ``UpstreamResponse.stream`` hands each read's body to
the relay as one piece (one render and one client write a read), written out before it returns.
httptools is llhttp (Node's parser, as used by uvicorn): chunked bodies, lengths and errors are
decoded in C.

The upstream is always asked for an identity encoding (``UpstreamClient``): an answer that is
compressed anyway is refused, never relayed as bytes no client expects. Connections are opened
with Happy Eyeballs (RFC 8305, aiohappyeyeballs, as aiohttp does): a host whose IPv6 route is
broken costs 0.25 s, not the connect timeout.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

import aiohappyeyeballs
import httptools
from multidict import CIMultiDict, CIMultiDictProxy

_MAX_HEAD_BYTES = 64 * 1024
_NO_BODY_STATUSES = frozenset((204, 304))
_DNS_SECONDS = 60.0  # how long the upstream host's addresses are reused


class InvalidHTTP(Exception):
    """The upstream's answer is not HTTP (garbage, a bad status line, oversized headers)."""


class ConnectionLost(ConnectionError):
    """The connection ended before the answer was complete."""


class AnswerTooLarge(Exception):
    """The answer's body is longer than the reader allowed (``UpstreamResponse.read_all``)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"the answer is longer than {max_bytes} bytes")


DataSink = Callable[[bytes], None]
EndSink = Callable[[BaseException | None], None]


class UpstreamResponse:
    """One answer. Its body is either read whole (``read``; ``read_all`` up to a cap) or
    streamed (``stream``).

    The caller owns it and ends it with ``release`` (the connection goes back to the pool when
    the answer was read to its end) or ``close``.
    """

    __slots__ = ("status", "headers", "_conn", "_chunks", "_size", "_limit", "_max", "_waiter",
                 "_on_data", "_on_end", "complete", "error")

    def __init__(self, conn: _Connection) -> None:
        self.status = 0
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
        self._conn: _Connection | None = conn
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit: int | None = None
        self._max: int | None = None  # read_all's cap: past it, nothing more is kept
        self._waiter: asyncio.Future[None] | None = None
        self._on_data: DataSink | None = None  # once streamed: where each read's body goes
        self._on_end: EndSink | None = None
        self.complete = False
        self.error: BaseException | None = None

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body, or its first ``limit`` bytes (the rest is not waited for)."""
        if not self.complete and self.error is None and (limit is None or self._size < limit):
            self._limit = limit
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.error is not None:
            raise self.error
        body = b"".join(self._chunks)
        return body if limit is None else body[:limit]

    async def read_all(self, max_bytes: int) -> bytes:
        """The whole body, if it is at most ``max_bytes`` long; else ``AnswerTooLarge``, as
        soon as it is known (``Content-Length``, or the bytes received passing the cap). The
        connection is closed then: nothing past the cap is buffered, however long the answer."""
        length = self.headers.get("Content-Length", "")
        if (length.isdigit() and (len(length) > 18 or int(length) > max_bytes)) \
                or self._size > max_bytes:
            self._chunks.clear()
            self.close()
            raise AnswerTooLarge(max_bytes)
        self._max = max_bytes
        return await self.read()

    def stream(self, on_data: DataSink, on_end: EndSink) -> None:
        """Hand ``on_data`` what each read brings of the body (what already arrived goes at
        once), then call ``on_end`` with None at the answer's end or with the error that broke
        it. Both run inside the socket's read callback: they must not block or raise."""
        self._on_data = on_data
        self._pass_on()
        if self.complete or self.error is not None:
            on_end(self.error)
            return
        self._on_end = on_end

    def pause_reading(self) -> None:
        """Stop reading the socket (a slow client): the upstream's sends then block in turn."""
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.resume_reading()

    def release(self) -> None:
        """Give the connection back for reuse if the answer was read to its end, else close it."""
        self._let_go(reusable=self.complete and self.error is None)

    def close(self) -> None:
        """Close the connection, so the upstream sees the request end."""
        self._let_go(reusable=False)

    def _let_go(self, reusable: bool) -> None:
        conn, self._conn = self._conn, None
        self._on_data = self._on_end = None
        if conn is not None:
            conn.done(reusable)

    # Called by the connection.

    def _pass_on(self) -> None:
        """A read's body, to ``on_data`` as one piece however many HTTP chunks it holds."""
        if self._on_data is not None and self._chunks:
            data = b"".join(self._chunks)  # of one piece, that very piece
            self._chunks.clear()
            self._on_data(data)

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._max is not None and self._size > self._max:
            self._overflow(self._max)
        elif self._limit is not None and self._size >= self._limit:
            self._wake()

    def _overflow(self, max_bytes: int) -> None:
        """Past ``read_all``'s cap: drop what was kept, fail the read, close the connection
        (from inside the parser's callback too: what the parser still holds goes nowhere, as
        the connection no longer has a response to hand it to)."""
        self._chunks.clear()
        self._end(AnswerTooLarge(max_bytes))
        self.close()

    def _end(self, error: BaseException | None) -> None:
        if self.complete or self.error is not None:
            return
        self._pass_on()  # the body's last bytes before its end
        if error is None:
            self.complete = True
        else:
            self.error = error
        self._on_data = None
        self._wake()
        if self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            on_end(error)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; it carries one request at a time."""

    # The request in flight (set by ``send``).
    parser: httptools.HttpResponseParser
    header_list: list[tuple[str, str]]
    head_bytes: int  # read while the headers are incomplete
    header_bytes: int  # in the headers themselves
    until_close: bool  # a body without length or chunking: it ends with the socket
    informational: bool  # a 1xx answer (103 Early Hints) came first: the real one follows

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self.head: asyncio.Future[UpstreamResponse] | None = None  # until the headers are in
        self.idle_since = 0.0

    def send(self, request: bytes) -> asyncio.Future[UpstreamResponse]:
        assert self.transport is not None
        self.parser = httptools.HttpResponseParser(self)
        self.header_list = []
        self.head_bytes = self.header_bytes = 0
        self.until_close = self.informational = False
        self.response = UpstreamResponse(self)
        self.head = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.head

    def done(self, reusable: bool) -> None:
        """The response's owner is finished with it."""
        self.response = None
        if reusable and self.transport is not None and not self.transport.is_closing():
            self.pool.put(self)
        else:
            self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
            self.transport = None
        self.pool.forget(self)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.head is not None:
            self.head_bytes += len(data)
        elif self.response is None:
            self.abort()  # bytes nobody asked for: the connection is not reusable
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(InvalidHTTP(str(e) or type(e).__name__))  # the body before it goes first
        except httptools.HttpParserUpgrade:
            self._fail(InvalidHTTP("an upgrade answer"))
        if self.response is not None:
            self.response._pass_on()
        if self.head is not None and self.head_bytes > _MAX_HEAD_BYTES:
            self._fail(InvalidHTTP(f"headers over {_MAX_HEAD_BYTES} bytes"))

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pool.forget(self)
        if self.head is not None or self.response is not None:
            if self.until_close and self.head is None and exc is None:
                self._end(None)
            else:
                self._fail(ConnectionLost(
                    "the upstream closed the connection" + (f" ({exc})" if exc else "")))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        self.header_list.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        response, head = self.response, self.head
        if response is None or head is None:  # a second answer after the first one
            self._fail(InvalidHTTP("an answer nobody asked for"))
            return
        if self.header_bytes > _MAX_HEAD_BYTES:
            self._fail(InvalidHTTP(f"headers over {_MAX_HEAD_BYTES} bytes"))
            return
        status = self.parser.get_status_code()
        if status < 200:  # 101 never gets here: the parser raises HttpParserUpgrade
            self.header_list, self.header_bytes, self.informational = [], 0, True
            return
        headers = CIMultiDictProxy(CIMultiDict(self.header_list))
        if headers.get("Content-Encoding", "identity").lower() != "identity":
            self._fail(InvalidHTTP("a compressed answer, though asked for identity"))
            return
        self.head = None
        response.status = status
        response.headers = headers
        self.until_close = ("Content-Length" not in response.headers
                            and "Transfer-Encoding" not in response.headers
                            and response.status not in _NO_BODY_STATUSES)
        if not head.done():
            head.set_result(response)

    def on_body(self, body: bytes) -> None:
        if self.response is not None and self.response.error is None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        if not self.parser.should_keep_alive():
            self.until_close = False
            if self.transport is not None:
                self.transport.close()  # after the answer: the upstream asked to close
        self._end(None)

    def _end(self, error: BaseException | None) -> None:
        if self.response is not None:
            self.response._end(error)

    def _fail(self, error: BaseException) -> None:
        head, self.head = self.head, None
        if head is not None and not head.done():
            head.set_exception(error)
        self._end(error)
        if self.transport is not None:
            self.transport.abort()


class ConnectionPool:
    """Keep-alive connections to one upstream origin, most recently used first."""

    def __init__(self, base_url: str, connect_timeout: float, idle_seconds: float = 60) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        self.connect_timeout = connect_timeout
        self.idle_seconds = idle_seconds
        self._addresses: tuple[float, list[Any]] | None = None  # (until, getaddrinfo's answer)
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self.closed = False

    async def send(self, request: bytes) -> UpstreamResponse:
        """Send one request; the answer once its headers have arrived."""
        conn = await self._acquire()
        try:
            return await conn.send(request)
        except BaseException:
            conn.abort()
            raise

    async def _acquire(self) -> _Connection:
        if self.closed:
            raise ConnectionLost("the upstream pool is closed")
        loop = asyncio.get_running_loop()
        fresh_after = loop.time() - self.idle_seconds
        while self._idle:
            conn = self._idle.pop()
            if conn.transport is not None and not conn.transport.is_closing() \
                    and conn.idle_since > fresh_after:
                self._busy.add(conn)
                return conn
            conn.abort()
        async with asyncio.timeout(self.connect_timeout):
            sock = await aiohappyeyeballs.start_connection(
                await self._resolve(), happy_eyeballs_delay=0.25, interleave=1)
            _, conn = await loop.create_connection(
                lambda: _Connection(self), sock=sock, ssl=self.ssl,
                server_hostname=self.host if self.ssl else None)
        self._busy.add(conn)
        return conn

    async def _resolve(self) -> list[Any]:
        loop = asyncio.get_running_loop()
        if self._addresses is None or self._addresses[0] < loop.time():
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            self._addresses = (loop.time() + _DNS_SECONDS, infos)
        return self._addresses[1]

    def put(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        if self.closed:
            conn.abort()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    @property
    def open_connections(self) -> int:
        return len(self._idle) + len(self._busy)

    def close(self) -> None:
        self.closed = True
        for conn in [*self._idle, *self._busy]:
            conn.abort()
