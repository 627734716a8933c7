"""The Responses API's WebSocket mode through the gateway, with the real OpenAI SDK
(``client.responses.connect()``, ``openai[realtime]``) and raw aiohttp sockets: turns relayed to
the upstream's socket text frame for text frame, each checked and rate limited like
``POST responses``, each response its creator's, and the socket's life bounded (refused turns
keep it open; an idle, oversized, revoked or shut-down one closes)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from gateway.redis.keystore import add_key, revoke_key
from gateway.settings import Limits

from clients import async_sdk, get, same_but_ids, scrape
from conftest import KEY, OTHER_KEY, Upstream, settings_for
from servers import gateway_processes

OPERATOR_KEY = "xai-operator-secret-key"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


def _ws_url(base: str) -> str:
    return base.replace("http://", "ws://") + "/api/v1/responses"


async def _turn(ws: aiohttp.ClientWebSocketResponse, **fields: Any) -> list[dict[str, Any]]:
    """One response.create, and every message up to its last (the terminal one, or an error)."""
    await ws.send_str(orjson.dumps({"type": "response.create", **fields}).decode())
    out: list[dict[str, Any]] = []
    while True:
        msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        out.append(orjson.loads(msg.data))
        if out[-1]["type"] in ("response.completed", "response.failed", "error"):
            return out


async def _socket_turns(upstream: Upstream) -> list[dict[str, Any]]:
    return [r["body"] for r in upstream.state.requests
            if r["method"] == "GET" and r["path"] == "/v1/responses"]


async def test_two_sdk_turns_chained_by_previous_response_id(
        gateway: Any, mock_upstream: Upstream) -> None:
    _, base = gateway
    client = async_sdk(base)
    async with client.responses.connect() as connection:
        await connection.response.create(model="grok-4", input="hi")
        first = []
        async for event in connection:
            first.append(event)
            if event.type == "response.completed":
                break
        rid = first[-1].response.id  # type: ignore[union-attr]
        await connection.response.create(model="grok-4", input="and then?",
                                         previous_response_id=rid)
        second = []
        async for event in connection:
            second.append(event)
            if event.type == "response.completed":
                break
    assert first[0].type == "response.created"
    text = "".join(e.delta for e in first if e.type == "response.output_text.delta")
    assert text == first[-1].response.output_text  # type: ignore[union-attr]
    assert second[-1].response.id != rid  # type: ignore[union-attr]
    turns = await _socket_turns(mock_upstream)
    assert [t.get("previous_response_id") for t in turns] == [None, rid]
    # The socket's responses are the key's like any other: retrieved over HTTP.
    got = await client.responses.retrieve(rid)
    assert got.output_text == text
    await client.close()


async def test_messages_come_back_as_the_upstream_sent_them(
        gateway: Any, mock_upstream: Upstream, http: aiohttp.ClientSession) -> None:
    _, base = gateway
    async with http.ws_connect(_ws_url(base), headers={"Authorization": f"Bearer {KEY}"}) as ws:
        await ws.send_str(orjson.dumps({"type": "response.create", "model": "grok-4",
                                        "input": "hi"}).decode())
        relayed = []
        while not relayed or orjson.loads(relayed[-1])["type"] != "response.completed":
            relayed.append((await ws.receive(timeout=10)).data)
    async with http.ws_connect(f"{mock_upstream.url.replace('http', 'ws')}/responses",
                               headers={"Authorization": "Bearer x"}) as direct:
        await direct.send_str(orjson.dumps({"type": "response.create", "model": "grok-4",
                                            "input": "hi"}).decode())
        upstream = [(await direct.receive(timeout=10)).data for _ in relayed]
    assert [same_but_ids(m.encode()) for m in relayed] == \
        [same_but_ids(m.encode()) for m in upstream]
    assert mock_upstream.state.sockets_opened == 2


async def test_the_upgrade_without_a_valid_key_is_401_and_no_socket(
        gateway: Any, http: aiohttp.ClientSession) -> None:
    _, base = gateway
    for headers in ({}, {"Authorization": "Bearer sk-not-a-key-at-all"}):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(_ws_url(base), headers=headers)
        assert refused.value.status == 401
    plain = await get(f"{base}/api/v1/responses")  # a key, but no upgrade: no socket either
    assert plain.status == 400 and plain.error()["code"] == "websocket_upgrade_required"
    client = async_sdk(base, "sk-not-a-key-at-all")
    with pytest.raises(Exception, match="401"):
        async with client.responses.connect(max_retries=0):
            pass
    await client.close()


async def test_a_key_with_burst_2_gets_two_turns_then_errors_on_a_socket_that_stays_open(
        mock_upstream: Upstream, start_gateway: Any, http: aiohttp.ClientSession) -> None:
    _, base = await start_gateway(settings_for(mock_upstream.url, limits={
        "requests_per_minute": 0.01, "burst": 2}))
    # The upgrade itself takes no token.
    async with http.ws_connect(_ws_url(base), headers={"Authorization": f"Bearer {KEY}"}) as ws:
        for _ in range(2):
            assert (await _turn(ws, model="grok-4", input="hi"))[-1]["type"] == \
                "response.completed"
        for _ in range(2):
            refused = await _turn(ws, model="grok-4", input="hi")
            assert len(refused) == 1
            assert refused[0]["type"] == "error" and refused[0]["status"] == 429
            assert set(refused[0]["error"]) == {"message", "type", "param", "code"}
            assert refused[0]["error"]["type"] == "rate_limit_error"
        assert not ws.closed
    assert len(await _socket_turns(mock_upstream)) == 2


async def test_the_next_turn_may_follow_the_last_message_at_once(
        mock_upstream: Upstream, start_gateway: Any, http: aiohttp.ClientSession,
        redis_url: str, redis_prefix: str) -> None:
    """The turn's stream slot is back (in Redis, here) before its last message goes out."""
    _, base = await start_gateway(settings_for(
        mock_upstream.url, limits={"max_concurrent_streams": 1},
        redis={"url": redis_url, "key_prefix": redis_prefix}))
    async with http.ws_connect(_ws_url(base), headers={"Authorization": f"Bearer {KEY}"}) as ws:
        for _ in range(5):
            assert (await _turn(ws, model="grok-4", input="hi"))[-1]["type"] == \
                "response.completed"


async def test_every_refused_turn_gives_its_stream_slot_and_its_reservation_back(
        mock_upstream: Upstream, start_gateway: Any, http: aiohttp.ClientSession) -> None:
    """A turn refused after its token was taken (nested past what can be re-encoded, another
    key's response continued, a reservation that does not fit) holds nothing: with one stream
    slot, and a day of tokens one more turn fits in, the next turn still runs."""
    _, base = await start_gateway(settings_for(
        mock_upstream.url, limits={"max_concurrent_streams": 1},
        keys=[{"name": "alice", "key": KEY, "tokens_per_day": 2000},
              {"name": "bob", "key": OTHER_KEY}]))
    headers = {"Authorization": f"Bearer {KEY}"}
    deep = "[" * 300 + "]" * 300
    async with http.ws_connect(_ws_url(base), headers=headers) as ws:
        await ws.send_str('{"type": "response.create", "model": "grok-4", "input": "hi", '
                          f'"metadata": {deep}}}')
        refused = [orjson.loads((await ws.receive(timeout=10)).data)]
        refused += await _turn(ws, model="grok-4", input="hi", previous_response_id="resp_x")
        refused += await _turn(ws, model="grok-4", input="hi", max_output_tokens=1990)
        assert [r["error"]["code"] for r in refused] == [
            "invalid_request", "previous_response_not_found", "token_limit_exceeded"]
        for _ in range(2):
            assert (await _turn(ws, model="grok-4", input="hi", max_output_tokens=900))[-1][
                "type"] == "response.completed"


async def test_a_client_that_leaves_mid_turn_frees_its_stream_slot(
        mock_upstream: Upstream, start_gateway: Any, http: aiohttp.ClientSession) -> None:
    _, base = await start_gateway(settings_for(mock_upstream.url,
                                               limits={"max_concurrent_streams": 1}))
    headers = {"Authorization": f"Bearer {KEY}"}
    leaving = await http.ws_connect(_ws_url(base), headers=headers)
    await leaving.send_str(orjson.dumps({
        "type": "response.create", "model": "grok-4", "input": "hi",
        "mock": {"chunks": 400, "chunk_delay": 0.05}}).decode())
    assert orjson.loads((await leaving.receive(timeout=10)).data)["type"] == "response.created"
    async with http.ws_connect(_ws_url(base), headers=headers) as other:
        [busy] = await _turn(other, model="grok-4", input="hi")
        assert busy["error"]["code"] == "concurrency_limit_exceeded"  # the slot is held
        await leaving.close()
        for _ in range(100):  # the slot comes back once the gateway has seen it go
            last = (await _turn(other, model="grok-4", input="hi"))[-1]
            if last["type"] == "response.completed":
                break
            await asyncio.sleep(0.05)
        assert last["type"] == "response.completed"


async def test_an_upstream_socket_closed_between_turns_is_replaced(
        gateway: Any, mock_upstream: Upstream, http: aiohttp.ClientSession) -> None:
    _, base = gateway
    async with http.ws_connect(_ws_url(base), headers={"Authorization": f"Bearer {KEY}"}) as ws:
        for _ in range(3):
            done = await _turn(ws, model="grok-4", input="hi", mock={"close_after_turn": True})
            assert done[-1]["type"] == "response.completed"
    assert mock_upstream.state.sockets_opened == 3
    assert len(await _socket_turns(mock_upstream)) == 3  # each turn went up once


async def test_refused_turns_keep_the_socket_open_and_never_reach_the_upstream(
        gateway: Any, mock_upstream: Upstream, http: aiohttp.ClientSession) -> None:
    _, base = gateway
    alice = async_sdk(base)
    theirs = (await alice.responses.create(model="grok-4", input="mine")).id
    await alice.close()
    async with http.ws_connect(_ws_url(base),
                               headers={"Authorization": f"Bearer {OTHER_KEY}"}) as ws:
        cases = [({"model": "grok-4", "input": "hi", "previous_response_id": theirs},
                  404, "previous_response_not_found"),
                 ({"input": "hi"}, 400, "missing_required_parameter"),
                 ({"model": "grok-4", "input": [{"role": "user", "content": [
                     {"type": "input_image", "image_url": "file:///etc/passwd"}]}]},
                  400, None)]
        for fields, status, code in cases:
            [refused] = await _turn(ws, **fields)
            assert refused["status"] == status
            if code:
                assert refused["error"]["code"] == code
        await ws.send_str('{"type": "response.steer"}')
        assert orjson.loads((await ws.receive(timeout=5)).data)["status"] == 400
        await ws.send_bytes(b"{}")
        assert orjson.loads((await ws.receive(timeout=5)).data)["status"] == 400
        assert (await _turn(ws, model="grok-4", input="hi"))[-1]["type"] == "response.completed"
    assert [t.get("previous_response_id") for t in await _socket_turns(mock_upstream)] == [None]


async def test_the_upstream_gets_the_turn_the_gateway_checked(
        mock_upstream: Upstream, start_gateway: Any, http: aiohttp.ClientSession) -> None:
    _, base = await start_gateway(settings_for(mock_upstream.url, keys=[
        {"name": "alice", "key": KEY, "models": ["grok-4"]}]))
    async with http.ws_connect(_ws_url(base), headers={"Authorization": f"Bearer {KEY}"}) as ws:
        [refused] = await _turn(ws, model="grok-3-mini", input="hi")
        assert refused["status"] == 403 and refused["error"]["code"] == "model_not_allowed"
        # A duplicate key: what was checked (the last "model") is all the upstream sees.
        await ws.send_str('{"type": "response.create", "model": "grok-3-mini", '
                          '"model": "grok-4", "input": "hi"}')
        while orjson.loads((await ws.receive(timeout=10)).data)["type"] != "response.completed":
            pass
    [sent] = [r for r in mock_upstream.state.requests if r["path"] == "/v1/responses"]
    assert b"grok-3-mini" not in sent["raw"] and sent["body"]["model"] == "grok-4"


async def test_the_operator_key_never_comes_back_over_the_socket(
        mock_upstream: Upstream, start_gateway: Any, http: aiohttp.ClientSession) -> None:
    _, base = await start_gateway(settings_for(mock_upstream.url))
    async with http.ws_connect(_ws_url(base), headers={"Authorization": f"Bearer {KEY}"}) as ws:
        messages = await _turn(ws, model="grok-4", input="hi", mock={"echo_auth": ["text"]})
    assert messages[-1]["type"] == "response.completed"
    for message in messages:
        assert OPERATOR_KEY[:12] not in orjson.dumps(message).decode()
    assert any("[redacted]" in orjson.dumps(m).decode() for m in messages)


async def test_a_message_over_max_body_bytes_closes_the_socket_with_1009(
        mock_upstream: Upstream, start_gateway: Any, http: aiohttp.ClientSession) -> None:
    _, base = await start_gateway(settings_for(mock_upstream.url,
                                               stream={"max_body_bytes": 4096}))
    async with http.ws_connect(_ws_url(base), headers={"Authorization": f"Bearer {KEY}"}) as ws:
        await ws.send_str(orjson.dumps({"type": "response.create", "model": "grok-4",
                                        "input": "x" * 5000}).decode())
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1009
    assert await _socket_turns(mock_upstream) == []


async def test_an_idle_socket_is_closed(
        mock_upstream: Upstream, start_gateway: Any, http: aiohttp.ClientSession) -> None:
    _, base = await start_gateway(settings_for(mock_upstream.url,
                                               stream={"idle_timeout_seconds": 0.3}))
    async with http.ws_connect(_ws_url(base), headers={"Authorization": f"Bearer {KEY}"}) as ws:
        msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1000


async def test_a_revoked_keys_socket_closes(
        mock_upstream: Upstream, start_gateway: Any, http: aiohttp.ClientSession,
        redis_url: str, redis_prefix: str) -> None:
    admin = aioredis.Redis.from_url(redis_url)
    key, _ = await add_key(admin, redis_prefix, "dave", Limits(60, 10, 2))
    _, base = await start_gateway(settings_for(mock_upstream.url, redis={
        "url": redis_url, "key_prefix": redis_prefix, "key_cache_seconds": 0.2}))
    async with http.ws_connect(_ws_url(base), headers={"Authorization": f"Bearer {key}"}) as ws:
        assert (await _turn(ws, model="grok-4", input="hi"))[-1]["type"] == "response.completed"
        await revoke_key(admin, redis_prefix, "dave")
        last = await ws.receive(timeout=10)
        assert orjson.loads(last.data)["error"]["code"] == "api_key_revoked"
        closed = await ws.receive(timeout=10)
        assert closed.type is aiohttp.WSMsgType.CLOSE and closed.data == 1008
    await admin.aclose()


async def test_shutdown_closes_sockets_with_1001(
        tmp_path: Path, mock_upstream: Upstream, http: aiohttp.ClientSession) -> None:
    config = {"server": {"drain_seconds": 5},
              "upstream": {"url": mock_upstream.url, "api_key": OPERATOR_KEY},
              "keys": [{"name": "alice", "key": KEY}]}
    async with gateway_processes(config, 1, tmp_path) as [gw]:
        async with http.ws_connect(_ws_url(gw.url),
                                   headers={"Authorization": f"Bearer {KEY}"}) as ws:
            assert (await _turn(ws, model="grok-4", input="hi"))[-1]["type"] == \
                "response.completed"
            # A turn in flight when the drain begins ends first; then the socket closes.
            await ws.send_str(orjson.dumps({
                "type": "response.create", "model": "grok-4", "input": "hi",
                "mock": {"chunk_delay": 0.05}}).decode())
            first = await ws.receive(timeout=10)
            assert orjson.loads(first.data)["type"] == "response.created"
            gw.signal(signal.SIGTERM)
            rest = []
            while (msg := await ws.receive(timeout=10)).type is aiohttp.WSMsgType.TEXT:
                rest.append(orjson.loads(msg.data)["type"])
            assert rest[-1] == "response.completed"
            assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1001
        assert await asyncio.to_thread(gw.wait, 10) == 0


async def test_the_sdk_raises_nothing_on_an_error_message_and_reads_on(gateway: Any) -> None:
    _, base = gateway
    client = async_sdk(base)
    async with client.responses.connect() as connection:
        await connection.response.create(model="grok-nonexistent", input="hi")
        error = await connection.recv()
        assert error.type == "error"
        assert error.status == 404  # type: ignore[union-attr]
        await connection.response.create(model="grok-4", input="hi")
        async for event in connection:
            if event.type == "response.completed":
                break
    await client.close()


async def test_a_sockets_turns_are_counted_together_in_its_log_line_and_metrics(
        gateway: Any, http: aiohttp.ClientSession) -> None:
    _, base = gateway
    async with http.ws_connect(_ws_url(base), headers={"Authorization": f"Bearer {KEY}"}) as ws:
        for _ in range(3):
            assert (await _turn(ws, model="grok-4", input="hi", mock={"chunks": 2}))[-1][
                "type"] == "response.completed"
    for _ in range(100):  # counted as the socket's one request ends
        samples = await scrape(base)
        prompt = sum(v for (name, labels), v in samples.items()
                     if name == "gateway_tokens_total" and ("type", "prompt") in labels)
        if prompt:
            break
        await asyncio.sleep(0.02)
    assert prompt == 3 * 12
