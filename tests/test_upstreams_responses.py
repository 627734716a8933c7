"""Stored responses with several upstreams: a response lives on the upstream that made it (each
mock keeps its own), so everything that names it goes there, recorded beside its owner: a
``previous_response_id`` chain stays where it began, over HTTP and over a WebSocket-mode socket,
and retrieval and deletion find it. And a socket's turns count against the key's token limits
as ``POST responses`` does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import aiohttp
import orjson

from gateway.schema import settings_from

from clients import async_sdk
from conftest import KEY, Upstream, settings_for
from test_upstreams import multi


def made_by(response: Any) -> str:
    """The named mock that wrote an answer: its default text starts with its name."""
    return str(response.output_text).split(":", 1)[0]


def posts(mock: Upstream, path: str = "/v1/responses") -> int:
    return sum(1 for r in mock.state.requests if r["method"] == "POST" and r["path"] == path)


async def test_a_previous_response_id_chain_stays_on_the_upstream_where_it_began(
        mocks: dict[str, Upstream], start_gateway: Any) -> None:
    _, base = await start_gateway(multi({"a": mocks["a"].url, "b": mocks["b"].url}))
    client = async_sdk(base)
    for _ in range(2):  # one chain begun on each upstream (round robin, equal weights)
        first = await client.responses.create(model="grok-4", input="hi")
        where = made_by(first)
        previous = first.id
        for turn in range(4):  # every continuation on its chain's upstream, however weighted
            nxt = await client.responses.create(model="grok-4", input=f"and {turn}?",
                                                previous_response_id=previous)
            assert made_by(nxt) == where
            previous = nxt.id
        assert made_by(await client.responses.retrieve(first.id)) == where
        await client.responses.delete(previous)
    assert posts(mocks["a"]) == posts(mocks["b"]) == 5
    await client.close()


async def test_a_continuation_never_moves_from_the_upstream_that_holds_its_response(
        mocks: dict[str, Upstream], start_gateway: Any) -> None:
    _, base = await start_gateway(multi({"a": mocks["a"].url, "b": mocks["b"].url}))
    client = async_sdk(base)
    made = None
    while made is None or made_by(made) != "b":
        made = await client.responses.create(model="grok-4", input="hi")
    mocks["b"].state.forced = {"status": 500}
    before = posts(mocks["a"])
    for stream in (False, True):
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{base}/v1/responses", json={
                    "model": "grok-4", "input": "more", "stream": stream,
                    "previous_response_id": made.id},
                    headers={"Authorization": f"Bearer {KEY}"}) as r:
                assert r.status == 500  # b's failure, told as it is: a would not know the id
    assert posts(mocks["a"]) == before
    await client.close()


async def test_responses_made_with_one_upstream_stay_there_when_more_are_added(
        mocks: dict[str, Upstream], start_gateway: Any, redis_url: str, redis_prefix: str
        ) -> None:
    """A record made by ``[upstream]`` alone names no upstream; it leads to the one named
    ``default``, which the one upstream becomes when ``[[upstreams]]`` lists it so."""
    redis = {"url": redis_url, "key_prefix": redis_prefix}
    _, base = await start_gateway(settings_for(mocks["a"].url, redis=redis))
    client = async_sdk(base)
    made = await client.responses.create(model="grok-4", input="hi")
    await client.close()
    _, base = await start_gateway(settings_from({
        "upstream": {"max_retries": 0}, "redis": redis,
        "keys": [{"name": "alice", "key": KEY}],
        "upstreams": [{"name": "default", "url": mocks["a"].url, "api_key": "k-default-0001"},
                      {"name": "b", "url": mocks["b"].url, "api_key": "k-b-00000001",
                       "weight": 100}]}))
    client = async_sdk(base)
    for _ in range(3):
        nxt = await client.responses.create(model="grok-4", input="more",
                                            previous_response_id=made.id)
        assert made_by(nxt) == "a"
    await client.close()


async def test_readyz_names_the_upstreams_only_to_metrics_allow(
        mocks: dict[str, Upstream], start_gateway: Any) -> None:
    for allow, named in ((["127.0.0.1", "::1"], True), (["10.0.0.0/8"], False)):
        settings = multi({"a": mocks["a"].url, "b": mocks["b"].url})
        settings = dataclasses.replace(settings, server=dataclasses.replace(
            settings.server, metrics_allow=tuple(allow)))
        _, base = await start_gateway(settings)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{base}/readyz") as r:
                ready = await r.json()
        assert r.status == 200 and ready["checks"]["upstream"] == "ok"
        assert ("upstreams" in ready) is named


async def test_a_socket_keeps_the_upstream_its_first_turn_continues(
        mocks: dict[str, Upstream], start_gateway: Any) -> None:
    """Made over HTTP on ``b``, continued over a socket: the socket opens on ``b`` (a
    weight of 100 to 1 would send a choice to ``a``) and keeps it for its next turn."""
    _, base = await start_gateway(multi({"a": mocks["a"].url, "b": mocks["b"].url},
                                        a={"weight": 100}))
    client = async_sdk(base)
    made = None
    while made is None or made_by(made) != "b":  # the smooth round robin gives b 1 in 101
        made = await client.responses.create(model="grok-4", input="hi")
    async with client.responses.connect() as connection:
        previous = made.id
        for _ in range(2):
            await connection.response.create(model="grok-4", input="more",
                                             previous_response_id=previous)
            async for event in connection:
                if event.type == "response.completed":
                    previous = event.response.id
                    assert made_by(event.response) == "b"
                    break
    assert [r["path"] for r in mocks["a"].state.requests if r["method"] == "GET" and
            r["path"] == "/v1/responses"] == []
    await client.close()


async def test_socket_turns_count_against_the_keys_token_limit(
        mock_upstream: Upstream, start_gateway: Any) -> None:
    """Reserved like ``POST responses`` (its output cap and its bytes / 4), settled to its usage
    when the turn ends; a turn the key cannot cover gets an error message, the socket stays."""
    _, base = await start_gateway(settings_for(
        mock_upstream.url, keys=[{"name": "alice", "key": KEY, "tokens_per_day": 400}]))
    url = base.replace("http://", "ws://") + "/v1/responses"
    turn = {"type": "response.create", "model": "grok-4", "input": "hi",
            "max_output_tokens": 200, "mock": {"chunks": 3}}
    seen = []
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(url, headers={"Authorization": f"Bearer {KEY}"}) as ws:
            for _ in range(4):  # 15 tokens used each: the worst case fits until it does not
                await ws.send_str(orjson.dumps(turn).decode())
                while True:
                    message = orjson.loads((await ws.receive(timeout=10)).data)
                    if message["type"] in ("response.completed", "error"):
                        seen.append(message)
                        break
            assert not ws.closed
    kinds = [m["type"] for m in seen]
    # 400 a day: each turn reserves 200 + its bytes / 4 and settles to 15; so two fit at
    # once, and after each settles the next fits too. Then a turn of 1,000 does not.
    assert kinds == ["response.completed"] * 4
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(url, headers={"Authorization": f"Bearer {KEY}"}) as ws:
            await ws.send_str(orjson.dumps({**turn, "max_output_tokens": 1000}).decode())
            refused = orjson.loads((await ws.receive(timeout=10)).data)
            assert refused["type"] == "error" and refused["status"] == 429
            assert refused["error"]["code"] == "token_limit_exceeded"
            await ws.send_str(orjson.dumps(turn).decode())
            while (message := orjson.loads((await ws.receive(timeout=10)).data))["type"] \
                    != "response.completed":
                assert message["type"] != "error", message


async def test_cut_ends_an_overrunning_socket_turn_with_an_error_message(
        mock_upstream: Upstream, start_gateway: Any) -> None:
    _, base = await start_gateway(settings_for(
        mock_upstream.url, keys=[{"name": "alice", "key": KEY, "tokens_per_day": 100}],
        limits={"on_token_overrun": "cut"}))
    url = base.replace("http://", "ws://") + "/v1/responses"
    turn = {"type": "response.create", "model": "grok-4", "input": "hi",
            "max_output_tokens": 5, "mock": {"chunks": 100}}  # past its cap, and the day's
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(url, headers={"Authorization": f"Bearer {KEY}"}) as ws:
            await ws.send_str(orjson.dumps(turn).decode())
            seen = []
            while not seen or seen[-1]["type"] not in ("response.completed", "error"):
                seen.append(orjson.loads((await ws.receive(timeout=10)).data))
            assert seen[-1]["type"] == "error"
            assert seen[-1]["error"]["code"] == "token_limit_exceeded" and len(seen) < 100
            assert not ws.closed
