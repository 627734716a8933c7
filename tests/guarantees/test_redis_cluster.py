"""``[redis] mode = "cluster"``: limits stay exact on a Redis Cluster, and its faults cost only
the seconds they last.

A real cluster of six ``redis-server`` processes (3 primaries, 3 replicas) on free loopback
ports (``tests/redis_topologies.py``); gateways run as ``gateway serve`` processes, or the
limiter runs in the test for the faults that need its counts. One cluster serves the module's
tests that leave it whole; the test that kills a primary has a cluster of its own.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from redis_topologies import LocalCluster, local_cluster, name_on_slot, on_node, tag_slot

from gateway.errors import ServiceUnavailable
from gateway.ratelimit.redis import RedisLimiter, key_names
from gateway.readiness import redis_check
from gateway.redis.lifecycle import open_redis
from gateway.redis.topology import PROBE_SECONDS, node_of
from gateway.request_info import ClientKey
from gateway.settings import RedisSettings

from clients import chat_body
from servers import GatewayProcess, gateway_processes, run_cli, write_config

LEASE_SECONDS = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with local_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def gateway_config(url: str, prefix: str, keys: list[dict[str, Any]] | None = None
                   ) -> dict[str, Any]:
    return {
        "server": {"drain_seconds": 0.5},
        "upstream": {"url": "mock"},
        "redis": {"mode": "cluster", "url": url, "key_prefix": prefix,
                  "lease_seconds": LEASE_SECONDS, "timeout_seconds": 1.0},
        "keys": keys or [],
    }


def key_settings(prefix: str, url: str, **redis_settings: Any) -> RedisSettings:
    return RedisSettings(**{"mode": "cluster", "url": url, "key_prefix": prefix,
                            "timeout_seconds": 1.0, **redis_settings})


def client_key(name: str, burst: int = 1000) -> ClientKey:
    # A refill too slow to matter within a test: every token admitted comes from the burst.
    return ClientKey(name=name, requests_per_minute=0.001, burst=burst,
                     max_concurrent_streams=100, models=None)


async def chat(http: aiohttp.ClientSession, gw: GatewayProcess, key: str,
               stream: bool = False, **mock: Any) -> aiohttp.ClientResponse:
    return await http.post(f"{gw.url}/v1/chat/completions", json=chat_body(stream=stream, **mock),
                           headers={"Authorization": f"Bearer {key}"})


def keys_on(cluster: LocalCluster, prefix: str) -> dict[int, int]:
    """How many of the prefix's keys each primary holds (port -> count)."""
    counts: dict[int, int] = {}
    for port in cluster.primary_ports():
        with cluster.node(port).client() as client:
            counts[port] = sum(1 for _ in client.scan_iter(match=f"{prefix}:*", count=1000))
    return counts


async def test_two_processes_on_one_cluster_let_exactly_the_burst_through_for_a_cli_key(
        cluster: LocalCluster, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    prefix = f"gwc{time.monotonic_ns()}"
    config = gateway_config(cluster.url, prefix)
    path = str(write_config(tmp_path / "cli.toml", config))
    added = run_cli("keys", "add", "--name", "burst20", "--rpm", "0.001", "--burst", "20",
                    "--config", path)
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()

    async with gateway_processes(config, 2, tmp_path) as (a, b):
        async with http.get(f"{a.url}/readyz") as ready:  # every primary answers
            assert ready.status == 200 and (await ready.json())["checks"]["redis"] == "ok"

        async def one(gw: GatewayProcess) -> int:
            async with await chat(http, gw, key) as resp:
                await resp.read()
                return resp.status
        statuses = Counter(await asyncio.gather(*(one(gw) for gw in [a, b] * 60)))
    assert statuses == {200: 20, 429: 100}

    listed = run_cli("keys", "list", "--config", path)
    assert listed.returncode == 0 and "burst20" in listed.stdout, listed.stderr
    revoked = run_cli("keys", "revoke", "burst20", "--config", path)
    assert revoked.returncode == 0, revoked.stderr
    assert "burst20" not in run_cli("keys", "list", "--config", path).stdout


async def test_a_killed_process_stream_slots_come_back_within_the_lease_time(
        cluster: LocalCluster, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    prefix = f"gwc{time.monotonic_ns()}"
    key = "sk-test-streams-0123456789"
    config = gateway_config(cluster.url, prefix, [
        {"name": "streams", "key": key, "max_concurrent_streams": 2, "burst": 100,
         "requests_per_minute": 6000}])
    long_stream = {"chunks": 600, "chunk_delay": 0.05}  # 30 s: the test ends it
    async with gateway_processes(config, 2, tmp_path) as (survivor, doomed):
        streams = [await chat(http, doomed, key, stream=True, **long_stream) for _ in range(2)]
        try:
            assert [s.status for s in streams] == [200, 200]
            for s in streams:
                assert (await s.content.readline()).startswith(b"data: ")
            # Past the lease time the leases still hold: the doomed process renews them.
            await asyncio.sleep(LEASE_SECONDS * 1.3)
            async with await chat(http, survivor, key, stream=True) as refused:
                assert refused.status == 429
            doomed.kill9()
            killed = time.monotonic()
            async with await chat(http, survivor, key, stream=True) as refused:
                assert refused.status == 429  # the dead process's leases still count
            while time.monotonic() - killed < LEASE_SECONDS + 5:
                async with await chat(http, survivor, key, stream=True) as resp:
                    await resp.read()
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.05)
            assert resp.status == 200, "the killed process's slots did not come back"
            # The lease time, and slack for a busy 2-core host (a renewal round, a request).
            assert time.monotonic() - killed <= LEASE_SECONDS * 1.5 + 1.5
        finally:
            for s in streams:
                s.close()


async def test_clients_buckets_spread_over_every_primary(cluster: LocalCluster) -> None:
    prefix = f"gwc{time.monotonic_ns()}"
    async with open_redis(key_settings(prefix, cluster.url)) as (client, breaker):
        limiter = RedisLimiter(client, key_settings(prefix, cluster.url), breaker)
        try:
            decisions = await asyncio.gather(*(limiter.acquire(client_key(f"client-{i}"),
                                                               stream=True) for i in range(30)))
            assert all(d.allowed for d in decisions) and limiter.fallback_decisions == 0
            counts = keys_on(cluster, prefix)
            assert len(counts) == 3 and all(n >= 4 for n in counts.values()), counts
        finally:
            await limiter.close()


async def test_a_slot_migration_under_load_fails_no_check_and_keeps_limits_exact(
        cluster: LocalCluster) -> None:
    prefix = f"gwc{time.monotonic_ns()}"
    source = cluster.slot_owner(0)
    target = next(p for p in cluster.primary_ports() if p != source)
    moved = 300  # the source's lowest slots: redis-cli reshard moves those first
    names = [n for n in (f"mover-{i}" for i in range(5000)) if tag_slot(n) < moved][:24]
    assert len(names) == 24
    burst = 8
    settings = key_settings(prefix, cluster.url)
    async with open_redis(settings) as (client, breaker):
        limiter = RedisLimiter(client, settings, breaker)
        admitted: Counter[str] = Counter()

        async def round_of_checks() -> None:
            async with asyncio.timeout(10):  # a check that never answers fails, never hangs
                decisions = await asyncio.gather(*(
                    limiter.acquire(client_key(n, burst), stream=False) for n in names))
            admitted.update(n for n, d in zip(names, decisions, strict=True) if d.allowed)

        try:
            for _ in range(burst // 2):  # half of each bucket spent before the move
                await round_of_checks()
            reshard = cluster.reshard(source, target, moved)
            checks_during = 0
            while reshard.poll() is None and checks_during < 2000:
                await round_of_checks()
                checks_during += 1
                await asyncio.sleep(0.005)
            output = reshard.communicate(timeout=60)[0].decode(errors="replace")
            assert reshard.returncode == 0, output
            for _ in range(burst):
                await round_of_checks()
            assert checks_during >= 3, "the migration ended before checks ran during it"
            assert all(cluster.slot_owner(tag_slot(n)) == target for n in names)
            assert limiter.outages == 0 and limiter.fallback_decisions == 0
            assert admitted == dict.fromkeys(names, burst)
        finally:
            await limiter.close()


async def test_a_slot_stuck_migrating_keeps_its_keys_exact_through_ask_and_opens_no_breaker(
        cluster: LocalCluster) -> None:
    """ASK: the slot is MIGRATING on its owner, IMPORTING on another primary, and a client
    key's bucket and streams set have moved already. redis-py's cluster client would send
    ASKING on one pooled connection and the command on another (MOVED back, until "TTL
    exhausted", which opened the breaker for the whole source shard); the gateway sends both on
    one connection. Then the move completes: the next check's MOVED teaches the slot map the
    new owner."""
    prefix = f"gwc{time.monotonic_ns()}"
    name = f"asker-{time.monotonic_ns()}"
    slot = tag_slot(name)
    source = cluster.slot_owner(slot)
    target = next(p for p in cluster.primary_ports() if p != source)
    source_id, target_id = cluster.node_id(source), cluster.node_id(target)
    settings = key_settings(prefix, cluster.url)
    bucket, streams = key_names(prefix, name)
    async with open_redis(settings) as (client, breaker):
        limiter = RedisLimiter(client, settings, breaker)
        key = client_key(name, burst=10)
        try:
            stream = await limiter.acquire(key, stream=True)  # both keys exist on the source
            assert stream.allowed and stream.lease
            # More than one free connection to the target: ASKING and the command would part.
            node = client.get_node(host="127.0.0.1", port=target)
            assert node is not None
            await asyncio.gather(*(client.ping(target_nodes=node) for _ in range(4)))
            assert len(node._free) > 1

            await on_node(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            await on_node(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            assert await on_node(source, "MIGRATE", "127.0.0.1", target, "", 0, 5000,
                                 "KEYS", bucket, streams) == b"OK"
            decisions = [await limiter.acquire(key, stream=False) for _ in range(5)]
            decisions += await asyncio.gather(*(limiter.acquire(key, stream=False)
                                                for _ in range(6)))
            # Exact: 1 (the stream) + 9 of 11 checks; the 10th and 11th refused.
            assert sum(d.allowed for d in decisions) == 9
            assert limiter.outages == 0 and limiter.fallback_decisions == 0
            await limiter.release(key, stream.lease)  # ZREM: ASK followed too
            assert breaker.up and limiter.backend_state == "redis"

            # A key of the slot that has no state anywhere gets TRYAGAIN from the target (a
            # script of two keys, neither there yet) for as long as the slot is migrating: the
            # failure policy for that check, no node failure.
            fresh = client_key(name_on_slot(slot, "fresh"))
            assert (await limiter.acquire(fresh, stream=False)).allowed  # fail_open
            assert limiter.fallback_decisions == 1 and limiter.outages == 0 and breaker.up

            for port in cluster.primary_ports():  # the move completes, target first
                await on_node(port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
            decision = await limiter.acquire(key, stream=False)
            assert not decision.allowed and decision.refused_by == "requests"  # still exact
            assert (await limiter.acquire(fresh, stream=False)).allowed
            assert node_of(client, bucket) == f"127.0.0.1:{target}"  # learnt from MOVED
            assert limiter.outages == 0 and limiter.fallback_decisions == 1
        finally:
            await limiter.close()


async def test_a_slow_primary_delays_only_its_own_keys(cluster: LocalCluster) -> None:
    """One sender per primary: a check on a primary busy for a second does not hold back the
    checks on the others."""
    prefix = f"gwc{time.monotonic_ns()}"
    slow = cluster.slot_owner(0)
    slow_name = name_on_slot(0, "slow")
    fast_name = next(n for n in (f"fast-{i}" for i in range(5000))
                     if cluster.slot_owner(tag_slot(n)) != slow)
    settings = key_settings(prefix, cluster.url, timeout_seconds=3.0)
    async with open_redis(settings) as (client, breaker):
        limiter = RedisLimiter(client, settings, breaker)
        try:
            for name in (slow_name, fast_name):  # scripts loaded, connections open
                assert (await limiter.acquire(client_key(name), stream=False)).allowed
            busy = asyncio.ensure_future(on_node(slow, "EVAL", BUSY_SCRIPT, 0, "1.0"))
            await asyncio.sleep(0.1)
            held_back = asyncio.ensure_future(limiter.acquire(client_key(slow_name),
                                                              stream=False))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            assert (await limiter.acquire(client_key(fast_name), stream=False)).allowed
            assert time.monotonic() - started < 0.5
            assert not held_back.done()
            assert (await held_back).allowed
            await busy
            assert limiter.outages == 0
        finally:
            await limiter.close()


BUSY_SCRIPT = """
local function now() local t = redis.call('TIME'); return t[1] + t[2] / 1e6 end
local stop = now() + tonumber(ARGV[1])
while now() < stop do end
return 1
"""


async def test_a_killed_primary_costs_only_its_own_keys_and_only_while_they_had_none(
        tmp_path: Path) -> None:
    prefix = f"gwc{time.monotonic_ns()}"
    # Keys on every shard: the ones on the killed primary see the outage.
    names = [f"client-{i}" for i in range(24)]
    with local_cluster(tmp_path) as cluster:
        settings = key_settings(prefix, cluster.url, failure_policy="fail_closed",
                                timeout_seconds=0.5)
        victim = cluster.slot_owner(tag_slot(names[0]))
        victim_keys = {n for n in names if cluster.slot_owner(tag_slot(n)) == victim}
        assert 0 < len(victim_keys) < len(names)
        async with open_redis(settings) as (client, breaker):
            limiter = RedisLimiter(client, settings, breaker)
            refused_at: list[float] = []
            refused_keys: set[str] = set()
            promoted_at = 0.0

            async def checks_until(deadline: float) -> None:
                while time.monotonic() < deadline:
                    results = await asyncio.gather(
                        *(limiter.acquire(client_key(n), stream=False) for n in names),
                        return_exceptions=True)
                    for name, r in zip(names, results, strict=True):
                        if isinstance(r, ServiceUnavailable):
                            refused_at.append(time.monotonic())
                            refused_keys.add(name)
                        elif isinstance(r, BaseException):
                            raise r
                        else:
                            assert r.allowed
                    await asyncio.sleep(0.02)

            def promoted() -> bool:
                try:
                    return cluster.slot_owner(tag_slot(names[0])) != victim and cluster.healthy()
                except (AssertionError, redis.RedisError):
                    return False

            try:
                await checks_until(time.monotonic() + 0.5)
                assert not refused_at
                await asyncio.to_thread(cluster.node(victim).kill)
                killed = time.monotonic()
                checking = asyncio.ensure_future(checks_until(killed + 15))
                while time.monotonic() - killed < 15 and not promoted_at:
                    if await asyncio.to_thread(promoted):
                        promoted_at = time.monotonic()
                    await asyncio.sleep(0.05)
                assert promoted_at, "no replica took over"
                checking.cancel()
                await asyncio.gather(checking, return_exceptions=True)
                await checks_until(promoted_at + 3 * PROBE_SECONDS + 2)  # follows, no restart
            finally:
                await limiter.close()
    assert refused_at, "killing a primary did not reach the gateway at all"
    # Only the keys whose slots were on the dead primary: the other shards stayed exact.
    on_victim = {n for n in names if n in victim_keys}
    assert refused_keys and refused_keys <= on_victim, (refused_keys, on_victim)
    # The failure policy applied only from the kill until shortly after the promotion (the
    # breaker's next probe, PROBE_SECONDS apart, then a round of checks; slack for a busy host),
    # never after.
    assert killed <= min(refused_at) and max(refused_at) <= promoted_at + 2 * PROBE_SECONDS + 1, \
        (min(refused_at) - killed, max(refused_at) - promoted_at)
    assert limiter.backend_state == "redis"


async def test_with_a_shard_down_for_good_the_other_shards_leases_are_renewed_and_ready_says_so(
        tmp_path: Path) -> None:
    """A shard with no primary and no replica, for longer than the lease time: the streams on
    the other shards keep their leases (renewed one pipeline per primary; the dead one skipped),
    so their keys' caps hold; /readyz's redis check says the gateway is degraded, not down."""
    prefix = f"gwc{time.monotonic_ns()}"
    names = [f"holder-{i}" for i in range(12)]
    with local_cluster(tmp_path) as cluster:
        settings = key_settings(prefix, cluster.url, lease_seconds=LEASE_SECONDS,
                                timeout_seconds=0.5)
        victim = cluster.slot_owner(tag_slot(names[0]))
        healthy = [n for n in names if cluster.slot_owner(tag_slot(n)) != victim]
        assert healthy
        async with open_redis(settings) as (client, breaker):
            limiter = RedisLimiter(client, settings, breaker)
            keys = {n: ClientKey(name=n, requests_per_minute=600, burst=100,
                                 max_concurrent_streams=1, models=None) for n in names}
            try:
                held = await asyncio.gather(*(limiter.acquire(k, stream=True)
                                              for k in keys.values()))
                assert all(d.allowed for d in held)
                await asyncio.to_thread(cluster.kill_shard, victim)
                await limiter.acquire(keys[names[0]], stream=False)  # opens its breaker
                assert not breaker.up and breaker.partly_up
                await asyncio.sleep(LEASE_SECONDS * 2.5)
                for name in healthy:  # its one stream still counts: a second is refused
                    second = await limiter.acquire(keys[name], stream=True)
                    assert not second.allowed and second.refused_by == "concurrency", name
                ready, check = await redis_check(limiter)
                assert ready and check.startswith("degraded: 2 of 3 primaries answer"), check
            finally:
                await limiter.close()
