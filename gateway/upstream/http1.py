"""HTTP/1.1 to the upstream: one keep-alive connection on an asyncio protocol, and the answer it
carries, parsed by httptools. The connections are opened, kept and reused by ``ConnectionPool``
(``gateway/upstream/pool.py``).

Why not aiohttp's client: it hands every read of a response body to a task through a
``StreamReader``, so each streamed chunk costs a task switch and a coroutine resume, which was
most of the relay's CPU (``scripts/bench.py`` compares a pass-through built this way with the
same on ``ClientSession``; the figures are in ``docs/performance.md``). Here the body is
delivered from the read callback itself: ``UpstreamResponse.stream`` hands each read's body to
the relay as one piece (one render and one client write a read), written out before it returns.
httptools is llhttp (Node's parser, as used by uvicorn): chunked bodies, lengths and errors are
decoded in C.

The upstream is always asked for an identity encoding (``UpstreamClient``,
``gateway/upstream/client.py``): an answer that is compressed anyway is refused, never relayed
as bytes no client expects.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

_MAX_HEAD_BYTES = 64 * 1024
_NO_BODY_STATUSES = frozenset((204, 304))
_HOLD_BYTES = 64 * 1024
"""What an answer keeps of its body while nobody reads it yet (its headers are in, its owner has
not called ``stream`` or ``read``: the relay is still sending the client its own headers). Past
it, the socket is not read until the owner comes: a fast upstream would otherwise fill memory at
the loopback's speed for as long as that moment lasts (under load, the whole answer)."""


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
                 "_on_data", "_on_end", "_held", "complete", "error")

    def __init__(self, conn: Connection) -> None:
        self.status = 0
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
        self._conn: Connection | None = conn
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit: int | None = None
        self._max: int | None = None  # read_all's cap: past it, nothing more is kept
        self._waiter: asyncio.Future[None] | None = None
        self._on_data: DataSink | None = None  # once streamed: where each read's body goes
        self._on_end: EndSink | None = None
        self._held = False  # the socket paused for want of a reader (``_HOLD_BYTES``)
        self.complete = False
        self.error: BaseException | None = None

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body, or its first ``limit`` bytes (the rest is not waited for)."""
        self._take()
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
        self._take()  # before what is held goes on: a full client pauses the socket again
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
        self._take()  # a connection back in the pool reads its next answer
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
            return
        if self._limit is not None and self._size >= self._limit:
            self._wake()
        if self._on_data is None and self._waiter is None and self._size > _HOLD_BYTES \
                and not self._held and self._conn is not None \
                and self._conn.transport is not None:
            self._held = True  # no reader yet: the rest waits in the socket (``_HOLD_BYTES``)
            self._conn.transport.pause_reading()

    def _take(self) -> None:
        """A reader has come (or the answer is let go): the socket is read again."""
        if self._held:
            self._held = False
            self.resume_reading()

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


class Pool(Protocol):
    """What a connection tells the pool it belongs to (``ConnectionPool``,
    ``gateway/upstream/pool.py``, which imports this module: never the other way)."""

    def put(self, conn: Connection) -> None:
        """Back for reuse: its answer was read to its end."""

    def forget(self, conn: Connection) -> None:
        """Closed: never to be handed out again."""


class Connection(asyncio.Protocol):
    """One keep-alive connection; it carries one request at a time."""

    # The request in flight (set by ``send``).
    parser: httptools.HttpResponseParser
    header_list: list[tuple[str, str]]
    head_bytes: int  # read while the headers are incomplete
    header_bytes: int  # in the headers themselves
    until_close: bool  # a body without length or chunking: it ends with the socket
    informational: bool  # a 1xx answer (103 Early Hints) came first: the real one follows

    def __init__(self, pool: Pool) -> None:
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
