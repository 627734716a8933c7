"""Client keys in Redis: ``gateway keys add|list|revoke`` run as real processes, revocation seen
by every gateway process within the cache time, model allow-lists, the key store during a Redis
outage, a record damaged in Redis (named by ``keys list``, its key refused with 403, never a
500), and what the OpenAI SDK sees. (A revoked key's open streams:
``tests/guarantees/test_revocation_ends_streams.py``.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import redis as syncredis

from gateway.auth import ConfigKeyStore
from gateway.errors import ServiceUnavailable
from gateway.redis.keystore import RedisKeyStore, add_key, store_keys
from gateway.redis.lifecycle import open_redis
from gateway.settings import Limits, RedisSettings, hash_key

from clients import chat_body
from conftest import REDIS_URL, Upstream, settings_for
from servers import clean_environ, gateway_processes, redis_server, run_cli, write_config

CONFIG_KEY = "sk-test-config-key-000001"


def cli_config(tmp_path: Path, redis_url: str, prefix: str, **redis: Any) -> Path:
    return write_config(tmp_path / "keys.toml", {
        "server": {"drain_seconds": 0.5},
        "upstream": {"url": "mock"},
        "redis": {"url": redis_url, "key_prefix": prefix, **redis},
        "limits": {"requests_per_minute": 600, "burst": 50},
        "keys": [{"name": "config-key", "key": CONFIG_KEY}],
    })


def redis_dump(prefix: str) -> str:
    """Every key, field and value under the prefix, as text."""
    client = syncredis.Redis.from_url(REDIS_URL)
    try:
        parts = []
        for name in client.scan_iter(match=f"{prefix}*"):
            parts.append(repr(name))
            if client.type(name) == b"hash":
                for field, value in client.hgetall(name).items():
                    parts += [repr(field), repr(value)]
        return "\n".join(parts)
    finally:
        client.close()


def test_cli_adds_lists_and_revokes_keys(tmp_path: Path, redis_url: str,
                                         redis_prefix: str) -> None:
    config = str(cli_config(tmp_path, redis_url, redis_prefix))
    added = run_cli("keys", "add", "--name", "carol", "--rpm", "120", "--burst", "3",
                    "--max-streams", "2", "--models", "grok-3-mini, grok-4", "--config", config)
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert key.startswith("sk-gw-") and len(key) > 40 and "\n" not in key
    assert "added key 'carol'" in added.stderr and key not in added.stderr

    dump = redis_dump(redis_prefix)
    assert key not in dump, "the raw key must never reach Redis"
    assert hash_key(key) in dump
    records, names = store_keys(redis_prefix)
    assert records in dump and names in dump

    listed = run_cli("keys", "list", "--config", config)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
    assert rows["carol"][1:5] == ["redis", "120", "3", "2"]
    assert rows["carol"][11] == "grok-3-mini,grok-4"
    assert rows["config-key"][1] == "config"
    assert key not in listed.stdout and hash_key(key) not in listed.stdout
    assert hash_key(key)[:8] in listed.stdout  # a short id, not the hash

    dup = run_cli("keys", "add", "--name", "carol", "--config", config)
    assert dup.returncode == 1 and "exists already" in dup.stderr and not dup.stdout
    clash = run_cli("keys", "add", "--name", "config-key", "--config", config)
    assert clash.returncode == 1 and "in the config file" in clash.stderr
    bad = run_cli("keys", "add", "--name", "no spaces", "--config", config)
    assert bad.returncode == 1 and "invalid key name" in bad.stderr

    revoked = run_cli("keys", "revoke", "carol", "--config", config)
    assert revoked.returncode == 0 and "revoked key 'carol'" in revoked.stderr
    assert hash_key(key) not in redis_dump(redis_prefix)
    assert "carol" not in run_cli("keys", "list", "--config", config).stdout
    again = run_cli("keys", "revoke", "carol", "--config", config)
    assert again.returncode == 1 and "no key named 'carol'" in again.stderr


@pytest.mark.parametrize(("option", "value"), [
    ("--rpm", "nan"), ("--rpm", "inf"), ("--rpm", "1e309"), ("--rpm", "0"),
    ("--burst", "99999999999999999999"), ("--max-streams", "0")])
def test_cli_refuses_a_limit_that_is_not_a_finite_number_naming_the_option(
        tmp_path: Path, redis_url: str, redis_prefix: str, option: str, value: str) -> None:
    """``--rpm nan`` was stored (as ``null``): every request with the key was then a 500, and
    ``keys list`` crashed for the whole store; ``--burst`` past 64 bits was a traceback."""
    config = str(cli_config(tmp_path, redis_url, redis_prefix))
    added = run_cli("keys", "add", "--name", "dave", f"{option}={value}", "--config", config)
    assert added.returncode == 2 and not added.stdout
    assert f"argument {option}:" in added.stderr and "Traceback" not in added.stderr
    assert "dave" not in redis_dump(redis_prefix)


def test_keys_cli_without_redis_is_a_clear_error(tmp_path: Path) -> None:
    config = write_config(tmp_path / "plain.toml", {"upstream": {"url": "mock"}})
    result = run_cli("keys", "list", "--config", str(config),
                     env=clean_environ(GATEWAY_REDIS_URL=""))
    assert result.returncode == 2
    assert "no Redis is configured" in result.stderr and "GATEWAY_REDIS_URL" in result.stderr
    # The environment alone is enough to find Redis.
    from_env = run_cli("keys", "list", env=clean_environ(GATEWAY_REDIS_URL=REDIS_URL,
                                                         GATEWAY_REDIS_KEY_PREFIX="gwtest:none"))
    assert from_env.returncode == 0, from_env.stderr
    assert from_env.stdout.startswith("NAME")


async def test_revoked_key_gets_401_on_every_process_within_the_cache_time(
        tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    cache_seconds = 0.5
    config = cli_config(tmp_path, redis_url, redis_prefix, key_cache_seconds=cache_seconds)
    added = await asyncio.to_thread(run_cli, "keys", "add", "--name", "dave",
                                    "--config", str(config))
    key = added.stdout.strip()
    assert added.returncode == 0 and key.startswith("sk-gw-")
    data = {"server": {"drain_seconds": 0.5}, "upstream": {"url": "mock"},
            "redis": {"url": redis_url, "key_prefix": redis_prefix,
                      "key_cache_seconds": cache_seconds},
            "keys": [{"name": "config-key", "key": CONFIG_KEY}]}
    async with gateway_processes(data, 2, tmp_path) as gateways, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        async def status(base: str, token: str) -> int:
            async with http.post(f"{base}/v1/chat/completions", json=chat_body(stream=None),
                                 headers={"Authorization": f"Bearer {token}"}) as resp:
                await resp.read()
                return resp.status

        assert [await status(gw.url, key) for gw in gateways] == [200, 200]
        revoked = await asyncio.to_thread(run_cli, "keys", "revoke", "dave",
                                          "--config", str(config))
        assert revoked.returncode == 0, revoked.stderr
        done = time.monotonic()
        refused: set[int] = set()
        while len(refused) < 2 and time.monotonic() - done < cache_seconds + 2:
            for i, gw in enumerate(gateways):
                if i not in refused and await status(gw.url, key) == 401:
                    refused.add(i)
            await asyncio.sleep(0.02)
        assert refused == {0, 1}
        assert time.monotonic() - done <= cache_seconds + 0.5

        # The OpenAI SDK (sync client, in a thread: the servers run in this loop's process).
        def sdk_call(token: str) -> Any:
            client = openai.OpenAI(api_key=token, base_url=f"{gateways[0].url}/v1",
                                   max_retries=0)
            try:
                return client.chat.completions.create(**chat_body(stream=None))
            finally:
                client.close()

        with pytest.raises(openai.AuthenticationError) as caught:
            await asyncio.to_thread(sdk_call, key)
        assert caught.value.status_code == 401
        assert caught.value.code == "invalid_api_key"
        assert caught.value.body == {"message": "Invalid authentication token",  # type: ignore
                                     "type": "authentication_error", "param": None,
                                     "code": "invalid_api_key"}
        assert caught.value.message.endswith("Invalid authentication token")
        assert (await asyncio.to_thread(sdk_call, CONFIG_KEY)).choices[0].message.content
    for gw in gateways:
        logs = gw.logs()
        assert '"key":"dave"' in logs  # requests are logged by key name...
        assert key not in logs and hash_key(key) not in logs  # ...never by the key
    assert key not in redis_dump(redis_prefix)


async def test_model_allow_list(mock_upstream: Upstream, start_gateway: Callable[..., Any],
                                redis_url: str, redis_prefix: str) -> None:
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(redis_url)
    try:
        key, _ = await add_key(admin, redis_prefix, "erin", Limits(),
                               models=frozenset({"grok-3-mini"}))
    finally:
        await admin.aclose()
    _, base = await start_gateway(settings_for(mock_upstream.url, redis={
        "url": redis_url, "key_prefix": redis_prefix}))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        headers = {"Authorization": f"Bearer {key}"}
        async with http.post(f"{base}/v1/chat/completions",
                             json=chat_body(stream=None, model="grok-4"),
                             headers=headers) as resp:
            assert resp.status == 403
            error = (await resp.json())["error"]
            assert error["code"] == "model_not_allowed" and error["type"] == "permission_error"
            assert error["param"] == "model" and "grok-4" in error["message"]
        async with http.post(f"{base}/v1/chat/completions",
                             json=chat_body(stream=None, model="grok-3-mini"),
                             headers=headers) as resp:
            assert resp.status == 200
    client = openai.AsyncOpenAI(api_key=key, base_url=f"{base}/v1", max_retries=0)
    try:
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await client.chat.completions.create(**chat_body(stream=None, model="grok-4"))
        assert caught.value.code == "model_not_allowed"
    finally:
        await client.close()


async def test_key_store_keeps_known_keys_while_redis_is_down(tmp_path: Path) -> None:
    with redis_server() as server:
        settings = RedisSettings(url=server.url, key_prefix="gwtest", key_cache_seconds=0.1,
                                 timeout_seconds=0.2)
        config_store = ConfigKeyStore(settings_for("mock", redis=dataclasses.asdict(settings)))
        async with open_redis(settings) as (client, breaker):
            key, _ = await add_key(client, "gwtest", "frank", Limits(burst=7))
            store = RedisKeyStore(config_store, client, settings, breaker)
            found = await store.lookup(key)
            assert found is not None and found.name == "frank" and found.burst == 7
            assert await store.lookup("sk-gw-not-a-key-at-all") is None

            server.stop()
            await asyncio.sleep(0.15)  # past the cache time
            started = time.monotonic()
            stale = await store.lookup(key)
            assert stale is not None and stale.name == "frank"  # known: still served
            assert await store.lookup("sk-gw-not-a-key-at-all") is None
            assert (await store.lookup("sk-test-alice-000000000001")) is not None  # config
            with pytest.raises(ServiceUnavailable, match="Redis"):
                await store.lookup("sk-gw-never-seen-before-000")
            assert time.monotonic() - started < 1
            assert not breaker.up and breaker.outages == 1


def _damage(record: bytes, how: str) -> bytes:
    """``record`` (as ``gateway keys add`` wrote it) made bad in one way."""
    data = orjson.loads(record)
    if how == "not_json":
        return b"\x00{not json"
    if how == "nan":  # what Python's json module writes for float("nan")
        return orjson.dumps({**data, "requests_per_minute": 0}).replace(
            b'"requests_per_minute":0', b'"requests_per_minute":NaN')
    if how == "65_bit_integer":
        return orjson.dumps({**data, "burst": 0}).replace(
            b'"burst":0', b'"burst":%d' % (2**64 + 1))
    if how == "missing_field":
        del data["max_concurrent_streams"]
        return orjson.dumps(data)
    changed = {"null_limit": ("requests_per_minute", None), "string_limit": ("burst", "10"),
               "negative_limit": ("max_concurrent_streams", -1),
               "unreadable_name": ("name", {"first": "dave"})}[how]
    return orjson.dumps({**data, changed[0]: changed[1]})


@pytest.mark.parametrize("how", ["null_limit", "nan", "string_limit", "negative_limit",
                                 "65_bit_integer", "missing_field", "not_json",
                                 "unreadable_name"])
async def test_a_damaged_record_is_named_by_keys_list_and_its_key_gets_403_not_500(
        tmp_path: Path, mock_upstream: Upstream, start_gateway: Callable[..., Any],
        redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture, how: str) -> None:
    """A record already bad in Redis (``--rpm nan`` was once stored as ``null``) crashed
    ``keys list`` for the whole store and made every request with its key a 500."""
    import redis.asyncio as aioredis

    records, _ = store_keys(redis_prefix)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        good, _ = await add_key(admin, redis_prefix, "carol", Limits(burst=3))
        bad, stored = await add_key(admin, redis_prefix, "dave", Limits())
        record = await admin.hget(records, stored.sha256)
        await admin.hset(records, stored.sha256, _damage(record, how))
    finally:
        await admin.aclose()
    config = str(cli_config(tmp_path, redis_url, redis_prefix))

    listed = await asyncio.to_thread(run_cli, "keys", "list", "--config", config)
    # 1: the listing is whole, but a key every gateway refuses is for a script to notice.
    assert listed.returncode == 1
    assert "Traceback" not in listed.stderr and "Traceback" not in listed.stdout
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
    assert rows["carol"][1:4] == ["redis", "60", "3"] and rows["config-key"][1] == "config"
    assert rows["dave"][1] == "redis" and rows["dave"][-1] == "DAMAGED"
    assert "the record of key 'dave' is damaged" in listed.stderr
    assert "gateway keys revoke dave" in listed.stderr
    assert bad not in listed.stdout + listed.stderr
    assert stored.sha256 not in listed.stdout + listed.stderr  # its short id only

    _, base = await start_gateway(settings_for(mock_upstream.url, redis={
        "url": redis_url, "key_prefix": redis_prefix}))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        async def call(token: str) -> tuple[int, dict[str, Any]]:
            async with http.post(f"{base}/v1/chat/completions", json=chat_body(stream=None),
                                 headers={"Authorization": f"Bearer {token}"}) as resp:
                return resp.status, await resp.json()

        for _ in range(2):
            status, body = await call(bad)
            assert status == 403, body
            error = body["error"]
            assert error["code"] == "permission_denied" and error["type"] == "permission_error"
            assert "damaged" in error["message"] and "operator" in error["message"]
        assert (await call(good))[0] == 200  # the other keys work
    logged = [r for r in caplog.records if r.name == "gateway.keys"]
    assert len(logged) == 1, logged  # one line per key and cache period, not one per request
    named = "'dave'" if how not in ("not_json", "nan", "unreadable_name") else "keys list"
    assert named in logged[0].getMessage()
    assert stored.sha256 not in caplog.text and bad not in caplog.text
    assert "Traceback" not in caplog.text

    # Revoking and adding it again mends it.
    revoked = await asyncio.to_thread(run_cli, "keys", "revoke", "dave", "--config", config)
    assert revoked.returncode == 0 and "revoked key 'dave'" in revoked.stderr, revoked.stderr
    again = await asyncio.to_thread(run_cli, "keys", "list", "--config", config)
    assert again.returncode == 0 and "DAMAGED" not in again.stdout and not again.stderr
