"""The client's side of one event stream: the only code that touches aiohttp's transport,
protocol and writer directly (``gateway/server/limits.py`` asks ``response_started`` here).

Why not ``StreamResponse.write``: it is a coroutine per chunk, and the relay writes from the
upstream socket's read callback, where nothing can be awaited. So the response is started and
ended through aiohttp's public API (``prepare``, ``write_eof``) and, in between, each write goes
straight to the connection's transport, framed here as an HTTP/1.1 chunk.

What this relies on from aiohttp, each pinned by ``tests/test_client_stream.py`` for the range
``setup.cfg`` names:

1. ``StreamResponse.prepare()`` sends the status line and headers at once (a plain ``Response``
   holds them back to send with its body; a ``StreamResponse`` does not) and buffers nothing
   after them, so bytes written to ``request.transport`` follow them in order.
2. With chunked encoding enabled, ``write_eof(data)`` writes ``data`` as one chunk and the
   last chunk (``0\\r\\n\\r\\n``), in one transport write; for an HTTP/1.0 client it writes
   ``data`` as it is and the connection ends the body.
3. ``request.protocol.writing_paused`` is True while the transport's send buffer is past its
   high-water mark, and ``request.writer.drain()`` returns once it has drained.
4. Once the client has gone, ``request.transport`` is None or closing.
5. ``write_eof()`` waits for the client to take what is buffered (a drain): a client that
   reads nothing is cut off by ``close``'s time limit (``transport.abort()``).
6. A ``StreamResponse`` whose ``_send_headers_immediately`` is False (aiohttp's own
   ``Response`` is one) only serializes its head at ``prepare()``; the writer sends it with
   the first bytes of ``write_eof(data)``, in the same transport write, or when its public
   ``send_headers()`` is called. (The one private name here: a class attribute.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from aiohttp import HttpVersion11, web


def response_started(request: web.BaseRequest) -> bool:
    """Whether any byte of a response has gone to the client: then no other response can
    follow (aiohttp's own ``handle_error`` asks its writer the same)."""
    return request.writer.output_size > 0


class ClientGone(ConnectionResetError):
    """The client closed the connection."""


class _HeadWithBody(web.StreamResponse):
    """A response whose head goes out with its first bytes, in one write (item 6 above)."""

    _send_headers_immediately = False


class ClientStream:
    """Open with headers, write, ask whether paused, drain, close."""

    __slots__ = ("_request", "response", "_transport", "_protocol", "_chunked", "_head_held")

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response: web.StreamResponse | None = None
        self._transport: asyncio.Transport | None = None
        self._protocol: web.RequestHandler | None = None
        self._chunked = False
        self._head_held = False  # the head is still to go out, with the first bytes

    @property
    def opened(self) -> bool:
        return self.response is not None

    async def open(self, headers: Mapping[str, str], *, whole: bool = False
                   ) -> web.StreamResponse:
        """Send ``200`` and ``headers``; from here on the status cannot change. ``whole``:
        the whole answer is already here, so the head waits for it and goes out in the same
        write as the answer and the end of the response (``close``): one write for it all."""
        response = _HeadWithBody(status=200, headers=headers) if whole else \
            web.StreamResponse(status=200, headers=headers)
        # HTTP/1.1: chunks framed by ``write``. HTTP/1.0: bare bytes, ended by the connection.
        self._chunked = self._request.version >= HttpVersion11
        if self._chunked:
            response.enable_chunked_encoding()
        try:
            await response.prepare(self._request)
        except ConnectionError as e:
            raise ClientGone("the client closed the connection") from e
        self.response = response
        self._head_held = whole
        self._transport = self._request.transport
        self._protocol = self._request.protocol  # a property call: looked up once
        return response

    def write(self, data: bytes) -> None:
        """Write now, without waiting; ``ClientGone`` when the client has left."""
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ClientGone("the client closed the connection")
        if self._head_held:  # bytes before the end after all: the head goes first
            self._head_held = False
            self._request.writer.send_headers()
        transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)

    @property
    def paused(self) -> bool:
        """The client's send buffer is full: stop producing until ``drain`` returns."""
        protocol = self._protocol
        return protocol is not None and protocol.writing_paused

    async def drain(self) -> None:
        try:
            await self._request.writer.drain()
        except ConnectionError as e:
            raise ClientGone("the client closed the connection") from e

    async def close(self, wait: float, last: bytes = b"") -> None:
        """End the response (the last chunk), ``last`` (the stream's last events) in the same
        write: one write fewer a stream. ``ClientGone`` if the client left before ``last``
        could be written; nothing else to do then. A client that takes nothing for ``wait``
        seconds is cut off."""
        if self.response is None:
            return
        transport = self._transport
        if last and (transport is None or transport.is_closing()):
            raise ClientGone("the client closed the connection")
        # A plain timer, not asyncio.timeout (several times dearer, on every stream): the last
        # chunk can tip a nearly full buffer into a drain that a stalled client never ends.
        cutoff = asyncio.get_running_loop().call_later(wait, self.abort)
        try:
            await self.response.write_eof(last)
        except ConnectionError:
            pass
        finally:
            cutoff.cancel()

    def abort(self) -> None:
        """Drop the connection at once (a client that reads nothing)."""
        transport = self._transport or self._request.transport
        if transport is not None:
            transport.abort()
