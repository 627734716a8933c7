"""Several upstreams (``[[upstreams]]``), for real: two named mock upstreams and a dead port on
loopback, the gateway in front, driven with aiohttp and the OpenAI SDK. Which upstream answered
is what the client reads: a named mock starts its default text with its name.

The choice's rules on their own (weights, affinity, health) are in ``test_upstream_choice.py``.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.mock.ports import free_port
from gateway.request_info import RequestInfo
from gateway.schema import settings_from
from gateway.settings import Settings
from gateway.stream.relay import StreamRelay
from gateway.stream.render import StreamRenderer
from gateway.upstream.upstreams import Attempts

from clients import AUTH, async_sdk, chat_body, scrape, sse_events, value
from conftest import KEY, OTHER_KEY, Upstream
from servers import wait_until_async

OPERATOR_KEYS = {"a": "xai-operator-key-of-a-0001", "b": "xai-operator-key-of-b-0002",
                 "dead": "xai-operator-key-dead-0003"}


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


def multi(urls: dict[str, str], upstream: dict[str, Any] | None = None,
          limits: dict[str, Any] | None = None, **per_upstream: dict[str, Any]) -> Settings:
    """Settings with one ``[[upstreams]]`` entry per name in ``urls`` (in that order)."""
    return settings_from({
        "upstream": {"max_retries": 0, **(upstream or {})},
        "limits": {"requests_per_minute": 60000, "burst": 5000, "max_concurrent_streams": 100,
                   **(limits or {})},
        "keys": [{"name": "alice", "key": KEY}, {"name": "bob", "key": OTHER_KEY}],
        "upstreams": [{"name": name, "url": url, "api_key": OPERATOR_KEYS[name],
                       **per_upstream.get(name, {})} for name, url in urls.items()],
    })


async def plain(session: aiohttp.ClientSession, base: str, **kwargs: Any
                ) -> tuple[int, Any, aiohttp.ClientResponse]:
    headers = {**AUTH, **kwargs.pop("headers", {})}
    body = kwargs.pop("body", None) or chat_body(stream=False, **kwargs)
    async with session.post(f"{base}/v1/chat/completions", json=body, headers=headers) as r:
        return r.status, await r.json(), r


def posts(mock: Upstream) -> int:
    """The requests a mock was sent, readiness probes (``GET models``) aside."""
    return sum(1 for r in mock.state.requests if r["method"] == "POST")


def answered_by(answer: Any) -> str:
    return str(answer["choices"][0]["message"]["content"]).split(":", 1)[0]


async def streamed(session: aiohttp.ClientSession, base: str, path: str, body: dict[str, Any]
                   ) -> tuple[int, list[bytes]]:
    async with session.post(f"{base}/v1/{path}", json=body, headers=AUTH) as r:
        return r.status, sse_events(await r.read())


def chat_text(events: list[bytes]) -> str:
    text = ""
    for event in events:
        data = event.removeprefix(b"data: ").strip()
        if data != b"[DONE]":
            obj = orjson.loads(data)
            if obj.get("choices"):
                text += obj["choices"][0]["delta"].get("content") or ""
    return text


async def metric(session: aiohttp.ClientSession, base: str, name: str, **labels: str) -> float:
    return value(await scrape(base), name, **labels)


# --- failover before the first output ---------------------------------------------------------

async def test_a_refused_connection_moves_the_request_to_the_next_upstream(
        mocks: dict[str, Upstream], start_gateway: Any) -> None:
    _, base = await start_gateway(multi({"dead": dead_url(), "a": mocks["a"].url},
                                        dead={"weight": 100}))
    async with aiohttp.ClientSession() as s:
        for _ in range(4):
            status, answer, _r = await plain(s, base)
            assert status == 200 and answered_by(answer) == "a"
        status, events = await streamed(s, base, "chat/completions", chat_body(stream=True))
        assert status == 200 and chat_text(events).startswith("a: ")
        assert await metric(s, base, "gateway_upstream_failovers_total", upstream="dead") >= 1
        assert await metric(s, base, "gateway_upstream_requests_total", upstream="dead",
                            outcome="unreachable") >= 1


@pytest.mark.parametrize("stream", [False, True])
async def test_a_500_moves_the_request_to_the_next_upstream(
        mocks: dict[str, Upstream], start_gateway: Any, stream: bool) -> None:
    mocks["a"].state.forced = {"status": 500}
    _, base = await start_gateway(multi({"a": mocks["a"].url, "b": mocks["b"].url},
                                        a={"weight": 100}))
    async with aiohttp.ClientSession() as s:
        if stream:
            status, events = await streamed(s, base, "chat/completions", chat_body(stream=True))
            assert status == 200 and chat_text(events).startswith("b: ")
        else:
            status, answer, _r = await plain(s, base)
            assert status == 200 and answered_by(answer) == "b"
    assert posts(mocks["a"]) == 1  # it was tried first


async def test_a_429_rests_that_upstream_and_the_request_moves(
        mocks: dict[str, Upstream], start_gateway: Any) -> None:
    mocks["a"].state.forced = {"status": 429, "error_headers": {"Retry-After": "30"}}
    _, base = await start_gateway(multi({"a": mocks["a"].url, "b": mocks["b"].url},
                                        a={"weight": 100}))
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            status, answer, _r = await plain(s, base)
            assert status == 200 and answered_by(answer) == "b"
        async with s.get(f"{base}/readyz") as r:
            ready = await r.json()
    assert posts(mocks["a"]) == 1  # resting: not asked again
    assert r.status == 200 and ready["upstreams"] == {"a": "resting", "b": "ok"}


async def test_when_every_upstream_rests_the_client_gets_429_with_the_soonest_retry_after(
        mocks: dict[str, Upstream], start_gateway: Any) -> None:
    mocks["a"].state.forced = {"status": 429, "error_headers": {"Retry-After": "40"}}
    mocks["b"].state.forced = {"status": 429, "error_headers": {"Retry-After": "20"}}
    _, base = await start_gateway(multi({"a": mocks["a"].url, "b": mocks["b"].url}))
    async with aiohttp.ClientSession() as s:
        first, _, _r = await plain(s, base)  # both tried: the last one's 429 is the answer
        status, answer, r = await plain(s, base)
    assert first == 429
    assert status == 429 and answer["error"]["code"] == "upstream_rate_limited"
    assert 15 <= int(r.headers["Retry-After"]) <= 20
    assert posts(mocks["a"]) == posts(mocks["b"]) == 1


async def test_a_400_is_the_clients_own_and_never_moves(
        mocks: dict[str, Upstream], start_gateway: Any) -> None:
    mocks["a"].state.forced = {"status": 400, "message": "your request is wrong"}
    _, base = await start_gateway(multi({"a": mocks["a"].url, "b": mocks["b"].url},
                                        a={"weight": 100}))
    async with aiohttp.ClientSession() as s:
        status, answer, _r = await plain(s, base)
        stream_status, _events = await streamed(s, base, "chat/completions",
                                                chat_body(stream=True))
    assert status == stream_status == 400 and answer["error"]["message"] == "your request is wrong"
    assert posts(mocks["b"]) == 0


async def test_a_chat_stream_whose_first_event_is_an_error_is_answered_by_the_next_upstream(
        mocks: dict[str, Upstream], start_gateway: Any) -> None:
    mocks["a"].state.forced = {"error_after": 0}
    _, base = await start_gateway(multi({"a": mocks["a"].url, "b": mocks["b"].url},
                                        a={"weight": 100}))
    async with aiohttp.ClientSession() as s:
        status, events = await streamed(s, base, "chat/completions", chat_body(stream=True))
    assert status == 200 and chat_text(events).startswith("b: ")
    assert events[-1] == b"data: [DONE]\n\n"
    assert not any(b'"error"' in e for e in events)


async def test_a_stream_whose_upstream_dies_after_its_first_event_ends_with_an_error_frame(
        mocks: dict[str, Upstream], start_gateway: Any) -> None:
    mocks["a"].state.forced = {"disconnect_after": 2}
    _, base = await start_gateway(multi({"a": mocks["a"].url, "b": mocks["b"].url},
                                        a={"weight": 100}))
    async with aiohttp.ClientSession() as s:
        status, events = await streamed(s, base, "chat/completions", chat_body(stream=True))
    assert status == 200 and chat_text(events[:-1]) == "a: Ah, "
    assert orjson.loads(events[-1].removeprefix(b"data: "))["error"]["code"] \
        == "upstream_bad_stream"
    assert posts(mocks["b"]) == 0  # output had gone out: never moved


@pytest.mark.parametrize("failure", [{"failed_after": 2}, {"error_after": 2}])
async def test_a_responses_stream_that_fails_after_response_created_is_answered_by_the_other(
        mocks: dict[str, Upstream], start_gateway: Any, failure: dict[str, int]) -> None:
    """``response.created`` and ``response.in_progress``, then ``response.failed`` (or an
    ``error`` event): the client sees one answer, the other upstream's, with one preamble."""
    mocks["a"].state.forced = failure
    _, base = await start_gateway(multi({"a": mocks["a"].url, "b": mocks["b"].url},
                                        a={"weight": 100}))
    client = async_sdk(base)
    kinds: list[str] = []
    async with client.responses.stream(model="grok-4", input="hi") as stream:
        async for event in stream:
            kinds.append(event.type)
        final = await stream.get_final_response()
    assert final.status == "completed" and final.output_text.startswith("b: ")
    assert kinds.count("response.created") == 1 and kinds[0] == "response.created"
    assert "response.failed" not in kinds and "error" not in kinds
    assert posts(mocks["a"]) == 1


async def test_a_responses_stream_on_the_last_upstream_keeps_its_preamble_and_its_failure(
        mocks: dict[str, Upstream], start_gateway: Any) -> None:
    """Nowhere to move: what the upstream sent reaches the client, preamble first."""
    for mock in mocks.values():
        mock.state.forced = {"failed_after": 2}
    _, base = await start_gateway(multi({"a": mocks["a"].url, "b": mocks["b"].url}))
    async with aiohttp.ClientSession() as s:
        status, events = await streamed(s, base, "responses",
                                        {"model": "grok-4", "input": "hi", "stream": True})
    names = [e.split(b"\n", 1)[0] for e in events]
    assert status == 200 and names == [b"event: response.created",
                                       b"event: response.in_progress", b"event: response.failed"]


# --- the choice ---------------------------------------------------------------------------------

async def test_weights_of_3_to_1_send_three_requests_in_four_to_the_first(
        mocks: dict[str, Upstream], start_gateway: Any) -> None:
    _, base = await start_gateway(multi({"a": mocks["a"].url, "b": mocks["b"].url},
                                        a={"weight": 3}, b={"weight": 1}))
    counts = {"a": 0, "b": 0}
    async with aiohttp.ClientSession() as s:
        for _ in range(20):
            answers = await asyncio.gather(*(plain(s, base) for _ in range(50)))
            for status, answer, _r in answers:
                assert status == 200
                counts[answered_by(answer)] += 1
    assert 700 <= counts["a"] <= 800, counts


async def test_one_conversation_stays_on_one_upstream_and_moves_only_when_it_is_ejected(
        mocks: dict[str, Upstream], start_gateway: Any) -> None:
    _, base = await start_gateway(multi({"a": mocks["a"].url, "b": mocks["b"].url},
                                        upstream={"eject_after_failures": 2}))
    conv = {"x-grok-conv-id": "conversation-42"}
    async with aiohttp.ClientSession() as s:
        seen = {answered_by((await plain(s, base, headers=conv))[1]) for _ in range(100)}
        assert len(seen) == 1
        home = seen.pop()
        other = "b" if home == "a" else "a"
        others = {answered_by((await plain(s, base))[1]) for _ in range(10)}
        assert others == {"a", "b"}  # the other requests are spread: only the conversation sticks
        mocks[home].state.forced = {"status": 503}
        asked = posts(mocks[home])
        for _ in range(10):
            assert answered_by((await plain(s, base, headers=conv))[1]) == other
        assert posts(mocks[home]) == asked + 2  # ejected after two failures
        assert await metric(s, base, "gateway_upstream_ejections_total", upstream=home) == 1


async def test_an_ejected_upstream_gets_one_trial_and_comes_back(
        mocks: dict[str, Upstream], start_gateway: Any) -> None:
    mocks["a"].state.forced = {"status": 500}
    _, base = await start_gateway(multi({"a": mocks["a"].url, "b": mocks["b"].url},
                                        upstream={"eject_seconds": 0.5}, a={"weight": 100}))
    async with aiohttp.ClientSession() as s:
        for _ in range(6):
            assert answered_by((await plain(s, base))[1]) == "b"
        assert posts(mocks["a"]) == 3  # out after three failures in a row
        async with s.get(f"{base}/readyz") as r:
            assert (await r.json())["upstreams"]["a"] == "ejected"
        mocks["a"].state.forced = {}
        await asyncio.sleep(0.6)
        assert answered_by((await plain(s, base))[1]) == "a"  # the trial
        assert answered_by((await plain(s, base))[1]) == "a"
        assert await metric(s, base, "gateway_upstream_returns_total", upstream="a") == 1
        async with s.get(f"{base}/readyz") as r:
            assert (await r.json())["upstreams"] == {"a": "ok", "b": "ok"}


async def test_the_last_upstream_serving_a_model_is_never_ejected(
        mocks: dict[str, Upstream], start_gateway: Any) -> None:
    for mock in mocks.values():
        mock.state.forced = {"status": 500}
    _, base = await start_gateway(multi({"a": mocks["a"].url, "b": mocks["b"].url}))
    async with aiohttp.ClientSession() as s:
        for _ in range(8):
            status, answer, _r = await plain(s, base)
            assert status == 500 and "127.0.0.1" not in str(answer)
        async with s.get(f"{base}/readyz") as r:
            states = (await r.json())["upstreams"]
    assert sorted(states.values()) == ["ejected", "ok"]


async def test_max_concurrent_spills_over_to_the_next_upstream(
        mocks: dict[str, Upstream], start_gateway: Any) -> None:
    _, base = await start_gateway(multi({"a": mocks["a"].url, "b": mocks["b"].url},
                                        a={"weight": 100, "max_concurrent": 1}))
    async with aiohttp.ClientSession() as s:
        body = chat_body(stream=True, pause_after=1, pause=30)
        async with s.post(f"{base}/v1/chat/completions", json=body, headers=AUTH) as held:
            first = await held.content.readuntil(b"\n\n")
            assert b'"a: ' in first  # a holds its one open request
            status, answer, _r = await plain(s, base)
            assert status == 200 and answered_by(answer) == "b"
        # The client left the held stream: its upstream request ends, and a takes requests again.
        await wait_until_async(lambda: mocks["a"].state.disconnects == 1, 5,
                               "the upstream saw the request end")
        assert answered_by((await plain(s, base))[1]) == "a"


async def test_a_client_pays_one_rate_limit_token_whatever_the_failovers(
        mocks: dict[str, Upstream], start_gateway: Any) -> None:
    mocks["a"].state.forced = {"status": 502}
    _, base = await start_gateway(multi(
        {"dead": dead_url(), "a": mocks["a"].url, "b": mocks["b"].url},
        upstream={"eject_after_failures": 100},
        limits={"requests_per_minute": 1, "burst": 10},
        dead={"weight": 100}, a={"weight": 10}))
    async with aiohttp.ClientSession() as s:
        left = []
        for _ in range(3):
            status, answer, r = await plain(s, base)
            assert status == 200 and answered_by(answer) == "b"
            left.append(int(r.headers["x-ratelimit-remaining-requests"]))
    assert left == [9, 8, 7]
    assert posts(mocks["a"]) == 3  # each request moved twice


# --- what the upstreams serve, and what a client never sees ---------------------------------

async def test_models_are_the_union_of_what_each_upstream_serves(
        mocks: dict[str, Upstream], start_gateway: Any) -> None:
    _, base = await start_gateway(multi({"a": mocks["a"].url, "b": mocks["b"].url},
                                        a={"models": ["grok-4*"]}, b={"models": ["grok-3*"]}))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/v1/models", headers=AUTH) as r:
            ids = sorted(m["id"] for m in (await r.json())["data"])
        assert ids == ["grok-3-mini", "grok-4", "grok-4-1-fast-non-reasoning"]
        assert answered_by((await plain(s, base, model="grok-3-mini"))[1]) == "b"
        assert answered_by((await plain(s, base, model="grok-4"))[1]) == "a"
        status, answer, _r = await plain(s, base, model="grok-2-vision-1212")
    assert status == 404 and answer["error"]["code"] == "model_not_found"


async def test_no_upstream_name_url_or_key_reaches_a_client(
        mocks: dict[str, Upstream], start_gateway: Any) -> None:
    """Every upstream's key is withheld, whichever answered; an error names no upstream."""
    mocks["a"].state.forced = {"status": 500}
    _, base = await start_gateway(multi({"dead": dead_url(), "a": mocks["a"].url,
                                         "b": mocks["b"].url}, dead={"weight": 100},
                                        a={"weight": 10}))
    async with aiohttp.ClientSession() as s:
        _, answer, _r = await plain(s, base, echo_auth=["text"])
        _, events = await streamed(s, base, "chat/completions",
                                   chat_body(stream=True, echo_auth=["text"]))
    text = orjson.dumps(answer).decode() + b"".join(events).decode()
    assert "the key is [redacted]" in text
    assert not any(key[4:20] in text for key in OPERATOR_KEYS.values())
    mocks["b"].state.forced = {"status": 500}
    async with aiohttp.ClientSession() as s:
        status, answer, _r = await plain(s, base)
    assert status == 500
    message = orjson.dumps(answer).decode()
    assert not any(word in message for word in ("dead", "127.0.0.1", mocks["b"].url))


async def test_the_access_log_names_the_upstream_that_answered(
        mocks: dict[str, Upstream], start_gateway: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    mocks["a"].state.forced = {"status": 500}
    _, base = await start_gateway(multi({"a": mocks["a"].url, "b": mocks["b"].url},
                                        a={"weight": 100}))
    with caplog.at_level("INFO", logger="gateway.access"):
        async with aiohttp.ClientSession() as s:
            await plain(s, base)
    lines = [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    assert [line["upstream"] for line in lines] == ["b"]


async def test_a_try_silent_past_the_headers_timeout_moves_to_the_next_upstream(
        mocks: dict[str, Upstream], start_gateway: Any) -> None:
    mocks["a"].state.forced = {"headers_delay": 30}
    _, base = await start_gateway(multi({"a": mocks["a"].url, "b": mocks["b"].url},
                                        upstream={"headers_timeout_seconds": 0.3},
                                        a={"weight": 100}))
    async with aiohttp.ClientSession() as s:
        status, answer, _r = await plain(s, base)
        stream_status, events = await streamed(s, base, "chat/completions",
                                               chat_body(stream=True))
    assert status == 200 and answered_by(answer) == "b"
    assert stream_status == 200 and chat_text(events).startswith("b: ")
    assert await metric(s, base, "gateway_upstream_requests_total", upstream="a",
                        outcome="timeout") == 2


async def test_a_moved_request_is_freed_the_moment_it_ends(
        mocks: dict[str, Upstream], start_gateway: Any) -> None:
    """No reference cycle of the failover's own keeps a request alive for the garbage collector
    (as ``guarantees/test_freed_at_once.py`` holds for one upstream)."""
    mocks["a"].state.forced = {"error_after": 0}
    _, base = await start_gateway(multi({"dead": dead_url(), "a": mocks["a"].url,
                                         "b": mocks["b"].url}, dead={"weight": 100},
                                        a={"weight": 10}, upstream={"eject_after_failures": 99}))
    bodies = [("chat/completions", chat_body(stream=True)),
              ("chat/completions", chat_body(stream=False)),
              ("responses", {"model": "grok-4", "input": "hi", "stream": True})]
    async with aiohttp.ClientSession() as s:
        for path, body in bodies:  # warmed up: connections, caches
            assert (await streamed(s, base, path, body))[0] == 200
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for path, body in bodies:
                assert (await streamed(s, base, path, body))[0] == 200
            gc.collect()
            left = [type(o).__name__ for o in gc.garbage
                    if isinstance(o, (StreamRelay, StreamRenderer, Attempts, RequestInfo))]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert left == []
