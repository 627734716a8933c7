"""Token and spend limits per key: reserved before the upstream call, settled from the real usage
(xAI's ``cost_in_usd_ticks`` where the upstream sends it), exact across processes sharing Redis,
and told to the client in headers and in a ``: usage`` comment that no SSE client minds.

Gateways run in the test's process (``start_gateway``) where one suffices and as real ``gateway
serve`` processes where the test is about several of them or a restart; Redis is the machine's,
under the test's own prefix.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from gateway.errors import ServiceUnavailable
from gateway.mock.replies import TICKS_PER_TOKEN
from gateway.ratelimit.memory import MemoryLimiter
from gateway.ratelimit.redis import RedisLimiter, budget_key
from gateway.redis.topology import connect
from gateway.request_info import ClientKey
from gateway.settings import RedisSettings, TokenBudget

from clients import USER, asking_usage, async_sdk, blocks, chat_body, in_thread, post
from conftest import KEY, OTHER_KEY, Upstream, settings_for
from servers import gateway_processes, redis_server, run_cli, write_config
from test_upstreams import multi

PRICE = {"input": 3.0, "output": 15.0}  # USD per million tokens: 30,000 and 150,000 ticks each
TICKS_IN, TICKS_OUT = 30_000, 150_000


def reserved(body: bytes, cap: int) -> tuple[int, int]:
    """What a request of these bytes and output cap reserves: tokens, and ticks at PRICE."""
    prompt = math.ceil(len(body) / 4)
    return prompt + cap, prompt * TICKS_IN + cap * TICKS_OUT


def keys(**alice: Any) -> list[dict[str, Any]]:
    return [{"name": "alice", "key": KEY, **alice}, {"name": "bob", "key": OTHER_KEY}]


async def send(base: str, body: dict[str, Any], key: str = KEY, path: str = "chat/completions"
               ) -> tuple[int, dict[str, str], bytes]:
    """The body sent as these exact bytes (``reserved`` counts them)."""
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/v1/{path}", data=orjson.dumps(body), headers={
                "Authorization": f"Bearer {key}", "Content-Type": "application/json"}) as r:
            return r.status, dict(r.headers), await r.read()


def comment(raw: bytes) -> dict[str, Any]:
    (line,) = [b for b in blocks(raw) if b.startswith(b": usage ")]
    return orjson.loads(line[len(b": usage "):])  # type: ignore[no-any-return]


async def budget_state(prefix: str, name: str = "alice") -> dict[str, float]:
    client = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        raw = await client.hgetall(budget_key(prefix, name))
    finally:
        await client.aclose()
    return {k.decode(): float(v) for k, v in raw.items()}


def redis_section(redis_url: str, prefix: str) -> dict[str, Any]:
    return {"url": redis_url, "key_prefix": prefix, "timeout_seconds": 1.0}


def process_config(redis_url: str, prefix: str, alice: dict[str, Any]) -> dict[str, Any]:
    return {"server": {"drain_seconds": 0.5}, "upstream": {"url": "mock"},
            "redis": redis_section(redis_url, prefix),
            "limits": {"requests_per_minute": 6000, "burst": 1000,
                       "max_concurrent_streams": 100},
            "models": {"prices": {"grok-4": PRICE}}, "keys": keys(**alice)}


# --- exact across processes -------------------------------------------------------------------

@pytest.mark.parametrize("limit", ["tokens_per_day", "usd_per_day"])
async def test_concurrent_requests_through_two_processes_never_pass_the_limit(
        redis_url: str, redis_prefix: str, tmp_path: Path, limit: str) -> None:
    """Twenty requests at once, ten to each process, each held by the upstream for a second so
    that all reserve before any settles: exactly as many pass as the limit covers whole."""
    body = chat_body(stream=False, messages=USER, fields={"max_tokens": 100},
                     headers_delay=1.0, chunks=3)
    tokens, ticks = reserved(orjson.dumps(body), 100)
    value = 5.5 * tokens if limit == "tokens_per_day" else 5.5 * ticks / 10**10
    alice = {limit: int(value) if limit == "tokens_per_day" else value}
    async with gateway_processes(process_config(redis_url, redis_prefix, alice), 2,
                                 tmp_path) as gateways:
        answers = await asyncio.gather(*(send(gateways[i % 2].url, body) for i in range(20)))
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200] * 5 + [429] * 15
    refused = [orjson.loads(raw)["error"] for status, _, raw in answers if status == 429]
    code = "token_limit_exceeded" if limit == "tokens_per_day" else "insufficient_quota"
    assert {e["code"] for e in refused} == {code}
    assert all(("$" in e["message"]) == (limit == "usd_per_day") for e in refused)
    # Settled to the truth: 12 prompt tokens and 3 of answer each, at xAI's exact charge.
    state = await budget_state(redis_prefix)
    assert state["day_tok"] == 5 * 15
    assert state["day_usd"] == 5 * (12 * TICKS_PER_TOKEN["input"] + 3 * TICKS_PER_TOKEN["output"])


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_refund_makes_room_at_once(
        mock_upstream: Upstream, start_gateway: Any, redis_url: str, redis_prefix: str,
        backend: str) -> None:
    body = chat_body(stream=True, messages=USER, fields={"max_tokens": 200}, chunks=3)
    tokens, _ = reserved(orjson.dumps(body), 200)
    sections: dict[str, Any] = {"keys": keys(tokens_per_day=tokens + 20)}
    if backend == "redis":
        sections["redis"] = redis_section(redis_url, redis_prefix)
    _, base = await start_gateway(settings_for(mock_upstream.url, **sections))
    first = await send(base, body)
    assert first[0] == 200 and comment(first[2])["remaining_tokens_day"] == tokens + 20 - 15
    # Without the refund the day would be spent; with it, the same request passes now.
    second = await send(base, body)
    assert second[0] == 200, second[2]
    third_body = {**body, "max_tokens": 10_000}
    third = await send(base, third_body)
    assert third[0] == 429 and orjson.loads(third[2])["error"]["code"] == "token_limit_exceeded"
    assert "Retry-After" not in third[1]  # more than the whole day: no retry can pass


async def test_day_and_month_budgets_survive_a_restart(
        redis_url: str, redis_prefix: str, tmp_path: Path) -> None:
    body = chat_body(stream=False, messages=USER, fields={"max_tokens": 10}, chunks=3)
    _, ticks = reserved(orjson.dumps(body), 10)
    charged = 12 * TICKS_PER_TOKEN["input"] + 3 * TICKS_PER_TOKEN["output"]
    for limit in ("usd_per_day", "usd_per_month"):
        alice = {limit: (ticks + charged // 2) / 10**10}  # one request fits, never two
        config = process_config(redis_url, f"{redis_prefix}:{limit}", alice)
        async with gateway_processes(config, 1, tmp_path) as (gw,):
            assert (await send(gw.url, body))[0] == 200
            status, headers, raw = await send(gw.url, body)
            assert status == 429 and int(headers["Retry-After"]) > 0
        async with gateway_processes(config, 1, tmp_path) as (gw,):
            status, _, raw = await send(gw.url, body)
        assert status == 429, raw
        error = orjson.loads(raw)["error"]
        assert error["code"] == "insufficient_quota" and error["type"] == "insufficient_quota"
        assert ("a day" if limit == "usd_per_day" else "a month") in error["message"]


async def test_keys_cli_sets_token_and_spend_limits_and_lists_each_keys_spend(
        redis_url: str, redis_prefix: str, tmp_path: Path) -> None:
    config = process_config(redis_url, redis_prefix, {})
    path = str(write_config(tmp_path / "cli.toml", config))
    added = run_cli("keys", "add", "--name", "carol", "--tpm", "5000", "--tpd", "100000",
                    "--usd-per-day", "2.5", "--usd-per-month", "40", "--config", path)
    assert added.returncode == 0, added.stderr
    assert "5,000 tokens/min" in added.stderr and "$2.5/day" in added.stderr
    async with gateway_processes(config, 1, tmp_path) as (gw,):
        status, headers, _ = await send(gw.url, chat_body(stream=False, messages=USER,
                                                          chunks=3), key=added.stdout.strip())
    assert status == 200 and headers["x-ratelimit-limit-tokens"] == "5000"
    listed = run_cli("keys", "list", "--config", path)
    assert listed.returncode == 0, listed.stderr
    header, *lines = listed.stdout.splitlines()
    rows = {line.split()[0]: dict(zip(header.replace("SPENT ", "SPENT_").split(),
                                      line.split(), strict=False)) for line in lines}
    spent = (12 * TICKS_PER_TOKEN["input"] + 3 * TICKS_PER_TOKEN["output"]) / 10**10
    assert rows["carol"]["TPM"] == "5,000" and rows["carol"]["USD/MONTH"] == "$40"
    assert rows["carol"]["SPENT_TODAY"] == rows["carol"]["SPENT_MONTH"] == f"${spent:.6f}"
    assert rows["alice"]["SPENT_TODAY"] == "$0.000000"


# --- settling -----------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["xai", "openai"])
async def test_settlement_follows_cost_in_usd_ticks_when_present_and_prices_otherwise(
        mock_upstream: Upstream, start_gateway: Any, style: str) -> None:
    _, base = await start_gateway(settings_for(
        mock_upstream.url, keys=keys(usd_per_day=100.0), models={"prices": {"grok-4": PRICE}}))
    status, _, raw = await send(base, chat_body(stream=True, messages=USER, chunks=3,
                                                style=style))
    assert status == 200
    seen = comment(raw)
    assert seen["prompt_tokens"] == 12 and seen["completion_tokens"] == 3
    if style == "xai":  # the upstream's exact charge, not the configured price
        ticks = 12 * TICKS_PER_TOKEN["input"] + 3 * TICKS_PER_TOKEN["output"]
    else:
        ticks = 12 * TICKS_IN + 3 * TICKS_OUT
    assert seen["cost_usd"] == pytest.approx(ticks / 10**10)
    assert seen["remaining_usd_day"] == pytest.approx(100.0 - ticks / 10**10)


async def test_an_unpriced_model_is_refused_only_for_keys_with_a_spend_limit(
        mock_upstream: Upstream, start_gateway: Any) -> None:
    _, base = await start_gateway(settings_for(mock_upstream.url, keys=[
        {"name": "alice", "key": KEY, "usd_per_day": 5.0},
        {"name": "bob", "key": OTHER_KEY, "tokens_per_minute": 100_000}]))
    body = chat_body(stream=False, messages=USER)
    status, _, raw = await send(base, body)
    assert status == 403
    error = orjson.loads(raw)["error"]
    assert error["code"] == "model_not_priced" and "grok-4" in error["message"]
    assert "no price" in error["message"]
    asked = [r for r in mock_upstream.state.requests if r["path"].endswith("/completions")]
    assert asked == []  # refused before the upstream
    assert (await send(base, body, key=OTHER_KEY))[0] == 200


async def test_a_request_that_fails_before_the_upstream_answers_is_refunded_in_full(
        mock_upstream: Upstream, start_gateway: Any, redis_url: str, redis_prefix: str
        ) -> None:
    _, base = await start_gateway(settings_for(
        mock_upstream.url, keys=keys(tokens_per_day=100_000),
        redis=redis_section(redis_url, redis_prefix)))
    for stream in (False, True):
        status, _, _ = await send(base, chat_body(stream=stream, messages=USER, status=500))
        assert status >= 500
    assert (await budget_state(redis_prefix))["day_tok"] == 0


async def test_a_client_that_leaves_is_charged_what_was_relayed(
        mock_upstream: Upstream, start_gateway: Any, redis_url: str, redis_prefix: str
        ) -> None:
    """Neither nothing nor the whole reservation: the prompt and a token per event relayed."""
    _, base = await start_gateway(settings_for(
        mock_upstream.url, keys=keys(tokens_per_day=100_000),
        redis=redis_section(redis_url, redis_prefix)))
    body = chat_body(stream=True, messages=USER, fields={"max_tokens": 5000}, chunks=50,
                     chunk_delay=0.05)
    tokens, _ = reserved(orjson.dumps(body), 5000)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/v1/chat/completions", data=orjson.dumps(body), headers={
                "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}) as r:
            for _ in range(5):
                await r.content.readuntil(b"\n\n")
    for _ in range(100):
        state = await budget_state(redis_prefix)
        if state.get("day_tok", tokens) < tokens:
            break
        await asyncio.sleep(0.05)
    prompt = tokens - 5000
    assert prompt + 5 <= state["day_tok"] <= prompt + 50


# --- what the client sees -------------------------------------------------------------------

async def test_the_usage_chunk_is_hidden_unless_asked_and_the_sdk_sees_the_same_chunks(
        gateway: Any, mock_upstream: Upstream) -> None:
    _, base = gateway
    body = chat_body(stream=True, messages=USER, chunks=4)
    asked = (await post(f"{mock_upstream.url}/chat/completions", asking_usage(body))).body
    *events, usage_chunk, done = blocks(asked)
    assert orjson.loads(usage_chunk[6:])["choices"] == [] and done == b"data: [DONE]\n\n"
    # Not asked: every event byte for byte, but the usage chunk the gateway asked for.
    assert (await post(f"{base}/v1/chat/completions", body)).body == b"".join(events + [done])
    assert mock_upstream.state.requests[-1]["body"]["stream_options"] == {"include_usage": True}
    # Asked: the upstream's stream as it is.
    assert (await post(f"{base}/v1/chat/completions", asking_usage(body))).body == asked

    async def chunks(stream_options: dict[str, Any] | None) -> list[Any]:
        extra = {"stream_options": stream_options} if stream_options else {}
        stream = await async_sdk(base).chat.completions.create(
            model="grok-4", messages=USER, stream=True, extra_body={"mock": {"chunks": 4}},
            **extra)
        return [c.model_dump() async for c in stream]
    plain, with_usage = await chunks(None), await chunks({"include_usage": True})
    assert all(c["usage"] is None for c in plain)
    assert with_usage[:-1] == plain and with_usage[-1]["usage"]["total_tokens"] == 16


@pytest.mark.parametrize("overrun", ["cut", "finish"])
async def test_cut_ends_an_overrunning_stream_with_an_error_frame_and_finish_does_not(
        mock_upstream: Upstream, start_gateway: Any, overrun: str) -> None:
    """An upstream that answers past the request's cap (100 tokens for a cap of 5) overruns
    what the key had left (100 tokens a day)."""
    _, base = await start_gateway(settings_for(
        mock_upstream.url, keys=keys(tokens_per_day=100),
        limits={"on_token_overrun": overrun}))
    body = chat_body(stream=True, messages=USER, fields={"max_tokens": 5}, chunks=100,
                     chunk_delay=0.005)  # checked at each upstream read: one event each
    status, _, raw = await send(base, body)
    assert status == 200
    events = blocks(raw)
    if overrun == "cut":
        error = orjson.loads(events[-1][6:])["error"]
        assert error["code"] == "token_limit_exceeded" and b"[DONE]" not in raw
        assert len(events) < 100
    else:
        assert events[-1] == b"data: [DONE]\n\n" and b'"error"' not in raw
        assert comment(raw)["remaining_tokens_day"] == 0  # in debt: the rest of the day
        assert (await send(base, body))[0] == 429


async def test_a_refusal_tells_the_tokens_left_too(mock_upstream: Upstream,
                                                   start_gateway: Any) -> None:
    _, base = await start_gateway(settings_for(mock_upstream.url,
                                               keys=keys(tokens_per_minute=500)))
    body = chat_body(stream=False, messages=USER, fields={"max_tokens": 400})
    held = asyncio.ensure_future(send(base, {**body, "mock": {"headers_delay": 1.0}}))
    await asyncio.sleep(0.3)  # its reservation taken: about 70 of the minute's 500 are left
    status, headers, raw = await send(base, body)
    assert status == 429 and orjson.loads(raw)["error"]["code"] == "token_limit_exceeded"
    assert headers["x-ratelimit-limit-tokens"] == "500" and int(headers["Retry-After"]) >= 1
    assert int(headers["x-ratelimit-remaining-tokens"]) < 100
    assert headers["RateLimit-Policy"].endswith(', "tokens";q=500;w=60')
    assert (await held)[0] == 200


async def test_what_a_spend_limit_cannot_count_is_refused_before_the_upstream(
        mock_upstream: Upstream, start_gateway: Any) -> None:
    """Image generation (no price) and a background response (answered before it is made,
    without usage) for a key with limits."""
    _, base = await start_gateway(settings_for(
        mock_upstream.url, keys=keys(usd_per_day=5.0), models={"prices": {"grok-4": PRICE}}))
    status, _, raw = await send(base, {"model": "grok-2-image-1212", "prompt": "a cat"},
                                path="images/generations")
    assert status == 403 and orjson.loads(raw)["error"]["code"] == "model_not_priced"
    status, _, raw = await send(base, {"model": "grok-4", "input": "hi", "background": True},
                                path="responses")
    assert status == 400 and orjson.loads(raw)["error"]["param"] == "background"
    assert not [r for r in mock_upstream.state.requests if r["method"] == "POST"]
    status, _, _ = await send(base, {"model": "grok-2-image-1212", "prompt": "a cat"},
                              key=OTHER_KEY, path="images/generations")
    assert status == 200  # a key without limits is not affected


async def test_headers_and_the_closing_comment_tell_the_key_what_it_has_left(
        mock_upstream: Upstream, start_gateway: Any) -> None:
    _, base = await start_gateway(settings_for(
        mock_upstream.url, keys=keys(tokens_per_minute=10_000, usd_per_month=10.0),
        models={"prices": {"grok-4": PRICE}}))
    body = chat_body(stream=True, messages=USER, fields={"max_tokens": 100}, chunks=3)
    tokens, _ = reserved(orjson.dumps(body), 100)
    status, headers, raw = await send(base, body)
    assert status == 200
    assert headers["x-ratelimit-limit-tokens"] == "10000"
    assert headers["x-ratelimit-remaining-tokens"] == str(10_000 - tokens)
    assert headers["x-ratelimit-reset-tokens"].endswith("s")
    assert headers["RateLimit-Policy"].endswith(', "tokens";q=10000;w=60')
    assert '"tokens";r=' in headers["RateLimit"] and '"requests";r=' in headers["RateLimit"]
    *_, line, done = blocks(raw)
    assert done == b"data: [DONE]\n\n" and line.startswith(b": usage {")
    assert set(comment(raw)) == {"prompt_tokens", "completion_tokens", "total_tokens",
                                 "cost_usd", "remaining_tokens_minute", "remaining_usd_month"}
    # The Responses API: usage from response.completed, the comment just after it.
    status, _, raw = await send(base, {"model": "grok-4", "input": "hi", "stream": True,
                                       "max_output_tokens": 50, "mock": {"chunks": 3}},
                                path="responses")
    assert status == 200
    *_, completed, line = blocks(raw)
    assert completed.startswith(b"event: response.completed") and line.startswith(b": usage ")
    assert comment(raw)["total_tokens"] == 15  # input_tokens + output_tokens, not 0


async def test_the_closing_comment_breaks_no_python_client(
        mock_upstream: Upstream, start_gateway: Any) -> None:
    _, base = await start_gateway(settings_for(mock_upstream.url,
                                               keys=keys(tokens_per_minute=100_000)))
    words = "one two three four"
    mock = {"mock": {"text": words}}
    stream = await async_sdk(base).chat.completions.create(
        model="grok-4", messages=USER, stream=True, extra_body=mock)
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) \
        == words

    def sync(client: Any) -> str:
        chunks = client.chat.completions.create(model="grok-4", messages=USER, stream=True,
                                                extra_body=mock)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert await in_thread(base, sync) == words
    # A reader of `data:` lines alone.
    _, _, raw = await send(base, chat_body(stream=True, messages=USER, text=words))
    data = [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]
    assert data[-1] == b"[DONE]" and all(orjson.loads(d) for d in data[:-1])
    assert b": usage " in raw


# --- one semantics, two backends ------------------------------------------------------------

async def test_the_memory_and_redis_limiters_keep_the_same_books(
        redis_url: str, redis_prefix: str) -> None:
    budget = TokenBudget(tokens_per_minute=1000, tokens_per_day=1500, usd_per_day=0.001,
                         usd_per_month=0.002)
    key = ClientKey("alice", 60, 10, 8, budget=budget)
    client = connect(RedisSettings(url=redis_url, key_prefix=redis_prefix))
    settings = RedisSettings(url=redis_url, key_prefix=redis_prefix)
    limiters = [MemoryLimiter(), RedisLimiter(client, settings)]
    try:
        seen = []
        for limiter in limiters:
            steps = []
            for tokens, ticks, settle in ((600, 4_000_000, -500), (600, 4_000_000, 0),
                                          (300, 2_000_000, 900), (200, 9_000_000, 0),
                                          (900, 1_000, -800), (100, 30_000_000, 0)):
                taken = await limiter.reserve(key, tokens, ticks)
                after = None
                if taken.allowed:
                    after = await limiter.settle(key, taken, settle, -ticks // 2)
                steps.append((taken.allowed, taken.refused_by, taken.tpd_left,
                              taken.usd_day_left, taken.usd_month_left,
                              None if after is None else (after.tpd_left, after.usd_day_left)))
            seen.append(steps)
        assert seen[0] == seen[1]
        assert [s[1] for s in seen[0]] == ["", "", "", "tokens_per_minute",
                                           "tokens_per_minute", "usd_too_large"]
    finally:
        for limiter in limiters:
            await limiter.close()
        await client.aclose()


async def test_a_request_that_fails_on_every_upstream_after_one_answered_is_refunded(
        mocks: dict[str, Upstream], start_gateway: Any, redis_url: str, redis_prefix: str
        ) -> None:
    """``a`` answers 200 and then fails before any output (the stream moves), ``b`` answers
    500: the client gets the failure, and the key, whose request no upstream answered in the
    end, pays nothing."""
    mocks["a"].state.forced = {"error_after": 0}
    mocks["b"].state.forced = {"status": 500}
    settings = multi({"a": mocks["a"].url, "b": mocks["b"].url}, a={"weight": 100})
    settings = dataclasses.replace(settings, keys=settings_for(
        mocks["a"].url, keys=keys(tokens_per_day=100_000)).keys, redis=settings_for(
        mocks["a"].url, redis=redis_section(redis_url, redis_prefix)).redis)
    _, base = await start_gateway(settings)
    status, _, raw = await send(base, chat_body(stream=True, messages=USER))
    assert status >= 500 or b'"error"' in raw
    assert (await budget_state(redis_prefix))["day_tok"] == 0


async def test_a_reservation_is_settled_where_it_was_taken_across_a_redis_outage() -> None:
    """Taken in Redis, then Redis gone: its worst case stands (no refund into the fallback's
    books). Taken by the fallback while Redis is gone, settled after it is back: in the
    fallback's books, and Redis' count is not touched."""
    budget = TokenBudget(tokens_per_day=10_000)
    key = ClientKey("alice", 60, 10, 8, budget=budget)
    with redis_server() as server:
        settings = RedisSettings(url=server.url, key_prefix="gwtest-outage", timeout_seconds=0.3)
        client = connect(settings)
        limiter = RedisLimiter(client, settings)
        try:
            in_redis = await limiter.reserve(key, 1000, 0)
            assert in_redis.allowed and not in_redis.local
            server.stop()
            with pytest.raises(ServiceUnavailable):
                await limiter.settle(key, in_redis, -990, 0)
            local = await limiter.reserve(key, 2000, 0)  # fail_open: the fallback's
            assert local.allowed and local.local
            server.start()
            for _ in range(100):  # until the breaker sees Redis again
                if (await limiter.reserve(key, 1, 0)).local is False:
                    break
                await asyncio.sleep(0.05)
            after = await limiter.settle(key, local, -2000, 0)
            assert after.local
        finally:
            await limiter.close()
            await client.aclose()
