"""The records of who owns each stored response (``gateway/records/``): one behaviour for both
backends (memory, and the machine's real Redis under the test's own prefix), the bounds each
keeps, and, through real gateways, what a created response costs in Redis and that its record
outlives the process that wrote it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis.asyncio as aioredis

from gateway.records import Record, ResponseRecords
from gateway.records.memory import MemoryRecords
from gateway.records.redis import RedisRecords, record_key
from gateway.redis.breaker import RedisBreaker
from gateway.redis.topology import connect
from gateway.settings import RedisSettings

from clients import async_sdk
from conftest import KEY, OTHER_KEY, Upstream, settings_for
from servers import Blackhole, gateway_processes

DAY = 86400.0


@pytest.fixture(params=["memory", "redis"])
async def records(request: pytest.FixtureRequest, redis_url: str, redis_prefix: str
                  ) -> AsyncIterator[ResponseRecords]:
    if request.param == "memory":
        backend: ResponseRecords = MemoryRecords(DAY)
        yield backend
        await backend.close()
        return
    settings = RedisSettings(url=redis_url, key_prefix=redis_prefix)
    client = connect(settings)
    breaker = RedisBreaker(client, settings)
    backend = RedisRecords(client, redis_prefix, DAY, breaker)
    yield backend
    await backend.close()
    await breaker.close()
    await client.aclose()


async def test_a_record_is_found_until_forgotten(records: ResponseRecords) -> None:
    assert await records.get("resp_1") is None
    await records.record("resp_1", "alice")
    await records.record("resp_2", "bob", "eu")
    assert await records.get("resp_1") == Record("alice")
    assert await records.get("resp_2") == Record("bob", "eu")
    await records.forget("resp_1")
    assert await records.get("resp_1") is None
    assert await records.get("resp_2") == Record("bob", "eu")


@pytest.mark.parametrize("hostile", ["", "x" * 129, "a/../b", "a b", "{tag}", "ä", "_lead",
                                     "a\nb", "*"])
async def test_an_id_no_upstream_could_make_is_no_response(records: ResponseRecords,
                                                           hostile: str) -> None:
    assert await records.get(hostile) is None


async def test_redis_keeps_a_record_for_the_retention_time_in_a_few_bytes(
        redis_url: str, redis_prefix: str) -> None:
    settings = RedisSettings(url=redis_url, key_prefix=redis_prefix)
    client = connect(settings)
    breaker = RedisBreaker(client, settings)
    backend = RedisRecords(client, redis_prefix, 30 * DAY, breaker)
    await backend.record("resp_abc", "alice")
    admin = aioredis.Redis.from_url(redis_url)
    key = record_key(redis_prefix, "resp_abc")
    assert await admin.get(key) == b'["alice"]'
    assert 30 * DAY - 60 < await admin.ttl(key) <= 30 * DAY
    # A value this gateway did not write gives no one access.
    await admin.set(key, b"not json")
    assert await backend.get("resp_abc") is None
    await admin.set(key, b'[""]')
    assert await backend.get("resp_abc") is None
    await admin.aclose()
    await backend.close()
    await breaker.close()
    await client.aclose()


async def test_memory_forgets_after_the_retention_time_and_past_its_count() -> None:
    expired = MemoryRecords(retention_seconds=-1.0)  # already past: nothing is kept
    await expired.record("resp_1", "alice")
    assert await expired.get("resp_1") is None
    bounded = MemoryRecords(DAY, max_records=3)
    for i in range(5):
        await bounded.record(f"resp_{i}", "alice")
    assert [await bounded.get(f"resp_{i}") is not None for i in range(5)] == \
        [False, False, True, True, True]


async def _created_and_checked(base: str) -> None:
    client = async_sdk(base)
    stream = await client.responses.create(model="grok-4", input="hi", stream=True)
    rid = [e async for e in stream][0].response.id  # type: ignore[union-attr]
    await client.responses.retrieve(rid)
    await client.close()


async def test_a_created_response_costs_one_write_and_a_check_one_read(
        mock_upstream: Upstream, start_gateway: Any, redis_url: str, redis_prefix: str) -> None:
    hole = Blackhole(redis_url)
    url = await hole.start()
    _, base = await start_gateway(settings_for(mock_upstream.url, redis={
        "url": url, "key_prefix": redis_prefix}))
    await _created_and_checked(base)
    record_commands = hole.seen.count(f"{redis_prefix}:resp:".encode())
    sets = hole.seen.count(b"$3\r\nSET\r\n")
    gets = hole.seen.count(b"$3\r\nGET\r\n")
    await hole.close()
    assert (record_commands, sets, gets) == (2, 1, 1)


async def test_a_record_outlives_the_gateway_that_wrote_it(
        tmp_path: Path, mock_upstream: Upstream, redis_url: str, redis_prefix: str) -> None:
    config = {"upstream": {"url": mock_upstream.url, "api_key": "xai-operator-secret-key",
                           "max_retries": 0},
              "redis": {"url": redis_url, "key_prefix": redis_prefix},
              "keys": [{"name": "alice", "key": KEY}, {"name": "bob", "key": OTHER_KEY}]}
    async with gateway_processes(config, 1, tmp_path) as [first]:
        client = async_sdk(first.url)
        rid = (await client.responses.create(model="grok-4", input="remember me")).id
        await client.close()
    assert first.proc is not None and first.proc.poll() is not None  # that process is gone
    async with gateway_processes(config, 1, tmp_path) as [second]:
        alice, bob = async_sdk(second.url), async_sdk(second.url, OTHER_KEY)
        assert (await alice.responses.retrieve(rid)).output_text
        with pytest.raises(openai.NotFoundError):
            await bob.responses.retrieve(rid)
        await alice.close()
        await bob.close()
