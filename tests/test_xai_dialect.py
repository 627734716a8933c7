"""What the gateway makes of xAI's own dialect, which the mock upstream speaks by default: a 404
for a model xAI does not serve, xAI's error body (``{"code", "error": "<message>"}``), the
running ``usage`` on every chunk (no ``include_usage``) or in the final chunk only (with it), and
``completion_tokens`` that leave reasoning out, each as an OpenAI-SDK client and the operator
see it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import openai
import orjson
import pytest
from openai import OpenAI

from clients import AUTH, USER, as_relayed, async_sdk, chat_body, in_thread, post, scrape, value
from conftest import Upstream

UNKNOWN = "grok-99"


@pytest.mark.parametrize(("path", "body"), [
    ("chat/completions", chat_body(stream=True, model=UNKNOWN)),
    ("chat/completions", chat_body(stream=False, model=UNKNOWN)),
    ("responses", {"model": UNKNOWN, "input": "hi", "stream": True}),
    ("images/generations", {"model": UNKNOWN, "prompt": "A cat"}),
])
async def test_a_model_the_upstream_does_not_serve_is_a_404_in_the_openai_shape(
        gateway: Any, mock_upstream: Upstream, path: str, body: dict[str, Any]) -> None:
    _, base = gateway
    direct = await post(f"{mock_upstream.url}/{path}", body)
    assert direct.status == 404 and isinstance(direct.json()["error"], str)  # xAI's shape
    raw = await post(f"{base}/api/v1/{path}", body, headers={"Accept": "application/json"})
    assert raw.status == 404
    err = raw.error()  # exactly message, type, param, code
    assert f"The model {UNKNOWN} does not exist" in err["message"]
    # xAI's code is a phrase ("Some requested entity was not found"), not an identifier.
    assert (err["type"], err["code"]) == ("invalid_request_error", "upstream_http_404")


async def test_the_sdk_raises_not_found_for_an_unknown_model_sync_and_async(
        gateway: Any) -> None:
    _, base = gateway

    def use(client: OpenAI) -> None:
        client.chat.completions.create(model=UNKNOWN, messages=USER)  # type: ignore[arg-type]

    with pytest.raises(openai.NotFoundError, match=f"The model {UNKNOWN} does not exist"):
        await in_thread(base, use)
    client = async_sdk(base)
    with pytest.raises(openai.NotFoundError, match=f"The model {UNKNOWN} does not exist"):
        await client.responses.create(model=UNKNOWN, input="hi", stream=True)
    await client.close()


@pytest.mark.parametrize("stream", [True, False])
async def test_xais_error_body_reaches_the_sdk_with_its_message(
        gateway: Any, mock_upstream: Upstream, stream: bool) -> None:
    _, base = gateway
    mock = {"status": 400, "message": "temperature must be at most 2"}
    direct = await post(f"{mock_upstream.url}/chat/completions",
                        chat_body(stream=stream, **mock))
    assert direct.json() == {"code": "Client specified an invalid argument",
                             "error": "temperature must be at most 2"}
    client = async_sdk(base)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="grok-4", messages=USER,  # type: ignore
                                             stream=stream, extra_body={"mock": mock})
    await client.close()
    assert caught.value.status_code == 400
    assert caught.value.body == {"message": "temperature must be at most 2",
                                 "type": "invalid_request_error", "param": None,
                                 "code": "upstream_http_400"}
    assert str(caught.value).endswith("temperature must be at most 2")


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]


async def _access_line(caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    for _ in range(100):  # the access line is written as the response ends
        if _access_lines(caplog):
            break
        await asyncio.sleep(0.02)
    (line,) = _access_lines(caplog)
    return line


async def _tokens(base: str, model: str) -> dict[str, float]:
    samples = await scrape(base)
    return {kind: value(samples, "gateway_tokens_total", key="alice", model=model, type=kind)
            for kind in ("prompt", "completion", "reasoning")}


@pytest.mark.parametrize("split", [None, 9])  # whole events, and events cut mid-way
async def test_a_client_that_did_not_ask_for_usage_sees_none_and_it_is_counted_once(
        gateway: Any, mock_upstream: Upstream, caplog: pytest.LogCaptureFixture,
        split: int | None) -> None:
    """Without ``stream_options.include_usage``, xAI would put the running usage on every chunk
    (its streaming guide's example). The gateway asks for it on every stream, so the usage
    comes once, in a last chunk, which it counts and the client, who did not ask, does not
    see."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    _, base = gateway
    mock: dict[str, Any] = {"chunks": 5} if split is None else {"chunks": 5, "split": split}
    body = chat_body(stream=True, messages=USER, **mock)
    assert "stream_options" not in body
    raw = await post(f"{base}/api/v1/chat/completions", body, headers=AUTH)
    assert raw.status == 200 and b'"usage"' not in raw.body
    line = await _access_line(caplog)
    assert line["usage"] == {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
                             "cost_in_usd_ticks": 12 * 2_000 + 5 * 5_000}
    assert await _tokens(base, "grok-4") == {"prompt": 12, "completion": 5, "reasoning": 0}


async def test_with_include_usage_xai_sends_the_usage_in_the_final_chunk_only(
        gateway: Any, mock_upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    """As the streams recorded from xAI with ``include_usage`` (vercel/ai's xai fixtures): no
    usage and no ``finish_reason`` key on the content chunks, the finish reason alone on the
    next, the usage in a last chunk with no choices."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    _, base = gateway
    body = chat_body(stream=True, messages=USER, fields={
        "stream_options": {"include_usage": True}}, chunks=3)
    direct = await post(f"{mock_upstream.url}/chat/completions", body)
    *content, finish, last, done = direct.data()
    assert done == "[DONE]" and len(content) == 3
    assert all("usage" not in c and c["choices"][0].keys() == {"index", "delta"}
               for c in content)
    assert "usage" not in finish and finish["choices"] == [
        {"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert last["choices"] == [] and last["usage"] == {
        "prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15,
        "cost_in_usd_ticks": 12 * 2_000 + 3 * 5_000}  # xAI's charge: 10^-10 USD
    raw = await post(f"{base}/api/v1/chat/completions", body, headers=AUTH)
    assert raw.status == 200 and raw.body == direct.body
    assert (await _access_line(caplog))["usage"] == last["usage"]
    assert await _tokens(base, "grok-4") == {"prompt": 12, "completion": 3, "reasoning": 0}


@pytest.mark.parametrize("include_usage", [True, False])
async def test_grok_3_mini_reasoning_tokens_count_as_completion_and_as_reasoning(
        gateway: Any, mock_upstream: Upstream, caplog: pytest.LogCaptureFixture,
        include_usage: bool) -> None:
    """xAI's ``completion_tokens`` leave reasoning out (prompt + completion + reasoning =
    total, as every grok-3-mini stream recorded in vercel/ai's xai fixtures adds up); the
    gateway's ``completion`` tokens are every output token, reasoning included, as for an
    upstream that counts it in (OpenAI's dialect, xAI's Responses API). The access log keeps
    the upstream's own numbers."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    _, base = gateway
    fields = {"stream_options": {"include_usage": True}} if include_usage else None
    body = chat_body(stream=True, messages=USER, model="grok-3-mini", fields=fields,
                     reasoning="one two three four", chunks=5)
    direct = await post(f"{mock_upstream.url}/chat/completions", body)
    usage = [d for d in direct.data() if d != "[DONE]"][-1]["usage"]
    assert usage == {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 21,
                     "completion_tokens_details": {"reasoning_tokens": 4},
                     "cost_in_usd_ticks": 12 * 2_000 + 9 * 5_000}
    raw = await post(f"{base}/api/v1/chat/completions", body, headers=AUTH)
    assert raw.status == 200
    assert raw.body == (direct.body if include_usage else
                        await as_relayed(mock_upstream.url, body))
    assert (await _access_line(caplog))["usage"] == usage
    assert await _tokens(base, "grok-3-mini") == {"prompt": 12, "completion": 9,
                                                  "reasoning": 4}


async def test_the_openai_dialect_counts_reasoning_within_completion_tokens(
        gateway: Any) -> None:
    _, base = gateway
    body = chat_body(stream=True, messages=USER, model="grok-3-mini", fields={
        "stream_options": {"include_usage": True}}, style="openai",
        reasoning="one two three four", chunks=5)
    raw = await post(f"{base}/api/v1/chat/completions", body, headers=AUTH)
    assert raw.data()[-2]["usage"] == {"prompt_tokens": 12, "completion_tokens": 9,
                                       "total_tokens": 21,
                                       "completion_tokens_details": {"reasoning_tokens": 4}}
    assert await _tokens(base, "grok-3-mini") == {"prompt": 12, "completion": 9,
                                                  "reasoning": 4}


@pytest.mark.parametrize("path", ["chat/completions", "responses", "images/generations"])
async def test_the_mock_answers_400_to_a_style_it_does_not_speak(
        mock_upstream: Upstream, path: str) -> None:
    body = {"model": "grok-4", "messages": USER, "input": "hi", "prompt": "A cat",
            "mock": {"style": "OpenAI"}}
    direct = await post(f"{mock_upstream.url}/{path}", body)
    assert direct.status == 400
    assert direct.json() == {"code": "Client specified an invalid argument",
                             "error": "mock style must be one of xai, openai, not 'OpenAI'"}


@pytest.mark.parametrize(("model", "reasons"), [("grok-3-mini", True), ("grok-4", False),
                                                ("grok-4-1-fast-non-reasoning", False)])
async def test_only_grok_3_mini_streams_reasoning_content(gateway: Any, model: str,
                                                         reasons: bool) -> None:
    """xAI: "In Chat Completions, only grok-3-mini returns reasoning_content"."""
    _, base = gateway
    raw = await post(f"{base}/api/v1/chat/completions",
                     chat_body(stream=True, messages=USER, model=model))
    deltas = [d["choices"][0]["delta"] for d in raw.data() if d != "[DONE]" and d["choices"]]
    assert any("reasoning_content" in d for d in deltas) is reasons
    assert "".join(d.get("content") or "" for d in deltas).startswith("Ah, the meaning")
