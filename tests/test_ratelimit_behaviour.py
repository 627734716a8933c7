"""One behavioural suite for both limiter backends: ``MemoryLimiter`` and ``RedisLimiter``.

The first half drives the Limiter interface directly; the second drives a real gateway (memory
or Redis configured) with real clients, the OpenAI SDK among them. The timing-sensitive checks
use fast refill rates and bounds loose enough for a loaded machine.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from gateway.appkeys import LIMITER
from gateway.ratelimit import Limiter
from gateway.ratelimit.memory import MemoryLimiter
from gateway.ratelimit.redis import RedisLimiter
from gateway.redis.topology import connect
from gateway.request_info import ClientKey
from gateway.settings import RedisSettings

from clients import AUTH, chat_body
from conftest import KEY, Upstream, settings_for

BACKENDS = ("memory", "redis")


def client_key(**limits: Any) -> ClientKey:
    """A key of its own for each test (Redis state is per key name)."""
    values: dict[str, Any] = {"requests_per_minute": 60.0, "burst": 5,
                              "max_concurrent_streams": 2, **limits}
    return ClientKey(name=f"k-{uuid.uuid4().hex[:8]}", **values)


@pytest.fixture(params=BACKENDS)
async def limiter(request: pytest.FixtureRequest, redis_url: str,
                  redis_prefix: str) -> AsyncIterator[Limiter]:
    if request.param == "memory":
        memory = MemoryLimiter()
        yield memory
        await memory.close()
        return
    settings = RedisSettings(url=redis_url, key_prefix=redis_prefix, lease_seconds=5)
    client = connect(settings)
    redis_limiter = RedisLimiter(client, settings)
    try:
        yield redis_limiter
    finally:
        await redis_limiter.close()
        await client.aclose()


async def test_burst_is_admitted_then_refused(limiter: Limiter) -> None:
    key = client_key(requests_per_minute=60, burst=5)
    remaining = [(await limiter.acquire(key, stream=False)).remaining for _ in range(5)]
    assert remaining == [4, 3, 2, 1, 0]
    refused = await limiter.acquire(key, stream=False)
    assert not refused.allowed and refused.refused_by == "requests"
    assert 0.5 < refused.retry_after <= 1.0  # one token at 1/s, a little of it refilled
    assert 4.5 < refused.reset_seconds <= 5.0
    assert refused.lease is None


async def test_refill_follows_the_rate_and_retry_after(limiter: Limiter) -> None:
    key = client_key(requests_per_minute=240, burst=2)  # 4 tokens a second
    assert all([(await limiter.acquire(key, stream=False)).allowed for _ in range(2)])
    refused = await limiter.acquire(key, stream=False)
    assert not refused.allowed and 0 < refused.retry_after <= 0.25
    await asyncio.sleep(refused.retry_after + 0.01)
    assert (await limiter.acquire(key, stream=False)).allowed
    assert not (await limiter.acquire(key, stream=False)).allowed
    await asyncio.sleep(0.65)  # 2.6 tokens' worth, but the bucket holds 2
    results = [(await limiter.acquire(key, stream=False)).allowed for _ in range(3)]
    assert results == [True, True, False]


async def test_headers_report_the_bucket(limiter: Limiter) -> None:
    key = client_key(requests_per_minute=120, burst=10)
    first = (await limiter.acquire(key, stream=False)).headers()
    assert first["x-ratelimit-limit-requests"] == "10"
    assert first["x-ratelimit-remaining-requests"] == "9"
    assert first["x-ratelimit-reset-requests"] in ("500ms", "499ms", "501ms")
    assert first["RateLimit-Policy"] == '"requests";q=10;w=5'
    assert first["RateLimit"] == '"requests";r=9;t=1'
    assert "Retry-After" not in first
    for _ in range(9):
        await limiter.acquire(key, stream=False)
    refused = (await limiter.acquire(key, stream=False)).headers()
    assert refused["x-ratelimit-remaining-requests"] == "0"
    assert refused["Retry-After"] == "1"
    assert 0 < int(refused["retry-after-ms"]) <= 500
    assert refused["x-ratelimit-reset-requests"].endswith("s")
    assert refused["RateLimit"] == '"requests";r=0;t=5'


async def test_streams_hold_leases_up_to_the_cap(limiter: Limiter) -> None:
    key = client_key(burst=10, max_concurrent_streams=2)
    first = await limiter.acquire(key, stream=True)
    second = await limiter.acquire(key, stream=True)
    assert first.allowed and second.allowed
    assert first.lease and second.lease and first.lease != second.lease
    assert second.remaining == 8
    third = await limiter.acquire(key, stream=True)
    assert not third.allowed and third.refused_by == "concurrency" and third.lease is None
    assert third.remaining == 8, "a refusal by the cap must not take a token"
    assert third.retry_after == 1.0
    plain = await limiter.acquire(key, stream=False)
    assert plain.allowed and plain.lease is None and plain.remaining == 7


async def test_release_frees_the_slot_at_once(limiter: Limiter) -> None:
    key = client_key(burst=10, max_concurrent_streams=1)
    held = await limiter.acquire(key, stream=True)
    assert held.lease is not None
    assert not (await limiter.acquire(key, stream=True)).allowed
    await limiter.release(key, held.lease)
    again = await limiter.acquire(key, stream=True)
    assert again.allowed and again.lease is not None
    await limiter.release(key, held.lease)  # twice, and an unknown lease: no effect
    await limiter.release(key, "no-such-lease")
    assert not (await limiter.acquire(key, stream=True)).allowed
    await limiter.release(key, again.lease)
    assert (await limiter.acquire(key, stream=True)).allowed


async def test_keys_have_their_own_limits(limiter: Limiter) -> None:
    alice, bob = client_key(burst=1), client_key(burst=1)
    assert (await limiter.acquire(alice, stream=False)).allowed
    assert not (await limiter.acquire(alice, stream=False)).allowed
    assert (await limiter.acquire(bob, stream=False)).allowed


# --- through a real gateway -----------------------------------------------------------------

@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, redis_url: str, redis_prefix: str
            ) -> dict[str, Any]:
    """Extra settings sections selecting the backend."""
    if request.param == "memory":
        return {}
    return {"redis": {"url": redis_url, "key_prefix": redis_prefix, "lease_seconds": 5}}


def limited(upstream: Upstream, backend: dict[str, Any], **limits: Any) -> Any:
    return settings_for(upstream.url, keys=[{"name": "alice", "key": KEY, **limits}], **backend)


async def test_gateway_headers_and_refusal_shapes(
        mock_upstream: Upstream, start_gateway: Callable[..., Any],
        backend: dict[str, Any]) -> None:
    app, base = await start_gateway(limited(mock_upstream, backend, burst=2,
                                            requests_per_minute=60))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        for remaining in ("1", "0"):
            async with http.post(f"{base}/v1/chat/completions", json=chat_body(stream=False),
                                 headers=AUTH) as resp:
                assert resp.status == 200
                assert resp.headers["x-ratelimit-limit-requests"] == "2"
                assert resp.headers["x-ratelimit-remaining-requests"] == remaining
                assert resp.headers["RateLimit-Policy"] == '"requests";q=2;w=2'
        async with http.post(f"{base}/v1/chat/completions", json=chat_body(stream=False),
                             headers=AUTH) as resp:
            assert resp.status == 429
            body = await resp.json()
            assert body["error"]["code"] == "rate_limit_exceeded"
            assert body["error"]["type"] == "rate_limit_error"
            assert body["error"]["message"].startswith(
                "Rate limit reached: this key may send 2 requests in a row")
            assert resp.headers["Retry-After"] == "1"
            assert 0 < int(resp.headers["retry-after-ms"]) <= 1000
            assert resp.headers["x-ratelimit-remaining-requests"] == "0"
        async with http.post(f"{base}/v1/chat/completions", json=chat_body(stream=True),
                             headers={**AUTH, "Accept": "text/event-stream"}) as resp:
            assert resp.status == 429
            assert resp.headers["Content-Type"] == "text/event-stream"
            raw = await resp.read()
            assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
            assert orjson.loads(raw[6:])["error"]["code"] == "rate_limit_exceeded"
    assert len(mock_upstream.state.requests) == 2, "refused requests never reach the upstream"
    assert app[LIMITER].backend_state == ("redis" if backend else "memory")


async def test_gateway_stream_lease_is_released_on_disconnect(
        mock_upstream: Upstream, start_gateway: Callable[..., Any],
        backend: dict[str, Any]) -> None:
    _, base = await start_gateway(limited(mock_upstream, backend, burst=100,
                                          max_concurrent_streams=1))
    url = f"{base}/v1/chat/completions"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        first = await http.post(url, json=chat_body(stream=True, chunks=400, chunk_delay=0.05),
                                headers=AUTH)
        try:
            assert first.status == 200
            # The limit headers come with the stream's headers, before its first byte.
            assert first.headers["x-ratelimit-remaining-requests"] == "99"
            assert first.headers["RateLimit"].startswith('"requests";r=99')
            assert (await first.content.readline()).startswith(b"data: ")
            async with http.post(url, json=chat_body(stream=True), headers=AUTH) as refused:
                assert refused.status == 429
                frame = orjson.loads(await refused.read())  # JSON: no Accept names the stream
                assert frame["error"]["code"] == "concurrency_limit_exceeded"
                assert "1 open stream at a time" in frame["error"]["message"]
        finally:
            first.close()  # the client goes away mid-stream
        started = time.monotonic()
        for _ in range(40):
            async with http.post(url, json=chat_body(stream=True), headers=AUTH) as resp:
                if resp.status == 200:
                    await resp.read()
                    break
                assert resp.status == 429
            await asyncio.sleep(0.025)
        else:
            pytest.fail("the slot of a disconnected stream never came back")
        assert time.monotonic() - started < 1  # at once; the lease would last 5 s


async def test_openai_sdk_raises_rate_limit_error(
        mock_upstream: Upstream, start_gateway: Callable[..., Any],
        backend: dict[str, Any]) -> None:
    _, base = await start_gateway(limited(mock_upstream, backend, burst=1,
                                          requests_per_minute=6))
    client = openai.AsyncOpenAI(api_key=KEY, base_url=f"{base}/v1", max_retries=0)
    try:
        done = await client.chat.completions.create(
            model="grok-4", messages=[{"role": "user", "content": "hi"}])
        assert done.choices[0].message.content
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(
                model="grok-4", messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 429
        assert caught.value.code == "rate_limit_exceeded"
        assert ("Rate limit reached: this key may send 1 request in a row, then 6 a minute; "
                "retry in 10s") in caught.value.message
        assert caught.value.response.headers["retry-after"] == "10"
        with pytest.raises(openai.RateLimitError):  # a stream is refused the same way
            await client.chat.completions.create(
                model="grok-4", messages=[{"role": "user", "content": "hi"}], stream=True)
    finally:
        await client.close()
