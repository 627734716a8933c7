#!/usr/bin/env python3
"""The least a relay in Python can do: a measuring stick for scripts/bench.py's ``layers``.

uvloop protocols on both sides, keep-alive upstream connections, each request's bytes and each
answer's bytes passed on as the socket yields them, from the read callback. httptools (C)
finds where each message ends, so a connection is reused only when its answer is over; nothing
else is parsed, checked or re-framed. No auth, no limits, no error handling, no back-pressure:
not a proxy, the floor under every proxy written in Python on this machine (the gateway's own
per-chunk path is this one plus the SSE renderer's decision).

    python scripts/benchlib/relays/floor.py PORT UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import sys

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream, lent to one client request at a time."""

    def __init__(self, idle: list[Upstream]) -> None:
        self.idle = idle
        self.parser = httptools.HttpResponseParser(self)
        self.client: Client | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.client is not None:
            self.client.transport.write(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:  # the answer is over: lend the connection again
        self.client, self.parser = None, httptools.HttpResponseParser(self)
        self.idle.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.idle:
            self.idle.remove(self)


class Client(asyncio.Protocol):
    """One client connection: each request goes out on an upstream connection of its own."""

    def __init__(self, upstream_port: int, idle: list[Upstream]) -> None:
        self.upstream_port = upstream_port
        self.idle = idle
        self.parser = httptools.HttpRequestParser(self)
        self.upstream: asyncio.Future[Upstream] | None = None
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.upstream = self._lend()
        if self.upstream.done():
            self._forward(data, self.upstream)
        else:
            self.upstream.add_done_callback(lambda up: self._forward(data, up))
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:  # the request is over: the next takes a new one
        self.upstream = None

    def _lend(self) -> asyncio.Future[Upstream]:
        loop = asyncio.get_running_loop()
        if self.idle:
            future = loop.create_future()
            future.set_result(self.idle.pop())
            return future
        return asyncio.ensure_future(self._connect())

    async def _connect(self) -> Upstream:
        loop = asyncio.get_running_loop()
        _, up = await loop.create_connection(lambda: Upstream(self.idle), "127.0.0.1",
                                             self.upstream_port)
        return up

    def _forward(self, data: bytes, future: asyncio.Future[Upstream]) -> None:
        up = future.result()
        up.client = self
        assert up.transport is not None
        up.transport.write(data)


async def serve(port: int, upstream_port: int) -> None:
    idle: list[Upstream] = []
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: Client(upstream_port, idle), "127.0.0.1", port,
                             backlog=4096)
    await asyncio.Event().wait()  # until SIGTERM


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), int(sys.argv[2])))
