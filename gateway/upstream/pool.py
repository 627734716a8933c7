"""The keep-alive connections to one upstream origin (``Connection``, one request at a time,
``gateway/upstream/http1.py``), most recently used first, for the app's whole life.

Connections are opened with Happy Eyeballs (RFC 8305, aiohappyeyeballs, as aiohttp does): a host
whose IPv6 route is broken costs one connection attempt delay (``_HAPPY_EYEBALLS_SECONDS``), not
the connect timeout. The host's addresses are looked up once and reused for a while, and a
connection idle for too long is closed rather than reused (the upstream may have dropped it).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

import aiohappyeyeballs

from .http1 import Connection, ConnectionLost, UpstreamResponse

_DNS_SECONDS = 60.0  # how long the upstream host's addresses are reused
_HAPPY_EYEBALLS_SECONDS = 0.25  # RFC 8305's recommended connection attempt delay, as aiohttp's


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
        self._idle: list[Connection] = []
        self._busy: set[Connection] = set()
        self._connecting = 0  # sends waiting for a connection
        self.closed = False

    async def send(self, request: bytes) -> UpstreamResponse:
        """Send one request; the answer once its headers have arrived."""
        self._connecting += 1  # counted from the caller's own step (``in_use``)
        try:
            conn = await self._acquire()
        finally:
            self._connecting -= 1
        try:
            return await conn.send(request)
        except BaseException:
            conn.abort()
            raise

    async def _acquire(self) -> Connection:
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
                await self._resolve(), happy_eyeballs_delay=_HAPPY_EYEBALLS_SECONDS,
                interleave=1)
            _, conn = await loop.create_connection(
                lambda: Connection(self), sock=sock, ssl=self.ssl,
                server_hostname=self.host if self.ssl else None)
        self._busy.add(conn)
        return conn

    async def _resolve(self) -> list[Any]:
        loop = asyncio.get_running_loop()
        if self._addresses is None or self._addresses[0] < loop.time():
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            self._addresses = (loop.time() + _DNS_SECONDS, infos)
        return self._addresses[1]

    def put(self, conn: Connection) -> None:
        self._busy.discard(conn)
        if self.closed:
            conn.abort()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle.append(conn)

    def forget(self, conn: Connection) -> None:
        self._busy.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    @property
    def in_use(self) -> int:
        """Requests open on this origin: connecting, waiting for their answer, or reading it
        (until its owner lets it go). A caller that counts it and then sends in one step of
        the event loop is counted before any other caller looks (``max_concurrent``)."""
        return len(self._busy) + self._connecting

    @property
    def open_connections(self) -> int:
        return len(self._idle) + len(self._busy)

    def close(self) -> None:
        self.closed = True
        for conn in [*self._idle, *self._busy]:
            conn.abort()
