"""A revoked key's open streams end, on every process, within ``key_cache_seconds``: with an
``api_key_revoked`` error frame, their stream leases and upstream connections given back, while
other keys' streams go on. For real: two ``gateway serve`` processes sharing Redis, the key
added and revoked by the CLI, the upstream a mock in this process's thread so that what it saw
can be read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.ratelimit.redis import key_names
from gateway.redis.keystore import store_keys
from gateway.settings import hash_key

from clients import chat_body, sse_events
from observe import error_of
from processes import ThreadedMockUpstream
from servers import gateway_processes, run_cli, wait_until_async, write_config

CONFIG_KEY = "sk-test-config-key-000001"
CACHE_SECONDS = 0.5
MARGIN = 0.5
"""For the revocation check's round trip to Redis and the last write, and a busy test host."""


@pytest.fixture
def upstream() -> Iterator[ThreadedMockUpstream]:
    with ThreadedMockUpstream() as mock:
        yield mock


async def _stream(http: aiohttp.ClientSession, url: str, key: str, opened: asyncio.Event,
                  **mock: Any) -> tuple[bytes, float]:
    """The whole body of one stream, and when it ended; ``opened`` set at its first event."""
    async with http.post(f"{url}/v1/chat/completions", json=chat_body(stream=True, **mock),
                         headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        opened.set()
        raw = first + await resp.read()
        return raw, time.monotonic()


async def _gone(admin: aioredis.Redis, records: str, digest: str) -> float:
    """When the key's record left Redis (the revocation's moment), polled."""
    while await admin.hexists(records, digest):
        await asyncio.sleep(0.005)
    return time.monotonic()


async def test_a_revoked_keys_open_streams_end_with_an_error_frame_within_the_cache_time(
        tmp_path: Path, upstream: ThreadedMockUpstream, redis_url: str,
        redis_prefix: str) -> None:
    data = {"server": {"drain_seconds": 0.5},
            "upstream": {"url": upstream.url, "api_key": "xai-operator-secret-key",
                         "max_retries": 0},
            "stream": {"keepalive_seconds": 5.0},
            "redis": {"url": redis_url, "key_prefix": redis_prefix,
                      "key_cache_seconds": CACHE_SECONDS},
            "keys": [{"name": "config-key", "key": CONFIG_KEY}]}
    config = str(write_config(tmp_path / "cli.toml", data))
    added = await asyncio.to_thread(run_cli, "keys", "add", "--name", "dave", "--config", config)
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    leases = key_names(redis_prefix, "dave")[1]
    admin = aioredis.Redis.from_url(redis_url)
    async with gateway_processes(data, 2, tmp_path) as gateways, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        try:
            # A stream of the key on each process (a chunk every 50 ms, for a minute), and one
            # of another key that must go on to its end.
            opened = [asyncio.Event() for _ in range(3)]
            long = {"chunks": 1200, "chunk_delay": 0.05}
            streams = [asyncio.create_task(_stream(http, gw.url, key, opened[i], **long))
                       for i, gw in enumerate(gateways)]
            other = asyncio.create_task(_stream(http, gateways[0].url, CONFIG_KEY, opened[2],
                                                chunks=60, chunk_delay=0.05))
            for event in opened:
                await asyncio.wait_for(event.wait(), 10)
            assert await admin.zcard(leases) == 2  # each stream holds its lease

            gone = asyncio.create_task(_gone(admin, store_keys(redis_prefix)[0], hash_key(key)))
            revoked = await asyncio.to_thread(run_cli, "keys", "revoke", "dave",
                                              "--config", config)
            assert revoked.returncode == 0, revoked.stderr
            revoked_at = await asyncio.wait_for(gone, 5)
            ended = await asyncio.wait_for(asyncio.gather(*streams), CACHE_SECONDS + 10)
            for raw, at in ended:
                assert at - revoked_at <= CACHE_SECONDS + MARGIN
                frames = sse_events(raw)
                assert frames[0].startswith(b'data: {"id"')  # events came before the end
                error = error_of(frames[-1].removesuffix(b"\n\n"))
                assert error["code"] == "api_key_revoked"
                assert error["type"] == "authentication_error"
                assert "revoked" in error["message"]
                assert b"[DONE]" not in raw

            # Everything the streams held is given back: their leases in Redis and their
            # upstream connections (the upstream saw both requests end early).
            await wait_until_async(lambda: upstream.state.disconnects >= 2, 2,
                                   "the upstream saw the revoked streams end")
            for _ in range(100):
                if await admin.zcard(leases) == 0:
                    break
                await asyncio.sleep(0.02)
            assert await admin.zcard(leases) == 0

            raw, _ = await asyncio.wait_for(other, 10)  # the other key's stream went on
            assert raw.endswith(b"data: [DONE]\n\n") and b'"error"' not in raw
            await wait_until_async(lambda: upstream.state.open_streams == 0, 2,
                                   "every upstream stream closed")
        finally:
            await admin.aclose()

    logged = [line for gw in gateways for line in gw.access_lines() if line["key"] == "dave"]
    assert [(line["outcome"], line["error"]) for line in logged] == [
        ("error", "api_key_revoked")] * 2
    for gw in gateways:
        logs = gw.logs()
        assert key not in logs and hash_key(key) not in logs  # the key by its name only
        assert "Traceback" not in logs
