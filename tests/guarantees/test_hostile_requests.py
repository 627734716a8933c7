"""Requests built to cost the gateway: a body it would read for a stranger, strings that would
size a log line or a metric, keys made up by the thousand, a body that is not what its
``Content-Encoding`` says, a request without the model a key is limited to. Each gets its answer
in the error shape and costs what a plain request costs.

Each test drives a real gateway on loopback (Redis of its own where it stops Redis or counts
its commands) with real clients: aiohttp, and raw sockets where the bytes on the wire matter.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import zlib
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from gateway.appkeys import AUTH_FAILURES
from gateway.auth import MAX_TRACKED_CLIENTS
from gateway.redis.keystore import MAX_CACHED, add_key
from gateway.settings import Limits

from clients import AUTH, chat_body, scrape, value
from conftest import KEY, Upstream, settings_for
from observe import access_lines, error_of
from servers import RedisServer, redis_server

ROUTE = "/v1/chat/completions"


async def post(base: str, body: Any = None, *, data: bytes | None = None,
               headers: dict[str, str] | None = None, session: aiohttp.ClientSession | None = None
               ) -> tuple[int, dict[str, str], bytes]:
    """One POST with no ``Accept`` of aiohttp's own (as the AI SDK's providers send none)."""
    async def go(s: aiohttp.ClientSession) -> tuple[int, dict[str, str], bytes]:
        async with s.post(f"{base}{ROUTE}", json=body if data is None else None, data=data,
                          headers=headers if headers is not None else AUTH) as r:
            return r.status, dict(r.headers), await r.read()

    if session is not None:
        return await go(session)
    async with aiohttp.ClientSession(skip_auto_headers=("Accept",)) as s:
        return await go(s)


def bearer(key: str, client_ip: str | None = None) -> dict[str, str]:
    """A key, and the client address a trusted proxy (127.0.0.1) says the request came from."""
    headers = {"Authorization": f"Bearer {key}"}
    if client_ip is not None:
        headers["X-Forwarded-For"] = client_ip
    return headers


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers["content-length"]))
    return int(lines[0].split(" ")[1]), headers, body


async def metrics_size(base: str) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/metrics") as r:
            return len(await r.read())


# --- no body is read for a stranger ------------------------------------------------------------

async def test_an_unauthenticated_request_is_answered_before_its_body_is_sent(
        gateway: Any) -> None:
    """The 401 comes from the headers alone: a stranger's 20 MB body is never waited for, read
    or parsed (it used to be, to choose between a JSON body and an SSE frame)."""
    _, base = gateway
    port = int(base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST " + ROUTE.encode() + b" HTTP/1.1\r\nHost: gateway\r\n"
                     b"Authorization: Bearer sk-not-a-key-0000000000\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 20000000\r\n\r\n"
                     b'{"model": "grok-4", "stream": true, "pad": "')
        await writer.drain()
        async with asyncio.timeout(2):  # the body's other 20 MB are never sent
            status, headers, body = await read_response(reader)
    finally:
        writer.close()
    assert status == 401 and headers["content-type"].startswith("application/json")
    assert error_of(body)["code"] == "invalid_api_key"


async def test_an_error_is_an_sse_frame_only_for_a_client_whose_accept_names_the_stream(
        gateway: Any) -> None:
    """``"stream": true`` in the body no longer decides (reading it would mean reading a
    stranger's body): no ``Accept`` (the AI SDK's providers), ``*/*`` (curl) or JSON get the JSON
    body; ``Accept: text/event-stream`` gets the frame; the status is the true one each time."""
    _, base = gateway
    body = chat_body(stream=True)
    for accept, framed in ((None, False), ("*/*", False), ("application/json", False),
                           ("text/event-stream", True)):
        headers = bearer("sk-not-a-key-0000000000")
        if accept is not None:
            headers["Accept"] = accept
        status, got, raw = await post(base, body, headers=headers)
        assert status == 401, accept
        if framed:
            assert got["Content-Type"] == "text/event-stream"
            assert raw.startswith(b"data: {") and raw.endswith(b"}\n\n")
        else:
            assert got["Content-Type"].startswith("application/json"), accept
        assert error_of(raw)["code"] == "invalid_api_key"


# --- a client's strings are bounded before they reach a log line or a metric ---------------------

async def test_a_huge_model_name_is_refused_and_never_sizes_a_log_line_or_the_metrics(
        gateway: Any, mock_upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    """A 900 KB ``model`` used to be logged whole (before authentication too) and a 300 KB one
    to become a metric label: now it gets 400 naming ``model``, never reaches the upstream, and
    every access line stays small."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    _, base = gateway
    for size in (900_000, 300_000, 257):
        huge = chat_body(stream=False, model="m" * size)
        status, _, raw = await post(base, huge)
        assert status == 400
        err = error_of(raw)
        assert err["param"] == "model" and "at most 256" in err["message"]
        assert len(raw) < 500  # the name is not echoed back either
        status, _, _ = await post(base, huge, headers=bearer("sk-not-a-key-0000000000"))
        assert status == 401
    assert mock_upstream.state.requests == []
    lines = access_lines(caplog, ROUTE)
    assert len(lines) == 6 and all(line["model"] is None for line in lines)
    assert max(len(r.getMessage()) for r in caplog.records) < 1000
    assert await metrics_size(base) < 50_000  # a 300 KB label would show 3 of them


async def test_a_model_name_that_does_not_look_like_one_is_counted_as_other_in_the_metrics(
        gateway: Any, mock_upstream: Upstream) -> None:
    """Token counts carry the model as a label only when it looks like a model name (64
    characters at most, letters, digits and ``._:/-``); anything else the upstream accepted
    is counted under ``other``, so that no client string becomes a label."""
    _, base = gateway
    odd = ["x" * 200, "grok 4 with spaces", "grok-4\n# HELP injected"]
    mock_upstream.state.models += tuple(odd)  # an upstream that serves them
    for model in ["grok-4", *odd]:
        status, _, _ = await post(base, chat_body(stream=False, model=model))
        assert status == 200, model
    samples = await scrape(base)
    assert value(samples, "gateway_tokens_total", key="alice", model="grok-4",
                 type="prompt") > 0
    assert value(samples, "gateway_tokens_total", key="alice", model="other",
                 type="prompt") > 0
    labels = {dict(labelset).get("model") for (name, labelset) in samples
              if name == "gateway_tokens_total"}
    assert labels == {"grok-4", "other"}


# --- keys made up by the thousand --------------------------------------------------------------

def redis_settings(server: RedisServer) -> dict[str, Any]:
    return {"url": server.url, "key_prefix": "gwtest", "key_cache_seconds": 0.2,
            "timeout_seconds": 0.2}


async def stored_key(server: RedisServer, name: str) -> str:
    client = aioredis.Redis.from_url(server.url)
    try:
        key, _ = await add_key(client, "gwtest", name, Limits(requests_per_minute=6000,
                                                              burst=1000))
    finally:
        await client.aclose()
    return key


def hget_calls(server: RedisServer) -> int:
    client = server.client()
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return int(stats.get("cmdstat_hget", {}).get("calls", 0))


async def test_a_stored_key_keeps_working_through_a_redis_outage_after_many_unknown_keys(
        mock_upstream: Upstream, start_gateway: Any) -> None:
    """Unknown keys are cached apart from known ones: after more made-up keys than the cache
    holds (each from an address of its own, so that no throttle stops them), a key stored in
    Redis and seen before the flood still works while Redis is down. It used to be pushed out
    of the cache by the unknown ones, and to get 503 for the whole outage."""
    with redis_server() as server:
        key = await stored_key(server, "carol")
        app, base = await start_gateway(settings_for(mock_upstream.url,
                                                     redis=redis_settings(server)))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as s:
            assert (await post(base, chat_body(stream=False), headers=bearer(key),
                               session=s))[0] == 200

            async def guess(i: int) -> int:
                ip = f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}"
                made_up = bearer(f"sk-gw-{secrets.token_urlsafe(16)}", ip)
                return (await post(base, chat_body(stream=False), headers=made_up,
                                   session=s))[0]

            statuses: set[int] = set()
            count = MAX_CACHED + 1_000
            for start in range(0, count, 500):
                statuses |= set(await asyncio.gather(*(guess(i) for i in range(
                    start, min(start + 500, count)))))
            assert statuses == {401}
            assert len(app[AUTH_FAILURES]) <= MAX_TRACKED_CLIENTS  # bounded memory

            server.stop()
            await asyncio.sleep(0.3)  # past key_cache_seconds: only the stale entry is left
            for _ in range(3):
                status, _, raw = await post(base, chat_body(stream=False), headers=bearer(key),
                                            session=s)
                assert status == 200, raw


async def test_a_client_that_presents_unknown_keys_is_throttled_without_a_redis_lookup(
        mock_upstream: Upstream, start_gateway: Any) -> None:
    """``[server] auth_failures_per_minute`` unknown keys from one address get 401; then 429
    in the error shape, with ``Retry-After``, and no Redis ``HGET`` (each guess used to cost
    one, unthrottled). Another address keeps its own allowance."""
    with redis_server() as server:
        app, base = await start_gateway(settings_for(
            mock_upstream.url, redis=redis_settings(server),
            server={"auth_failures_per_minute": 5}))
        attacker, neighbour = "198.51.100.7", "198.51.100.8"
        made_up = [bearer(f"sk-gw-{secrets.token_urlsafe(16)}", attacker) for _ in range(25)]
        assert [(await post(base, chat_body(stream=False), headers=h))[0]
                for h in made_up[:5]] == [401] * 5
        before = hget_calls(server)
        for headers in made_up[5:]:
            status, got, raw = await post(base, chat_body(stream=False), headers=headers)
            assert status == 429
            err = error_of(raw)
            assert err["code"] == "too_many_auth_failures" and err["type"] == "rate_limit_error"
            assert 1 <= int(got["Retry-After"]) <= 12  # one failure per 12 s at 5 a minute
            assert int(got["retry-after-ms"]) <= 12_000
        assert hget_calls(server) == before, "a throttled client's guesses reached Redis"
        status, _, _ = await post(base, chat_body(stream=False),
                                  headers=bearer("sk-gw-not-a-key-00000", neighbour))
        assert status == 401
        samples = await scrape(base)
        assert value(samples, "gateway_ratelimit_refusals_total", key="-",
                     limit="auth_failures") == 20


async def test_the_failure_throttle_never_stops_a_key_the_gateway_knows(
        mock_upstream: Upstream, start_gateway: Any) -> None:
    """From an address throttled for its failures, a configured key and a Redis key this
    process has seen pass as before (the Redis one is still checked in Redis once its cache
    time is over, so that revoking it works); only keys it has never seen wait, like guesses."""
    with redis_server() as server:
        seen, unseen = await stored_key(server, "dora"), await stored_key(server, "erin")
        _, base = await start_gateway(settings_for(
            mock_upstream.url, redis=redis_settings(server),
            server={"auth_failures_per_minute": 2}))
        shared = "203.0.113.9"  # a NAT: an attacker and real users behind one address
        assert (await post(base, chat_body(stream=False), headers=bearer(seen, shared)))[0] \
            == 200
        for expected in (401, 401, 429):
            status, _, _ = await post(base, chat_body(stream=False),
                                      headers=bearer("sk-gw-guess-000000000", shared))
            assert status == expected
        await asyncio.sleep(0.3)  # past key_cache_seconds
        before = hget_calls(server)
        for headers in (bearer(KEY, shared), bearer(seen, shared), bearer(seen, shared)):
            status, _, raw = await post(base, chat_body(stream=False), headers=headers)
            assert status == 200, raw
        assert hget_calls(server) == before + 1  # the seen key, checked once more
        status, _, raw = await post(base, chat_body(stream=False), headers=bearer(unseen, shared))
        assert status == 429 and error_of(raw)["code"] == "too_many_auth_failures"
        # From elsewhere the unseen key is looked up and works.
        assert (await post(base, chat_body(stream=False), headers=bearer(unseen)))[0] == 200


# --- a body that is not what its Content-Encoding says -----------------------------------------

@pytest.mark.parametrize("encoding", ["deflate", "gzip"])
async def test_a_body_that_is_not_what_its_content_encoding_says_gets_400_and_one_log_line(
        gateway: Any, mock_upstream: Upstream, caplog: pytest.LogCaptureFixture,
        encoding: str) -> None:
    """It used to get aiohttp's plain-text 500 and some 48 lines of tracebacks. Now: a 400 in
    the error shape that says what is wrong, ``Connection: close`` (the connection's framing is
    lost, and aiohttp closes it), one log line and no traceback; the next client is served."""
    caplog.set_level(logging.INFO)
    _, base = gateway
    port = int(base.rsplit(":", 1)[1])
    not_encoded = b'{"model": "grok-4", "messages": []}'
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST " + ROUTE.encode() + b" HTTP/1.1\r\nHost: gateway\r\n"
                     + b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nContent-Encoding: " + encoding.encode()
                     + b"\r\nContent-Length: " + str(len(not_encoded)).encode() + b"\r\n\r\n"
                     + not_encoded)
        await writer.drain()
        async with asyncio.timeout(5):
            status, headers, body = await read_response(reader)
            assert await reader.read() == b""  # closed: aiohttp is done with the request
    finally:
        writer.close()
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert headers["connection"] == "close"
    err = error_of(body)
    assert err["type"] == "invalid_request_error"
    assert f"Content-Encoding ({encoding})" in err["message"]
    logged = [r.getMessage() for r in caplog.records if r.name != "gateway.access"]
    assert len(logged) == 1, logged
    assert logged[0].endswith(f"unreadable body (Content-Encoding: {encoding}): "
                              "ContentEncodingError")
    assert not any(r.exc_info or r.exc_text for r in caplog.records)
    assert mock_upstream.state.requests == []
    # The same body, really encoded, works.
    compress = zlib.compressobj(wbits=31 if encoding == "gzip" else 15)
    encoded = compress.compress(orjson.dumps(chat_body(stream=False))) + compress.flush()
    status, _, _ = await post(base, data=encoded, headers={
        **AUTH, "Content-Type": "application/json", "Content-Encoding": encoding})
    assert status == 200


# --- a key with a model allow-list --------------------------------------------------------------

LIMITED_KEY = "sk-test-limited-0000000005"


@pytest.mark.parametrize("route", ["/v1/images/generations", "/v1/chat/completions",
                                   "/v1/responses"])
@pytest.mark.parametrize("model", ["absent", None])
async def test_a_key_with_a_model_allow_list_must_name_a_model_on_every_route(
        mock_upstream: Upstream, start_gateway: Any, route: str, model: str | None) -> None:
    """Without a model the upstream answers with its default one, which the allow-list never
    saw (``images/generations`` did, with 200): such a request gets 400
    ``missing_required_parameter`` naming ``model``, and never reaches the upstream."""
    _, base = await start_gateway(settings_for(mock_upstream.url, keys=[
        {"name": "limited", "key": LIMITED_KEY, "models": ["grok-4"]}]))
    body: dict[str, Any] = {"prompt": "a cat", "input": "hi",
                            "messages": [{"role": "user", "content": "hi"}]}
    if model != "absent":
        body["model"] = model
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}{route}", json=body,
                          headers={"Authorization": f"Bearer {LIMITED_KEY}"}) as r:
            status, raw = r.status, await r.read()
    assert status == 400
    err = error_of(raw)
    assert err["code"] == "missing_required_parameter" and err["param"] == "model"
    assert mock_upstream.state.requests == []


# --- a body nested deeper than the gateway can send on -------------------------------------------

async def test_a_body_nested_past_what_can_be_sent_on_is_a_400_that_costs_no_token(
        mock_upstream: Upstream, start_gateway: Any) -> None:
    """orjson reads 1,024 levels and writes 254: a body between the two was a 500 with a
    traceback, after a token was spent. Now it is the client's 400, before the limiter; a body
    as deep as can be sent on still goes through."""
    _, base = await start_gateway(settings_for(mock_upstream.url, keys=[
        {"name": "alice", "key": KEY, "burst": 1, "requests_per_minute": 1}]))
    deep = {"tool_choice": {"x": orjson.loads(b"[" * 299 + b"]" * 299)}}  # 301 levels
    status, _, raw = await post(base, chat_body(stream=False, fields=deep))
    assert status == 400
    err = error_of(raw)
    assert err["type"] == "invalid_request_error" and "254 levels" in err["message"]
    assert mock_upstream.state.requests == []
    deepest = {"tool_choice": {"x": orjson.loads(b"[" * 252 + b"]" * 252)}}  # 254 levels
    status, _, raw = await post(base, chat_body(stream=False, fields=deepest))
    assert status == 200, raw  # the key's one token was still there
    assert len(mock_upstream.state.requests) == 1
