"""``[redis] mode = "sentinel"``: the gateway finds the primary through the sentinels, as an ACL
user, and follows a failover by itself; sentinels that require a password
(``sentinel_password``) are asked with it; ``gateway keys`` keeps its keys there.

A real primary, its replica and three ``redis-sentinel`` processes on free loopback ports
(``tests/redis_topologies.py``). On the data nodes the default user (which replication and the
sentinels use) may touch no key of the gateway's: nothing works without the configured user.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from redis_topologies import LocalSentinels, local_sentinels

from gateway.appkeys import LIMITER
from gateway.ratelimit.redis import RedisLimiter, key_names
from gateway.redis.keystore import store_keys
from gateway.redis.lifecycle import open_redis
from gateway.redis.topology import PROBE_SECONDS, close, connect, follow_sentinel_primary
from gateway.request_info import ClientKey
from gateway.settings import RedisSettings, hash_key

from clients import AUTH, chat_body
from conftest import KEY, Upstream, settings_for
from servers import free_port, gateway_processes, run_cli, write_config

USER, PASSWORD = "gwuser", "sentinel-test-secret-pw"
SENTINEL_PASSWORD = "sentinels-own-secret-pw"
ACL = ["--user", USER, "on", f">{PASSWORD}", "~gws*", "+@all",
       "--user", "default", "on", "nopass", "~not-the-gateways:*", "&*", "+@all"]


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[LocalSentinels]:
    with local_sentinels(tmp_path, ACL) as s:
        yield s


@pytest.fixture
def guarded_sentinels(tmp_path: Path) -> Iterator[LocalSentinels]:
    """Sentinels that answer nothing (but AUTH) without ``SENTINEL_PASSWORD``."""
    with local_sentinels(tmp_path, ACL, sentinel_password=SENTINEL_PASSWORD) as s:
        yield s


def sentinel_settings(s: LocalSentinels, prefix: str, password: str = PASSWORD,
                      sentinel_password: str = "") -> RedisSettings:
    return RedisSettings(mode="sentinel", sentinels=tuple(s.addresses),
                         service_name=s.SERVICE, username=USER, password=password,
                         sentinel_password=sentinel_password, key_prefix=prefix,
                         timeout_seconds=1.0)


def redis_section(s: LocalSentinels, prefix: str, **more: Any) -> dict[str, Any]:
    """``[redis]`` for guarded sentinels, as a config file has it."""
    return {"mode": "sentinel", "sentinels": s.addresses, "service_name": s.SERVICE,
            "username": USER, "password": PASSWORD, "sentinel_password": SENTINEL_PASSWORD,
            "key_prefix": prefix, "timeout_seconds": 1.0, **more}


async def post_chat(base: str, key: str = KEY) -> tuple[int, str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http, \
            http.post(f"{base}/v1/chat/completions", json=chat_body(stream=False),
                      headers={"Authorization": f"Bearer {key}"}) as resp:
        return resp.status, await resp.text()


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
                # Paced: the bucket (1,000 tokens, none back) must outlast a slow failover;
                # unpaced, 20 s of checks at loopback speed took them all (a CI run did).
                await asyncio.sleep(0.05)
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
    app, base = await start_gateway(settings)  # type: ignore[operator]
    async with aiohttp.ClientSession() as http, http.post(
            f"{base}/v1/chat/completions", json=chat_body(stream=False),
            headers=AUTH) as resp:
        body = await resp.text()
    assert resp.status == 503 and app[LIMITER].backend_state == "unavailable"
    assert wrong not in body
    assert "gwprimary" in caplog.text  # the outage is logged, naming the service
    assert wrong not in caplog.text and PASSWORD not in caplog.text


@pytest.mark.parametrize("guarded", [False, True], ids=["open", "with a sentinel password"])
async def test_a_failover_is_heard_from_the_sentinels_at_once_without_waiting_for_a_poll(
        guarded: bool, tmp_path: Path) -> None:
    """``+switch-master`` on the sentinels' pub/sub: with the poll a minute apart, the client
    still learns the new primary within seconds of the failover (and its subscriptions, too,
    give sentinels that require one their password)."""
    password = SENTINEL_PASSWORD if guarded else ""
    with local_sentinels(tmp_path, ACL, sentinel_password=password) as sentinels:
        await _failover_is_heard_at_once(
            sentinels, sentinel_settings(sentinels, f"gws{time.monotonic_ns()}",
                                         sentinel_password=password))


async def _failover_is_heard_at_once(sentinels: LocalSentinels,
                                     settings: RedisSettings) -> None:
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


async def test_sentinels_that_do_not_answer_are_logged_once_at_warning_in_a_bounded_line(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.redis")
    sentinels = tuple(f"127.0.0.1:{free_port()}" for _ in range(8))
    settings = RedisSettings(mode="sentinel", sentinels=sentinels,
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
    assert max(len(r.getMessage()) for r in failures) < 600  # redis-py's text names all eight


async def test_sentinels_that_require_a_password_are_asked_with_sentinel_password(
        guarded_sentinels: LocalSentinels, mock_upstream: Upstream,
        start_gateway: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    prefix = f"gws{time.monotonic_ns()}"
    settings = settings_for(
        mock_upstream.url, redis=redis_section(guarded_sentinels, prefix,
                                               failure_policy="fail_closed"),
        # A refill too slow to matter within the test: the bucket keeps the check's mark.
        limits={"requests_per_minute": 1, "burst": 100})
    app, base = await start_gateway(settings)
    status, body = await post_chat(base)
    assert status == 200 and app[LIMITER].backend_state == "redis", body
    bucket = key_names(prefix, "alice")[0]
    primary = await asyncio.to_thread(guarded_sentinels.primary_port)
    tokens = await asyncio.to_thread(tokens_on, primary, bucket)
    assert tokens is not None and 98.5 < tokens < 99.5  # the check ran on the primary
    assert SENTINEL_PASSWORD not in caplog.text and PASSWORD not in caplog.text
    assert SENTINEL_PASSWORD not in body


@pytest.mark.parametrize("given", ["a wrong one", "none"])
async def test_a_wrong_or_missing_sentinel_password_applies_the_failure_policy_unlogged(
        given: str, guarded_sentinels: LocalSentinels, mock_upstream: Upstream,
        start_gateway: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-sentinel-pw-never-logged" if given == "a wrong one" else ""
    settings = settings_for(mock_upstream.url, redis=redis_section(
        guarded_sentinels, f"gws{time.monotonic_ns()}", sentinel_password=wrong,
        failure_policy="fail_closed"))
    app, base = await start_gateway(settings)
    status, body = await post_chat(base)
    assert status == 503 and app[LIMITER].backend_state == "unavailable"
    assert "gwprimary" in caplog.text  # the outage is logged, naming the service
    for secret in (wrong or SENTINEL_PASSWORD, SENTINEL_PASSWORD, PASSWORD):
        assert secret not in caplog.text and secret not in body


async def test_keys_cli_adds_lists_and_revokes_keys_through_guarded_sentinels(
        guarded_sentinels: LocalSentinels, tmp_path: Path) -> None:
    """``gateway keys`` finds the primary through the sentinels (with their password) and
    writes the store there; a ``gateway serve`` process in sentinel mode reads it."""
    prefix = f"gws{time.monotonic_ns()}"
    cache_seconds = 0.5
    config = {"server": {"drain_seconds": 0.5}, "upstream": {"url": "mock"},
              "redis": redis_section(guarded_sentinels, prefix, key_cache_seconds=cache_seconds,
                                     failure_policy="fail_closed")}
    path = str(write_config(tmp_path / "keys.toml", config))
    added = await asyncio.to_thread(run_cli, "keys", "add", "--name", "sam", "--burst", "5",
                                    "--config", path)
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert key.startswith("sk-gw-")
    records, _ = store_keys(prefix)
    primary = await asyncio.to_thread(guarded_sentinels.primary_port)
    with admin(primary) as client:
        assert client.hexists(records, hash_key(key))  # on the primary the sentinels name

    listed = await asyncio.to_thread(run_cli, "keys", "list", "--config", path)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
    assert rows["sam"][1:4] == ["redis", "60", "5"]

    async with gateway_processes(config, 1, tmp_path) as (gateway,):
        assert (await post_chat(gateway.url, key))[0] == 200
        revoked = await asyncio.to_thread(run_cli, "keys", "revoke", "sam", "--config", path)
        assert revoked.returncode == 0, revoked.stderr
        deadline = time.monotonic() + cache_seconds + 2
        # Until its cached record expires the key still counts: a 200, or a 429 once the
        # polling has spent its burst of 5; then a 401.
        while (status := (await post_chat(gateway.url, key))[0]) != 401:
            assert status in (200, 429) and time.monotonic() < deadline, status
            await asyncio.sleep(0.05)
    assert "sam" not in (await asyncio.to_thread(run_cli, "keys", "list", "--config",
                                                 path)).stdout
    for text in (added.stderr, listed.stdout, listed.stderr, revoked.stderr, gateway.logs()):
        assert SENTINEL_PASSWORD not in text and PASSWORD not in text
