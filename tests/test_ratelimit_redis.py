"""The Redis limiter, exact across real gateway processes sharing one Redis.

Gateways run as ``python -m gateway serve`` processes (each with its built-in mock upstream).
Tests that only read and write keys under their prefix use the machine's Redis; tests that
flush scripts, kill or blackhole Redis use a redis-server of their own (``tests/servers.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from gateway.appkeys import LIMITER
from gateway.ratelimit.redis import RedisLimiter, key_names
from gateway.redis.batcher import RedisBatcher
from gateway.redis.topology import connect
from gateway.request_info import ClientKey
from gateway.settings import RedisSettings

from clients import chat_body
from conftest import Upstream, settings_for
from servers import (
    Blackhole,
    GatewayProcess,
    gateway_processes,
    redis_server,
    wait_until_async,
)

LEASE_SECONDS = 2


def raw_key(name: str) -> str:
    return f"sk-test-{name}-0123456789"


def key(name: str, **limits: Any) -> dict[str, Any]:
    return {"name": name, "key": raw_key(name), "requests_per_minute": 6000, "burst": 1000,
            "max_concurrent_streams": 100, **limits}


def config(redis_url: str, prefix: str, keys: list[dict[str, Any]], **redis: Any
           ) -> dict[str, Any]:
    return {
        "server": {"drain_seconds": 0.5},
        "upstream": {"url": "mock"},
        # A timeout looser than the default 0.25 s: a CI host busy with other suites must not
        # look like a Redis outage here (outages are tested by stopping Redis for real).
        "redis": {"url": redis_url, "key_prefix": prefix, "lease_seconds": LEASE_SECONDS,
                  "timeout_seconds": 1.0, **redis},
        "keys": keys,
    }


LONG_STREAM: dict[str, Any] = {"chunks": 600, "chunk_delay": 0.05}  # 30 s: the test ends it


async def post(http: aiohttp.ClientSession, gw: GatewayProcess, name: str,
               body: dict[str, Any] | None = None) -> tuple[int, dict[str, str], bytes]:
    async with http.post(f"{gw.url}/v1/chat/completions", json=body or chat_body(stream=False),
                         headers={"Authorization": f"Bearer {raw_key(name)}"}) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def open_stream(http: aiohttp.ClientSession, gw: GatewayProcess, name: str
                      ) -> aiohttp.ClientResponse:
    """A stream that keeps running until the test closes it (a client disconnect)."""
    resp = await http.post(f"{gw.url}/v1/chat/completions",
                           json=chat_body(stream=True, **LONG_STREAM),
                           headers={"Authorization": f"Bearer {raw_key(name)}"})
    if resp.status == 200:
        assert (await resp.content.readline()).startswith(b"data: ")
    return resp


def error_code(body: bytes) -> str:
    data = body[6:] if body.startswith(b"data: ") else body
    return str(orjson.loads(data)["error"]["code"])


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


# --- exactness across processes -------------------------------------------------------------

async def test_burst_is_exact_across_two_processes(
        redis_url: str, redis_prefix: str, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    # Burst 20 and one token a minute: over the test's second, refill adds 1/60 of a token.
    cfg = config(redis_url, redis_prefix, [key("exact", burst=20, requests_per_minute=1)])
    async with gateway_processes(cfg, 2, tmp_path) as gateways:
        results = await asyncio.gather(*(post(http, gateways[i % 2], "exact")
                                         for i in range(120)))
    assert all("is not answering" not in gw.logs() for gw in gateways)  # no fallback
    statuses = Counter(status for status, _, _ in results)
    assert statuses == {200: 20, 429: 100}
    assert {error_code(body) for status, _, body in results if status == 429} \
        == {"rate_limit_exceeded"}


async def test_refill_rate_and_retry_after_across_two_processes(
        redis_url: str, redis_prefix: str, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    # The burst is a second's refill: a stall shorter than that (a busy CI host) loses no
    # tokens to a full bucket, so what passes measures the limiter, not the host.
    rate, burst, seconds = 100.0, 100, 3.0
    cfg = config(redis_url, redis_prefix, [
        key("refill", burst=burst, requests_per_minute=rate * 60),
        key("retry", burst=1, requests_per_minute=120)])
    bucket, _ = key_names(redis_prefix, "refill")
    redis = aioredis.Redis.from_url(redis_url)
    try:
        async with gateway_processes(cfg, 2, tmp_path) as (a, b):
            # A retry after Retry-After succeeds, on the other process too.
            assert (await post(http, a, "retry"))[0] == 200
            status, headers, _ = await post(http, b, "retry")
            assert status == 429 and headers["Retry-After"] == "1"
            wait_ms = int(headers["retry-after-ms"])
            assert 0 < wait_ms <= 500
            await asyncio.sleep(wait_ms / 1000)
            assert (await post(http, b, "retry"))[0] == 200

            # Time is Redis' own: TIME just before the clients start (the bucket is full), and
            # the bucket's record of when it gave its last token (microseconds) at the end.
            seconds_now, micros = await redis.time()
            started = seconds_now + micros / 1e6
            clock_read = time.monotonic()
            first_done = float("inf")
            statuses: list[int] = []
            stop = clock_read + seconds

            async def client(gw: GatewayProcess) -> None:
                nonlocal first_done
                while time.monotonic() < stop and len(statuses) < 100_000:
                    statuses.append((await post(http, gw, "refill"))[0])
                    first_done = min(first_done, time.monotonic())

            await asyncio.gather(*(client((a, b)[i % 2]) for i in range(6)))
            state = await redis.hmget(bucket, ["tokens", "at"])
        assert all("is not answering" not in gw.logs() for gw in (a, b))  # no fallback
    finally:
        await redis.aclose()
    assert set(statuses) == {200, 429}
    admitted = statuses.count(200)
    elapsed = int(state[1]) / 1e6 - started
    # The first token was taken after `started`, by at most the first answer's delay.
    lag = first_done - clock_read
    assert elapsed > seconds * 0.9 and lag < 1
    # Never more than burst + rate x time, and never more than a token less.
    assert burst + rate * (elapsed - lag) - 1 <= admitted <= burst + rate * elapsed, \
        (admitted, elapsed, lag)
    measured = (admitted - burst) / (elapsed - lag / 2)  # the rate once the burst is spent
    assert abs(measured / rate - 1) < 0.02, (measured, lag)


# --- concurrency leases across processes ----------------------------------------------------

async def test_stream_cap_holds_across_processes_and_a_disconnect_frees_a_slot(
        redis_url: str, redis_prefix: str, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    cfg = config(redis_url, redis_prefix, [key("streams", max_concurrent_streams=4)])
    async with gateway_processes(cfg, 2, tmp_path) as (a, b):
        streams = [await open_stream(http, gw, "streams") for gw in (a, b, a, b)]
        try:
            assert [s.status for s in streams] == [200] * 4
            for gw in (a, b):
                status, _, body = await post(http, gw, "streams", chat_body(stream=True))
                assert status == 429 and error_code(body) == "concurrency_limit_exceeded"
            # Past the lease time the leases still hold: they are renewed while streams run.
            await asyncio.sleep(LEASE_SECONDS * 1.3)
            status, _, body = await post(http, b, "streams", chat_body(stream=True))
            assert status == 429 and error_code(body) == "concurrency_limit_exceeded"
            streams.pop(0).close()  # a client of process A disconnects
            started = time.monotonic()
            for _ in range(40):
                replacement = await open_stream(http, b, "streams")
                streams.append(replacement)
                if replacement.status == 200:
                    break
                await asyncio.sleep(0.02)
            assert streams[-1].status == 200
            assert time.monotonic() - started < 1  # at once, not at a lease's expiry
        finally:
            for s in streams:
                s.close()


async def test_kill_9_frees_a_process_slots_within_the_lease_time(
        redis_url: str, redis_prefix: str, tmp_path: Path,
        http: aiohttp.ClientSession) -> None:
    cfg = config(redis_url, redis_prefix, [key("streams", max_concurrent_streams=4)])
    async with gateway_processes(cfg, 3, tmp_path) as (a, b, doomed):
        streams = [await open_stream(http, gw, "streams") for gw in (doomed, doomed, doomed, a)]
        try:
            assert [s.status for s in streams] == [200] * 4
            doomed.kill9()
            killed = time.monotonic()
            status, _, body = await post(http, b, "streams", chat_body(stream=True))
            assert status == 429 and error_code(body) == "concurrency_limit_exceeded"
            opened: list[aiohttp.ClientResponse] = []
            while time.monotonic() - killed < LEASE_SECONDS + 2 and len(opened) < 3:
                stream = await open_stream(http, b, "streams")
                streams.append(stream)
                if stream.status == 200:
                    opened.append(stream)
                else:
                    await asyncio.sleep(0.05)
            freed = time.monotonic() - killed
            assert len(opened) == 3, "the killed process's three slots did not come back"
            assert freed <= LEASE_SECONDS + 1.5  # renewals stopped; slack for a busy host
            # Process A's stream still holds the fourth slot.
            status, _, body = await post(http, b, "streams", chat_body(stream=True))
            assert status == 429 and error_code(body) == "concurrency_limit_exceeded"
        finally:
            for s in streams:
                s.close()


# --- scripts, one round trip, state that expires --------------------------------------------

async def test_one_round_trip_per_check_and_state_that_expires() -> None:
    with redis_server() as server:
        settings = RedisSettings(url=server.url, key_prefix="gwtest", lease_seconds=3)
        client = connect(settings)
        limiter = RedisLimiter(client, settings)
        monitor_client = aioredis.Redis.from_url(server.url)
        try:
            ck = ClientKey(name="rt", requests_per_minute=60, burst=10, max_concurrent_streams=2)
            await limiter.acquire(ck, stream=False)  # loads the script (NOSCRIPT, SCRIPT LOAD)
            async with monitor_client.monitor() as monitor:
                await asyncio.sleep(0.05)
                decision = await limiter.acquire(ck, stream=True)
                assert decision.lease is not None
                await limiter.release(ck, decision.lease)
                commands: list[dict[str, Any]] = []
                with contextlib.suppress(TimeoutError):
                    while len(commands) < 100:
                        commands.append(await asyncio.wait_for(monitor.next_command(), 0.3))
            sent = [c["command"].split()[0].upper() for c in commands
                    if c.get("client_type") != "lua"]
            assert sent == ["EVALSHA", "ZREM"], commands

            fresh = ClientKey(name="ttl", requests_per_minute=60, burst=10,
                              max_concurrent_streams=2)
            bucket, streams = key_names("gwtest", "ttl")
            raw = server.client()
            try:
                await limiter.acquire(fresh, stream=True)
                # One token short of full at one a second: the bucket lives until it is full;
                # the streams set lives one lease time (3 s) past its newest lease.
                assert 900 < raw.pttl(bucket) <= 1001
                assert 2900 < raw.pttl(streams) <= 3000
                assert raw.zcard(streams) == 1
            finally:
                raw.close()
        finally:
            await limiter.close()
            await client.aclose()
            await monitor_client.aclose()


async def test_a_burst_of_checks_shares_round_trips_on_one_connection() -> None:
    with redis_server() as server:
        settings = RedisSettings(url=server.url, key_prefix="gwtest")
        client = connect(settings)
        limiter = RedisLimiter(client, settings)
        raw = server.client()
        try:
            for name in ("cold", "warm", "flushed"):
                if name == "flushed":
                    raw.script_flush()
                raw.config_resetstat()
                key = ClientKey(name=name, requests_per_minute=1, burst=50,
                                max_concurrent_streams=5)
                decisions = await asyncio.gather(*(limiter.acquire(key, stream=False)
                                                   for _ in range(300)))
                assert sum(d.allowed for d in decisions) == 50, name
                assert sorted(d.remaining for d in decisions if d.allowed) == list(range(50))
                stats = raw.info("commandstats")
                if name == "warm":
                    assert stats["cmdstat_evalsha"]["calls"] == 300  # one script call a check
                else:  # every check met NOSCRIPT; the script was loaded once for them all
                    assert stats["cmdstat_script|load"]["calls"] == 1, name
            assert limiter.backend_state == "redis"
            # The batcher's own connection, and the pool's one for SCRIPT LOAD: not 300.
            gateway_clients = [c for c in raw.client_list() if c["name"] == "gateway"]
            assert len(gateway_clients) <= 2, gateway_clients
        finally:
            raw.close()
            await limiter.close()
            await client.aclose()


async def test_scripts_survive_script_flush(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    with redis_server() as server:
        cfg = config(server.url, "gwtest", [
            key("flush", burst=3, requests_per_minute=1, max_concurrent_streams=1)])
        async with gateway_processes(cfg, 2, tmp_path) as (a, b):
            stream = await open_stream(http, a, "flush")  # takes the first token and the slot
            try:
                assert stream.status == 200
                raw = server.client()
                assert raw.script_flush() is True
                statuses = [(await post(http, gw, "flush"))[0] for gw in (b, a, b)]
                assert statuses == [200, 200, 429]
                raw.script_flush()
                # Renewals reload their script too: past the lease time the lease is alive.
                await asyncio.sleep(LEASE_SECONDS * 1.3)
                _, streams = key_names("gwtest", "flush")
                assert raw.zcard(streams) == 1
                status, _, body = await post(http, b, "flush", chat_body(stream=True))
                assert status == 429 and error_code(body) == "concurrency_limit_exceeded"
            finally:
                stream.close()
            for _ in range(50):  # the disconnect's release removes the lease at once
                if raw.zcard(streams) == 0:
                    break
                await asyncio.sleep(0.01)
            assert raw.zcard(streams) == 0
            raw.close()


# --- Redis down -----------------------------------------------------------------------------

async def test_redis_stopped_and_restarted_under_both_policies(
        tmp_path: Path, http: aiohttp.ClientSession) -> None:
    with redis_server() as server:
        # "probe" refills slowly: its bucket, the sign a check went through Redis, lives a second
        # (at 100 tokens a second it would be gone 11 ms after the check).
        keys = [key("steady"), key("tight", burst=3, requests_per_minute=1),
                key("probe", requests_per_minute=60)]
        open_cfg = config(server.url, "gwtest", keys, failure_policy="fail_open")
        closed_cfg = config(server.url, "gwtest", keys, failure_policy="fail_closed")
        async with gateway_processes([open_cfg, closed_cfg], 2, tmp_path) as (fail_open,
                                                                               fail_closed):
            for gw in (fail_open, fail_closed):
                assert (await post(http, gw, "steady"))[0] == 200

            server.stop()  # SIGKILL
            started = time.monotonic()
            open_statuses = [(await post(http, fail_open, "steady"))[0] for _ in range(20)]
            closed = [await post(http, fail_closed, "steady") for _ in range(20)]
            assert time.monotonic() - started < 5, "requests waited on a dead Redis"
            assert open_statuses == [200] * 20
            assert {status for status, _, _ in closed} == {503}
            error = orjson.loads(closed[0][2])["error"]
            assert error["code"] == "service_unavailable" and "Redis" in error["message"]
            assert closed[0][1]["Retry-After"] == "1"
            # fail_open still limits, per process.
            tight = [(await post(http, fail_open, "tight"))[0] for _ in range(4)]
            assert tight == [200, 200, 200, 429]

            server.start()  # same port, empty: no data, no scripts
            recovered = False
            for _ in range(100):
                status, _, _ = await post(http, fail_closed, "steady")
                assert status in (200, 503)
                if status == 200:
                    recovered = True
                    break
                await asyncio.sleep(0.05)
            assert recovered, "fail_closed gateway did not go back to Redis"
            raw = server.client()
            bucket, _ = key_names("gwtest", "probe")
            for _ in range(100):  # fail_open is back on Redis when its checks land there
                assert (await post(http, fail_open, "probe"))[0] == 200
                if raw.exists(bucket):
                    break
                await asyncio.sleep(0.05)
            assert raw.exists(bucket), "fail_open gateway did not go back to Redis"
            raw.close()
        for gw in (fail_open, fail_closed):
            logs = gw.logs()
            assert logs.count("is not answering") == 1, logs[-3000:]
            assert logs.count("answers again") == 1
            assert '"status":500' not in logs and '"status":502' not in logs


async def test_noscript_replies_read_after_the_reload_do_not_load_again() -> None:
    """Two batches on the wire when the scripts were flushed both meet NOSCRIPT. The first
    one's replies start the reload; the second's, read only once it has finished (a busy host:
    this failed under a full CI run), must retry with it: still one SCRIPT LOAD."""
    with redis_server() as server:
        proxy = Blackhole(server.url)
        settings = RedisSettings(url=await proxy.start(), key_prefix="gwtest",
                                 timeout_seconds=10)
        limiter = RedisLimiter(connect(settings), settings)
        raw = server.client()

        def calls(stat: str, section: str = "commandstats") -> int:
            found = raw.info(section).get(stat, {})
            return int(found.get("calls", found.get("count", 0)))

        key = ClientKey(name="reload", requests_per_minute=1, burst=500,
                        max_concurrent_streams=5)
        try:
            await limiter.acquire(key, stream=False)  # the batcher's connection is the first
            raw.script_flush()
            raw.config_resetstat()
            proxy.hold_only = 0
            proxy.replies.clear()
            checks = []
            for wave in (1, 2):  # two batches, each executed (NOSCRIPT) before the next
                checks += [asyncio.ensure_future(limiter.acquire(key, stream=False))
                           for _ in range(50)]
                await wait_until_async(
                    lambda n=50 * wave: calls("errorstat_NOSCRIPT", "errorstats") == n,
                    5, f"batch {wave} to meet NOSCRIPT")
            proxy.replies.set()  # the first batch's replies only: the proxy holds the next
            proxy.replies.clear()
            # Its 50 checks reload the script and retry, and Redis runs them: the reload has
            # finished, while the second batch's NOSCRIPT replies are still on their way.
            await wait_until_async(lambda: calls("cmdstat_evalsha") == 150, 5, "the retries")
            assert calls("cmdstat_script|load") == 1
            proxy.replies.set()
            decisions = await asyncio.gather(*checks)
            assert all(d.allowed for d in decisions)
            # Each took its own token: the first check left 499.
            assert sorted(d.remaining for d in decisions) == list(range(399, 499))
            assert calls("cmdstat_script|load") == 1
            assert calls("cmdstat_evalsha") == 200  # each check: NOSCRIPT, then its retry
            assert limiter.backend_state == "redis"
        finally:
            proxy.replies.set()
            raw.close()
            await limiter.close()
            await proxy.close()


async def test_a_blackholed_redis_costs_one_timeout_not_one_per_request(
        mock_upstream: Upstream, start_gateway: Callable[..., Any], redis_url: str,
        redis_prefix: str, caplog: pytest.LogCaptureFixture,
        http: aiohttp.ClientSession) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.redis")
    proxy = Blackhole(redis_url)
    proxy_url = await proxy.start()
    try:
        timeout = 1.0  # long, so a busy host's own delays cannot pass for it
        app, base = await start_gateway(settings_for(mock_upstream.url, redis={
            "url": proxy_url, "key_prefix": redis_prefix, "timeout_seconds": timeout}))
        limiter = app[LIMITER]
        assert isinstance(limiter, RedisLimiter)
        headers = {"Authorization": "Bearer sk-test-alice-000000000001"}

        async def request() -> tuple[int, float]:
            started = time.monotonic()
            async with http.post(f"{base}/v1/chat/completions", json=chat_body(stream=False),
                                 headers=headers) as resp:
                await resp.read()
                return resp.status, time.monotonic() - started

        assert (await request())[0] == 200 and limiter.backend_state == "redis"
        proxy.silent = True
        # The first request waits out one timeout; meanwhile the event loop keeps serving.
        first = asyncio.ensure_future(request())
        await asyncio.sleep(0.05)
        started = time.monotonic()
        async with http.get(f"{base}/healthz") as resp:
            assert resp.status == 200
        assert time.monotonic() - started < timeout / 2
        status, waited = await first
        assert status == 200 and timeout * 0.9 <= waited < timeout + 1
        assert limiter.backend_state == "fallback"
        # After it, no request pays a timeout, though Redis stays silent past several probes.
        results: list[tuple[int, float]] = []
        stop = time.monotonic() + 2.5
        while time.monotonic() < stop and len(results) < 500:
            results.append(await request())
            await asyncio.sleep(0.01)  # within the key's 100 requests a second
        assert {status for status, _ in results} == {200}
        assert max(took for _, took in results) < timeout * 0.9
        assert limiter.fallback_decisions >= len(results)

        proxy.silent = False
        for _ in range(80):  # the next probe: within a probe interval plus a ping
            if limiter.backend_state == "redis":
                break
            await asyncio.sleep(0.05)
        assert limiter.backend_state == "redis"
        await limiter.ping()  # what readiness checks call
        assert (await request())[0] == 200
        warnings = [r.getMessage() for r in caplog.records if r.name == "gateway.redis"]
        assert sum("is not answering" in w for w in warnings) == 1, warnings
        assert sum("answers again" in w for w in warnings) == 1, warnings
    finally:
        await proxy.close()


async def test_a_stream_ending_during_a_blip_frees_its_slot_when_redis_is_back(
        redis_url: str, redis_prefix: str) -> None:
    proxy = Blackhole(redis_url)
    settings = RedisSettings(url=await proxy.start(), key_prefix=redis_prefix,
                             timeout_seconds=0.2, lease_seconds=4)
    client = connect(settings)
    limiter = RedisLimiter(client, settings)
    raw = aioredis.Redis.from_url(redis_url)
    try:
        key = ClientKey(name="blip", requests_per_minute=600, burst=10, max_concurrent_streams=5)
        _, streams = key_names(redis_prefix, "blip")
        ended, running = [await limiter.acquire(key, stream=True) for _ in range(2)]
        acquired = time.monotonic()
        assert ended.lease and running.lease and await raw.zcard(streams) == 2
        proxy.silent = True
        await limiter.release(key, ended.lease)  # its ZREM times out
        assert limiter.backend_state == "fallback"
        proxy.silent = False
        for _ in range(100):
            if await raw.zcard(streams) == 1:
                break
            await asyncio.sleep(0.05)
        # Removed by the next renewal after Redis came back, before the lease would expire;
        # the running stream's lease is renewed.
        assert await raw.zscore(streams, ended.lease) is None
        assert time.monotonic() - acquired < settings.lease_seconds - 0.2
        assert await raw.zscore(streams, running.lease) is not None
        assert limiter.backend_state == "redis"
    finally:
        await limiter.close()
        await client.aclose()
        await raw.aclose()
        await proxy.close()


async def test_batched_commands_each_get_their_own_reply_error_replies_included(
        redis_url: str, redis_prefix: str) -> None:
    """RedisBatcher: commands issued together, and while a batch is in flight, travel in
    pipelines; each reply, an error reply included, reaches its own caller, as Redis sent it."""
    client = aioredis.Redis.from_url(redis_url)
    batch = RedisBatcher(client)
    try:
        key = f"{redis_prefix}:batcher"
        first = asyncio.ensure_future(batch.execute("SET", key, "1"))
        await asyncio.sleep(0)  # the first write is out; its reply not yet in
        replies = await asyncio.gather(first, *(batch.execute("INCR", key) for _ in range(50)))
        assert replies[0] == b"OK" and sorted(replies[1:]) == list(range(2, 52))
        with pytest.raises(ResponseError):
            await batch.execute("INCR", key, "not-a-number", "extra")
        assert await batch.execute("GET", key) == b"51"
        await client.delete(key)
    finally:
        await batch.close()
        await client.aclose()
