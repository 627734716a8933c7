"""Redis blackholed from the start: a listening socket of the test's own that never accepts a
connection and never answers a byte. The gateway still starts; with ``fail_open`` it serves
(limits per process) at no Redis cost per request, with ``fail_closed`` it refuses with 503; and
in both the event loop never stalls: ``/healthz``, polled all along, keeps answering fast.

helper-1's ``tests/test_ratelimit_redis.py`` covers the rest of the Redis faults: Redis stopped
and restarted under both policies, a Redis that goes silent mid-run (one timeout, not one per
request), ``SCRIPT FLUSH``, ``kill -9`` of a gateway holding leases, and a blip during a stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from gateway.appkeys import LIMITER

from clients import AUTH, chat_body
from conftest import Upstream, settings_for
from observe import error_of
from servers import Blackhole

TIMEOUT = 1.0  # [redis] timeout_seconds: long, so a stall of the loop could not hide in it


@contextlib.contextmanager
def blackhole() -> Iterator[str]:
    """A Redis URL whose server listens and then does nothing at all."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)  # never accepted: the kernel queues a connection or two, then drops SYNs
        yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


async def healthz_latencies(base: str, stop: asyncio.Event) -> list[float]:
    """Poll /healthz until ``stop``; each answer's latency."""
    out: list[float] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        while not stop.is_set() and len(out) < 1000:
            started = time.monotonic()
            async with s.get(f"{base}/healthz") as r:
                assert r.status == 200
                await r.read()
            out.append(time.monotonic() - started)
            await asyncio.sleep(0.02)
    return out


async def timed_chat(s: aiohttp.ClientSession, base: str, stream: bool | None
                     ) -> tuple[int, dict[str, str], bytes, float]:
    """One chat request: its status, headers and body, and the seconds until the body was read
    (``stream`` None: a body without the ``stream`` field)."""
    started = time.monotonic()
    async with s.post(f"{base}/v1/chat/completions", headers=AUTH,
                      json=chat_body(stream=stream)) as r:
        return r.status, dict(r.headers), await r.read(), time.monotonic() - started


async def waves(s: aiohttp.ClientSession, base: str
                ) -> list[tuple[int, dict[str, str], bytes, float]]:
    """Three waves of 40 concurrent requests, streamed and plain in turn, 0.3 s apart (across
    a breaker probe or two): ``timed_chat`` of each."""
    results = []
    for _ in range(3):
        results += await asyncio.gather(*(timed_chat(s, base, i % 2 == 0) for i in range(40)))
        await asyncio.sleep(0.3)
    return results


async def start_blackholed(start_gateway: Any, mock_upstream: Upstream, url: str, policy: str,
                           prefix: str) -> tuple[Any, str]:
    started = time.monotonic()
    app, base = await start_gateway(settings_for(mock_upstream.url, redis={
        "url": url, "key_prefix": prefix, "failure_policy": policy,
        "timeout_seconds": TIMEOUT}))
    # Start-up asks Redis once and waits one timeout at most, then applies the policy.
    assert time.monotonic() - started < TIMEOUT + 2
    assert app[LIMITER].backend_state == ("fallback" if policy == "fail_open" else "unavailable")
    return app, base


async def test_a_blackholed_redis_with_fail_open_keeps_serving_and_the_loop_never_stalls(
        mock_upstream: Upstream, start_gateway: Any, redis_prefix: str) -> None:
    with blackhole() as url:
        app, base = await start_blackholed(start_gateway, mock_upstream, url, "fail_open",
                                           redis_prefix)
        stop = asyncio.Event()
        polling = asyncio.ensure_future(healthz_latencies(base, stop))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            results = await waves(s, base)
        stop.set()
        latencies = await polling
    assert {status for status, _, _, _ in results} == {200}
    assert all(body.endswith(b"data: [DONE]\n\n") for _, _, body, _ in results[::2])
    # No request waited on Redis: the breaker was open from start-up on.
    assert max(took for _, _, _, took in results) < TIMEOUT
    assert len(latencies) >= 20 and max(latencies) < TIMEOUT / 2
    assert app[LIMITER].fallback_decisions >= len(results)


async def test_a_blackholed_redis_with_fail_closed_answers_503_and_the_loop_never_stalls(
        mock_upstream: Upstream, start_gateway: Any, redis_prefix: str) -> None:
    with blackhole() as url:
        app, base = await start_blackholed(start_gateway, mock_upstream, url, "fail_closed",
                                           redis_prefix)
        stop = asyncio.Event()
        polling = asyncio.ensure_future(healthz_latencies(base, stop))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            results = await waves(s, base)
            async with s.get(f"{base}/readyz") as r:
                ready = r.status, await r.json()
        stop.set()
        latencies = await polling
    assert {status for status, _, _, _ in results} == {503}
    for _, headers, body, _ in results[:2]:
        err = error_of(body[6:] if body.startswith(b"data: ") else body)
        assert err["code"] == "service_unavailable" and "Redis" in err["message"]
        assert headers["Retry-After"] == "1"
    assert max(took for _, _, _, took in results) < TIMEOUT
    assert not [r for r in mock_upstream.state.requests  # refused before the upstream
                if r["path"].endswith("chat/completions")]
    assert ready[0] == 503 and ready[1]["checks"]["redis"].startswith("unreachable")
    assert len(latencies) >= 20 and max(latencies) < TIMEOUT / 2
    assert app[LIMITER].refused_unavailable == len(results)


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
async def test_a_redis_that_goes_silent_costs_the_requests_in_flight_a_bounded_wait(
        mock_upstream: Upstream, start_gateway: Any, redis_url: str, redis_prefix: str,
        policy: str) -> None:
    """helper-1's silent-proxy test, for fail_closed as well, and with many requests waiting
    on Redis when it goes silent: they are answered per the policy after at most two timeouts
    (the pipeline in flight, then their own: ``RedisBatcher``), later ones at once. Reuses its
    proxy (``Blackhole``, in ``tests/servers.py``), which keeps connections open and drops
    bytes."""
    proxy = Blackhole(redis_url)
    proxy_url = await proxy.start()
    try:
        app, base = await start_gateway(settings_for(mock_upstream.url, redis={
            "url": proxy_url, "key_prefix": redis_prefix, "failure_policy": policy,
            "timeout_seconds": TIMEOUT}))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            assert (await timed_chat(s, base, None))[0] == 200 \
                and app[LIMITER].backend_state == "redis"
            proxy.silent = True
            in_flight = await asyncio.gather(*(timed_chat(s, base, None) for _ in range(20)))
            after = [await timed_chat(s, base, None) for _ in range(20)]
        expected = 200 if policy == "fail_open" else 503
        assert {status for status, _, _, _ in in_flight + after} == {expected}
        assert max(took for _, _, _, took in in_flight) < 2 * TIMEOUT + 1  # not twenty timeouts
        assert max(took for _, _, _, took in after) < TIMEOUT / 2
    finally:
        await proxy.close()
