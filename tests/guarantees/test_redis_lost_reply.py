"""A check whose reply is lost after Redis ran it is never counted twice.

A ``redis-server`` of the test's own behind a TCP proxy on loopback that, once armed, lets one
``EVALSHA`` through to Redis and drops its reply (it resets the client's connection instead):
Redis ran the script, the gateway never hears. A stream's check is admitted on its own lease
(no second token, no 429 against itself, no leaked lease); a plain check counts as failed (the
failure policy; its one token is spent) and is never sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import redis.asyncio as aioredis

from gateway.errors import ServiceUnavailable
from gateway.ratelimit.redis import RedisLimiter, key_names
from gateway.redis.lifecycle import open_redis
from gateway.request_info import ClientKey
from gateway.settings import RedisSettings

from servers import redis_server


class ReplyDropper:
    """A TCP proxy to Redis; ``arm()`` makes it drop the reply to the next ``EVALSHA``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.armed = False
        self.dropped = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    def arm(self) -> None:
        self.armed = True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.port)
        sent = asyncio.Event()  # an armed EVALSHA went to Redis on this connection

        async def to_redis() -> None:
            while data := await reader.read(65536):
                if self.armed and b"EVALSHA" in data:
                    self.armed = False
                    sent.set()
                upstream_writer.write(data)
                await upstream_writer.drain()

        async def to_client() -> None:
            while data := await upstream_reader.read(65536):
                if sent.is_set():  # Redis answered the armed command: that answer is lost
                    self.dropped += 1
                    writer.transport.abort()
                    return
                writer.write(data)
                await writer.drain()

        with contextlib.suppress(OSError):
            await asyncio.wait([asyncio.ensure_future(to_redis()),
                                asyncio.ensure_future(to_client())],
                               return_when=asyncio.FIRST_COMPLETED)
        for w in (writer, upstream_writer):
            w.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()


def client_key(name: str, streams: int = 1) -> ClientKey:
    return ClientKey(name=name, requests_per_minute=0.001, burst=10,
                     max_concurrent_streams=streams, models=None)


async def test_a_lost_reply_never_spends_a_token_twice_nor_counts_a_stream_against_itself(
        ) -> None:
    prefix = f"gwlost{time.monotonic_ns()}"
    with redis_server() as server:
        proxy = ReplyDropper(server.port)
        url = await proxy.start()
        raw = aioredis.Redis.from_url(server.url)
        settings = RedisSettings(url=url, key_prefix=prefix, timeout_seconds=1.0,
                                 failure_policy="fail_closed")

        async def tokens(name: str) -> float:
            # A refill too slow to matter: whole tokens, as spent.
            return round(float(await raw.hget(key_names(prefix, name)[0], "tokens") or "nan"), 3)

        try:
            async with open_redis(settings) as (client, breaker):
                limiter = RedisLimiter(client, settings, breaker)
                try:
                    assert (await limiter.acquire(client_key("warm-up"), stream=False)).allowed

                    # A stream (cap 1): Redis admits it, the reply is lost.
                    proxy.arm()
                    decision = await limiter.acquire(client_key("streamer"), stream=True)
                    assert proxy.dropped == 1
                    assert decision.allowed and decision.lease, decision  # not a 429
                    assert await tokens("streamer") == 9  # one token, not two
                    streams = key_names(prefix, "streamer")[1]
                    assert await raw.zrange(streams, 0, -1) == [decision.lease.encode()]
                    assert limiter.held_leases == 1 and limiter.outages == 0
                    await limiter.release(client_key("streamer"), decision.lease)
                    assert await raw.zcard(streams) == 0  # nothing leaked

                    # A plain check: Redis spends its token, the reply is lost; it fails
                    # (fail_closed: 503) and is not sent again.
                    proxy.arm()
                    with pytest.raises(ServiceUnavailable):
                        await limiter.acquire(client_key("plain"), stream=False)
                    assert proxy.dropped == 2
                    assert await tokens("plain") == 9
                    assert limiter.outages == 1
                    for _ in range(100):  # the breaker's probe: at once
                        if limiter.backend_state == "redis":
                            break
                        await asyncio.sleep(0.02)
                    assert (await limiter.acquire(client_key("plain"), stream=False)).allowed
                    assert await tokens("plain") == 8
                finally:
                    await limiter.close()
        finally:
            await raw.aclose()
            await proxy.close()
