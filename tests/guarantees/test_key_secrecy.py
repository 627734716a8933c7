"""Client keys stay secret: the gateway holds only their SHA-256 digests, in memory and in Redis,
finds a key by its digest (so no comparison ever runs over the secret, and a lookup's timing can
say nothing about it: there is no timed assertion here, the structure is the guarantee), and no
raw key reaches a log line, an error body or ``/metrics``, whatever the client sends.

A revoked key stops working on every process within the cache time: proved by helper-1's
``tests/test_keys.py::test_revoked_key_gets_401_on_every_process_within_the_cache_time``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import re
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.appkeys import KEYSTORE, SETTINGS
from gateway.redis.keystore import add_key, store_keys
from gateway.request_info import ClientKey
from gateway.settings import Limits

from conftest import KEY, Upstream, settings_for

ROUTE = "/v1/chat/completions"
SOLO_KEY = "sk-test-solo-key-0000000001"
NARROW_KEY = "sk-test-narrow-00000000001"
NOT_KEYLIKE = "plain-secret-without-prefix-1234"  # a config key no pattern could recognise
WRONG_KEY = "sk-test-alice-000000000009"  # a near miss of a real key: a secret too
HEX64 = re.compile(r"[0-9a-f]{64}")


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def reachable_strings(root: Any, limit: int = 20000) -> Iterator[tuple[Any, Any, str]]:
    """Every string held by ``root``'s object graph within the gateway package (containers,
    dataclasses, slots), with the mapping that holds it under that key, if any."""
    seen: set[int] = set()
    todo: list[Any] = [root]
    while todo and len(seen) < limit:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, str):
            yield None, None, obj
        elif isinstance(obj, bytes):
            yield None, None, obj.decode("latin-1")
        elif isinstance(obj, dict):
            for k, v in obj.items():
                if isinstance(k, str):
                    yield obj, v, k
                todo += [k, v]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo += list(obj)
        elif type(obj).__module__.startswith("gateway"):
            fields = getattr(obj, "__dict__", {})
            slots = [s for c in type(obj).__mro__ for s in getattr(c, "__slots__", ())]
            todo += list(fields.values()) + [getattr(obj, s) for s in slots if hasattr(obj, s)]


async def test_only_digests_are_held_and_keys_are_found_by_digest(
        mock_upstream: Upstream, start_gateway: Any, redis_url: str, redis_prefix: str) -> None:
    admin = aioredis.Redis.from_url(redis_url)
    try:
        stored_key, _ = await add_key(admin, redis_prefix, "carol", Limits())
        app, base = await start_gateway(settings_for(
            mock_upstream.url, redis={"url": redis_url, "key_prefix": redis_prefix},
            keys=[{"name": "alice", "key": KEY}, {"name": "plain", "key": NOT_KEYLIKE}]))
        async with aiohttp.ClientSession() as http:
            for key, status in ((KEY, 200), (NOT_KEYLIKE, 200), (stored_key, 200),
                                (WRONG_KEY, 401)):
                async with http.post(f"{base}{ROUTE}", json={"model": "grok-4", "messages": []},
                                     headers={"Authorization": f"Bearer {key}"}) as r:
                    assert r.status == status

        presented = (KEY, NOT_KEYLIKE, stored_key, WRONG_KEY)
        for root in (app[KEYSTORE], app[SETTINGS]):
            held = list(reachable_strings(root))
            assert held, "the walk found the store's contents"
            for _, value, text in held:
                for secret in presented:
                    assert secret not in text, f"a raw key is held in {type(root).__name__}"
                if isinstance(value, ClientKey) or (isinstance(value, tuple) and any(
                        isinstance(v, ClientKey) for v in value)):
                    assert HEX64.fullmatch(text), f"keys are looked up by {text!r}"
        digests = {text for _, _, text in reachable_strings(app[KEYSTORE])}
        # The config keys, the Redis key once looked up, and even the unknown key's miss are
        # all remembered by digest.
        assert {sha256(KEY), sha256(NOT_KEYLIKE), sha256(stored_key),
                sha256(WRONG_KEY)} <= digests

        records, names = store_keys(redis_prefix)
        assert set((await admin.hgetall(records)).keys()) == {sha256(stored_key).encode()}
        assert await admin.hgetall(names) == {b"carol": sha256(stored_key).encode()}
        dump = [k async for k in admin.scan_iter(match=f"{redis_prefix}*")]
        for name in dump:
            content = repr(await admin.hgetall(name)) if await admin.type(name) == b"hash" \
                else repr(await admin.zrange(name, 0, -1))
            assert stored_key not in content and stored_key not in name.decode()
    finally:
        await admin.aclose()


async def raw_request(port: int, head: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        async with asyncio.timeout(2):
            return await reader.read()
    finally:
        writer.close()


async def test_no_raw_key_in_any_log_line_error_body_or_metric(
        mock_upstream: Upstream, start_gateway: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    keys = [{"name": "alice", "key": KEY}, {"name": "plain", "key": NOT_KEYLIKE},
            {"name": "solo", "key": SOLO_KEY, "burst": 1, "requests_per_minute": 1},
            {"name": "narrow", "key": NARROW_KEY, "models": ["grok-3-mini"]}]
    app, base = await start_gateway(settings_for(mock_upstream.url, keys=keys))
    port = int(base.rsplit(":", 1)[1])
    secrets = (KEY, NOT_KEYLIKE, SOLO_KEY, NARROW_KEY, WRONG_KEY, "xai-operator-secret-key")
    bodies: list[bytes] = []
    chat = {"model": "grok-4", "messages": [{"role": "user", "content": "hi"}]}

    async with aiohttp.ClientSession() as http:
        async def call(headers: dict[str, str], body: dict[str, Any] | None = None,
                       path: str = ROUTE) -> int:
            async with http.post(f"{base}{path}", json=body or chat, headers=headers) as r:
                bodies.append(await r.read())
                return r.status

        bearer = {k: {"Authorization": f"Bearer {k}"} for k in secrets}
        outcomes = [
            await call(bearer[KEY], {**chat, "stream": True}),  # a stream
            await call(bearer[NOT_KEYLIKE]),
            await call({"x-api-key": KEY}),  # the other header
            await call(bearer[WRONG_KEY]),  # 401
            await call({"Authorization": f"Basic {KEY}"}),  # 401, malformed
            await call({"Authorization": f"Bearer {KEY} {KEY}"}),  # 401, malformed
            await call(bearer[SOLO_KEY]), await call(bearer[SOLO_KEY]),  # 200, then 429
            await call(bearer[NARROW_KEY]),  # 403: model not allowed
            await call(bearer[KEY], {"model": "grok-4"}),  # 400
            await call(bearer[KEY], path="/v1/nothing"),  # 404
            # The client's key inside its own request, echoed by the upstream's error.
            await call(bearer[KEY], {**chat, "mock": {"status": 400,
                                                      "message": f"bad api_key {KEY}"}}),
            await call(bearer[KEY], {**chat, "stream": True, "mock": {
                "status": 500, "message": f"upstream trace: key={KEY}"}}),
        ]
        assert outcomes == [200, 200, 200, 401, 401, 401, 200, 429, 403, 400, 404, 400, 500]
        # Requests aiohttp's parser refuses, the header that holds the key among them: the
        # JSON 400 quotes nothing of them (server_limits.py), and no log line does.
        for line in (f"Authorization: Bearer {KEY}\r!", f"x-api-key: {NOT_KEYLIKE}\r!"):
            raw = await raw_request(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\n"
                                    + line.encode() + b"\r\nContent-Length: 2\r\n\r\n{}")
            assert raw.startswith(b"HTTP/1.") and b" 400 " in raw[:20]
            assert KEY.encode() not in raw and NOT_KEYLIKE.encode() not in raw
        async with http.get(f"{base}/metrics") as r:
            metrics = await r.text()

    logged = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert '"key":"alice"' in logged and "Error handling request" in logged  # it was logged
    for secret in secrets:
        assert secret not in logged, f"{secret} in a log line"
        assert sha256(secret) not in logged
        assert secret not in metrics and sha256(secret) not in metrics
        for body in bodies:
            assert secret.encode() not in body, f"{secret} in an error body: {body[:200]!r}"
    assert 'key="alice"' in metrics  # by name


def test_settings_keep_no_raw_key() -> None:
    settings = settings_for("mock", keys=[{"name": "alice", "key": KEY}])
    assert KEY not in repr(settings) and KEY not in repr(dataclasses.asdict(settings))
    assert [k.sha256 for k in settings.keys] == [sha256(KEY)]
