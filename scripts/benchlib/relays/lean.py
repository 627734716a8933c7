#!/usr/bin/env python3
"""The gateway's own work on raw protocols: a measuring stick for scripts/bench.py's ``layers``,
to price a server of the gateway's own against aiohttp's.

Per request it does what the gateway does on its hot path, with the gateway's own modules: the
key looked up by its SHA-256, the JSON body parsed, the rate-limit check and the stream's lease
(``RedisLimiter``, or ``MemoryLimiter`` without Redis), the upstream call on the keep-alive
``ConnectionPool`` (gateway/upstream/pool.py) with the operator's key, every upstream read
through ``StreamRenderer`` (the same decisions, the operator's key looked for), chunked framing
to the client, the lease given back at the end. It leaves out what a product needs and this
does not measure: the body's field checks, the error shapes (a refusal is a bare status),
metrics and the access log, timeouts, back-pressure, a client that leaves mid-stream.

    python scripts/benchlib/relays/lean.py \
        PORT UPSTREAM_BASE_URL CLIENT_KEY REDIS_URL|- [KEY_PREFIX]
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import sys
from urllib.parse import urlsplit

import httptools
import orjson
import uvloop

from gateway.ratelimit.memory import MemoryLimiter
from gateway.ratelimit.redis import RedisLimiter
from gateway.redis.topology import connect
from gateway.request_info import ClientKey
from gateway.settings import RedisSettings
from gateway.stream.render import StreamRenderer
from gateway.upstream.pool import ConnectionPool
from gateway.upstream.secrets import Secrets

# benchlib.proxies.OPERATOR_KEY, the upstream key the gateways are given
OPERATOR_KEY = ("xai-9jYg7SjjPvttfbfMLZuPjII4OoaQmzBinnpy3MPN"
                "ZEPFqzi0OZUrNsPqPdQ1Og7YN8gKkgboxhQGTa3V")
STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache"
               b"\r\nTransfer-Encoding: chunked\r\n\r\n")


def refusal(status: int) -> bytes:
    return b"HTTP/1.1 %d Refused\r\nContent-Length: 0\r\n\r\n" % status


class Gateway:
    """What every connection shares: the keys, the limiter, the upstream pool."""

    def __init__(self, upstream: str, client_key: str, limiter: RedisLimiter | MemoryLimiter
                 ) -> None:
        url = urlsplit(upstream.rstrip("/") + "/")
        self.path = url.path.encode()
        self.fixed = (f"Host: {url.netloc}\r\nAccept-Encoding: identity\r\n"
                      f"Authorization: Bearer {OPERATOR_KEY}\r\n"
                      "Content-Type: application/json\r\n").encode()
        self.pool = ConnectionPool(upstream, 5.0)
        self.limiter = limiter
        self.keys = {hashlib.sha256(client_key.encode()).digest(): ClientKey(
            "bench", requests_per_minute=1e8, burst=10_000_000, max_concurrent_streams=100_000)}
        self.secrets = Secrets.of(OPERATOR_KEY)


class Client(asyncio.Protocol):
    """One client connection; its requests are answered one after the other."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.waiting: collections.deque[tuple[bytes, dict[bytes, bytes], bytes]] = \
            collections.deque()
        self.server: asyncio.Task[None] | None = None  # held: the loop keeps only a weak one
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.waiting.append((self.url, self.headers, b"".join(self.body)))
        self.headers, self.body = {}, []
        if self.server is None:
            self.server = asyncio.get_running_loop().create_task(self.serve())

    async def serve(self) -> None:
        while self.waiting:
            await self.answer(*self.waiting.popleft())
        self.server = None

    async def answer(self, url: bytes, headers: dict[bytes, bytes], body: bytes) -> None:
        g = self.gateway
        auth = headers.get(b"authorization", b"")
        key = g.keys.get(hashlib.sha256(auth[7:]).digest()) if auth[:7] == b"Bearer " else None
        if key is None:
            self.transport.write(refusal(401))
            return
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            self.transport.write(refusal(400))
            return
        decision = await g.limiter.acquire(key, stream=bool(obj.get("stream")))
        if not decision.allowed:
            self.transport.write(refusal(429))
            return
        try:
            await self.relay(url, body)
        finally:
            if decision.lease is not None:
                await g.limiter.release(key, decision.lease)

    async def relay(self, url: bytes, body: bytes) -> None:
        g = self.gateway
        path = url.split(b"/v1/", 1)[-1]
        upstream = await g.pool.send(b"POST %s%s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s" % (
            g.path, path, g.fixed, len(body), body))
        if upstream.status != 200:
            upstream.close()
            self.transport.write(refusal(502))
            return
        renderer = StreamRenderer(secrets=g.secrets)
        transport = self.transport
        transport.write(STREAM_HEAD)
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_data(chunk: bytes) -> None:
            out, _, _ = renderer.feed(chunk)
            if out:
                transport.write(b"%x\r\n%b\r\n" % (len(out), out))

        def on_end(error: BaseException | None) -> None:
            out, _, _ = renderer.close()
            if out:
                transport.write(b"%x\r\n%b\r\n" % (len(out), out))
            transport.write(b"0\r\n\r\n")
            ended.set_result(None)

        upstream.stream(on_data, on_end)
        await ended
        upstream.release()


async def serve(port: int, upstream: str, client_key: str, redis_url: str, prefix: str) -> None:
    if redis_url == "-":
        limiter: RedisLimiter | MemoryLimiter = MemoryLimiter()
    else:
        limiter = RedisLimiter(connect(RedisSettings(url=redis_url, key_prefix=prefix)),
                               RedisSettings(url=redis_url, key_prefix=prefix))
    gateway = Gateway(upstream, client_key, limiter)
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: Client(gateway), "127.0.0.1", port, backlog=4096)
    await asyncio.Event().wait()  # until SIGTERM


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4],
                     sys.argv[5] if len(sys.argv) > 5 else "gwlean"))
