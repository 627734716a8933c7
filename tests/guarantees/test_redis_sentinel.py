"""``[redis] mode = "sentinel"``: the gateway finds the primary through the sentinels, as an ACL
user, and follows a failover by itself.

A real primary, its replica and three ``redis-sentinel`` processes on free loopback ports
(``tests/redis_topologies.py``). On the data nodes the default user (which replication and the
sentinels use) may touch no key of the gateway's: nothing works without the configured user.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis_topologies import LocalSentinels, local_sentinels

from gateway.appkeys import LIMITER
from gateway.ratelimit.redis import RedisLimiter, key_names
from gateway.redis_topology import PROBE_SECONDS, close, connect, follow_sentinel_primary
from gateway.redisclient import open_redis
from gateway.request_info import ClientKey
from gateway.settings import RedisSettings

from clients import AUTH, chat_body
from conftest import Upstream, settings_for
from servers import free_port

USER, PASSWORD = "gwuser", "sentinel-test-secret-pw"
ACL = ["--user", USER, "on", f">{PASSWORD}", "~gws*", "+@all",
       "--user", "default", "on", "nopass", "~not-the-gateways:*", "&*", "+@all"]


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[LocalSentinels]:
    with local_sentinels(tmp_path, ACL) as s:
        yield s


def sentinel_settings(s: LocalSentinels, prefix: str, password: str = PASSWORD,
                      ) -> RedisSettings:
    return RedisSettings(mode="sentinel", sentinels=tuple(s.addresses),
                         service_name=s.SERVICE, username=USER, password=password,
                         key_prefix=prefix, timeout_seconds=1.0)


def admin(port: int) -> redis.Redis:
    return redis.Redis(port=port, username=USER, password=PASSWORD, socket_timeout=2)


def role_of(port: int) -> str:
    with admin(port) as client:
        return str(client.info("replication")["role"])


def tokens_on(port: int, bucket: str) -> float | None:
    with admin(port) as client:
        raw = client.hget(bucket, "tokens")
    return None if raw is None else float(raw)


async def test_sentinel_failover_the_gateway_finds_the_new_primary(
        sentinels: LocalSentinels) -> None:
    prefix = f"gws{time.monotonic_ns()}"
    settings = sentinel_settings(sentinels, prefix)
    key = ClientKey(name="alice", requests_per_minute=0.001, burst=1000,
                    max_concurrent_streams=10, models=None)
    bucket = key_names(prefix, key.name)[0]
    old = sentinels.primary_port()
    async with open_redis(settings) as (client, breaker):
        limiter = RedisLimiter(client, settings, breaker)
        try:
            for _ in range(5):
                assert (await limiter.acquire(key, stream=False)).allowed
            assert int(await asyncio.to_thread(tokens_on, old, bucket) or 0) == 995

            await asyncio.to_thread(sentinels.failover)
            deadline = time.monotonic() + 20
            while (await asyncio.to_thread(sentinels.primary_port) == old
                   and time.monotonic() < deadline):
                assert (await limiter.acquire(key, stream=False)).allowed  # fail_open at worst
            new = await asyncio.to_thread(sentinels.primary_port)
            promoted = time.monotonic()
            assert new != old, "the sentinels did not fail over"
            # The gateway writes to the new primary, through Redis, with no restart.
            fallback_before = limiter.fallback_decisions
            deadline = time.monotonic() + 10
            while True:
                before = await asyncio.to_thread(tokens_on, new, bucket)
                decision = await limiter.acquire(key, stream=False)
                after = await asyncio.to_thread(tokens_on, new, bucket)
                if (before is not None and after is not None and 0.5 < before - after < 1.5
                        and limiter.fallback_decisions == fallback_before):
                    break
                fallback_before = limiter.fallback_decisions
                assert time.monotonic() < deadline, ("the gateway did not follow the failover",
                                                     before, after, limiter.fallback_decisions,
                                                     client.connection_pool.master_address)
                await asyncio.sleep(0.05)
            assert decision.allowed and limiter.backend_state == "redis"
            # At once (the sentinels' +switch-master; else the next poll, a second apart), while
            # the old primary still takes writes (the sentinels demote it some 8 s after a
            # SENTINEL FAILOVER). Slack for a busy host: a few probe intervals.
            assert time.monotonic() - promoted < 1 + 3 * PROBE_SECONDS
            assert await asyncio.to_thread(role_of, old) == "master"
        finally:
            await limiter.close()


async def test_a_wrong_password_applies_the_failure_policy_and_no_log_line_shows_a_secret(
        sentinels: LocalSentinels, mock_upstream: Upstream, start_gateway: object,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    wrong = "wrong-pw-never-logged"
    redis_settings = sentinel_settings(sentinels, f"gws{time.monotonic_ns()}", password=wrong)
    settings = settings_for(mock_upstream.url, redis={
        "mode": "sentinel", "sentinels": list(redis_settings.sentinels),
        "service_name": redis_settings.service_name, "username": USER, "password": wrong,
        "key_prefix": redis_settings.key_prefix, "failure_policy": "fail_closed"})
    import aiohttp

    app, base = await start_gateway(settings)  # type: ignore[operator]
    async with aiohttp.ClientSession() as http, http.post(
            f"{base}/v1/chat/completions", json=chat_body(stream=False),
            headers=AUTH) as resp:
        body = await resp.text()
    assert resp.status == 503 and app[LIMITER].backend_state == "unavailable"
    assert wrong not in body
    assert "gwprimary" in caplog.text  # the outage is logged, naming the service
    assert wrong not in caplog.text and PASSWORD not in caplog.text


async def test_a_failover_is_heard_from_the_sentinels_at_once_without_waiting_for_a_poll(
        sentinels: LocalSentinels) -> None:
    """``+switch-master`` on the sentinels' pub/sub: with the poll a minute apart, the client
    still learns the new primary within seconds of the failover."""
    settings = sentinel_settings(sentinels, f"gws{time.monotonic_ns()}")
    client = connect(settings)
    follower = asyncio.ensure_future(follow_sentinel_primary(client, settings, seconds=60))
    try:
        old = sentinels.primary_port()
        pool = client.connection_pool
        await asyncio.sleep(0.5)  # subscribed, and the first answer known
        assert pool.master_address == ("127.0.0.1", old)  # type: ignore[attr-defined]
        await asyncio.to_thread(sentinels.failover)
        deadline = time.monotonic() + 10
        while pool.master_address == ("127.0.0.1", old):  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "the failover was not heard"
            await asyncio.sleep(0.05)
        assert pool.master_address[1] != old  # type: ignore[attr-defined]
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await close(client)


async def test_sentinels_that_do_not_answer_are_logged_once_at_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.redis")
    settings = RedisSettings(mode="sentinel", sentinels=(f"127.0.0.1:{free_port()}",),
                             service_name="nobody", timeout_seconds=0.2)
    client = connect(settings)
    follower = asyncio.ensure_future(follow_sentinel_primary(client, settings, seconds=0.1))
    await asyncio.sleep(1.0)
    follower.cancel()
    await asyncio.gather(follower, return_exceptions=True)
    await close(client)
    failures = [r for r in caplog.records if "cannot find the primary" in r.getMessage()]
    assert len(failures) > 3
    assert [r.levelno for r in failures].count(logging.WARNING) == 1
    assert failures[0].levelno == logging.WARNING
