"""``[redis] mode = "sentinel"``: the gateway finds the primary through the sentinels, as an ACL
user, and follows a failover by itself.

A real primary, its replica and three ``redis-sentinel`` processes on free loopback ports
(``tests/redis_topologies.py``). On the data nodes the default user (which replication and the
sentinels use) may touch no key of the gateway's: nothing works without the configured user.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis_topologies import LocalSentinels, local_sentinels

from gateway.appkeys import LIMITER
from gateway.ratelimit.redis import RedisLimiter, key_names
from gateway.redisclient import open_redis
from gateway.request_info import ClientKey
from gateway.settings import RedisSettings

from clients import AUTH, chat_body
from conftest import Upstream, settings_for

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
            assert int(tokens_on(old, bucket) or 0) == 995

            sentinels.failover()
            deadline = time.monotonic() + 20
            while sentinels.primary_port() == old and time.monotonic() < deadline:
                assert (await limiter.acquire(key, stream=False)).allowed  # fail_open at worst
            new = sentinels.primary_port()
            promoted = time.monotonic()
            assert new != old, "the sentinels did not fail over"
            # The gateway writes to the new primary, through Redis, with no restart.
            fallback_before = limiter.fallback_decisions
            deadline = time.monotonic() + 10
            while True:
                before = tokens_on(new, bucket)
                decision = await limiter.acquire(key, stream=False)
                after = tokens_on(new, bucket)
                if (before is not None and after is not None and 0.5 < before - after < 1.5
                        and limiter.fallback_decisions == fallback_before):
                    break
                fallback_before = limiter.fallback_decisions
                assert time.monotonic() < deadline, ("the gateway did not follow the failover",
                                                     before, after, limiter.fallback_decisions,
                                                     client.connection_pool.master_address)
                time.sleep(0.05)
            assert decision.allowed and limiter.backend_state == "redis"
            # Within about a second, while the old primary still takes writes (the sentinels
            # demote it some 8 s after a SENTINEL FAILOVER).
            assert time.monotonic() - promoted < 3
            with admin(old) as client_of_old:
                assert client_of_old.info("replication")["role"] == "master"
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
