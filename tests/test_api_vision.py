"""Vision: chat image parts, vision/analyze and Responses input images; with ``stream: true``
the upstream is called without streaming and the answer says ``X-Stream-Fallback: true``, in
the form ``[vision] stream_fallback`` names (sse, json, off)."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from openai import OpenAI

from clients import (
    IMAGE_URL,
    as_relayed,
    async_sdk,
    data_url,
    image_message,
    in_thread,
    post,
)
from conftest import Upstream, settings_for

VISION_MODEL = "grok-2-vision-1212"
SEEN = "I see 1 image: a small mock picture."
RESPONSES_INPUT = [{"role": "user", "content": [
    {"type": "input_text", "text": "What is in this picture?"},
    {"type": "input_image", "image_url": IMAGE_URL, "detail": "high"}]}]


def vision_chat(stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": VISION_MODEL, "messages": image_message(), "stream": stream, **extra}


async def fallback_gateway(upstream: Upstream, start_gateway: Any, mode: str) -> str:
    _, base = await start_gateway(settings_for(upstream.url, vision={"stream_fallback": mode}))
    return base  # type: ignore[no-any-return]


def last_upstream_body(upstream: Upstream) -> dict[str, Any]:
    return upstream.state.requests[-1]["body"]  # type: ignore[no-any-return]


# --- chat completions with image parts ---------------------------------------------------------

async def test_plain_vision_chat_reaches_the_upstream_with_its_image(
        gateway: Any, mock_upstream: Upstream) -> None:
    _, base = gateway

    def use(client: OpenAI) -> Any:
        return client.chat.completions.create(model=VISION_MODEL,
                                              messages=image_message())  # type: ignore[arg-type]

    completion = await in_thread(base, use)
    assert completion.choices[0].message.content == SEEN
    sent = last_upstream_body(mock_upstream)
    assert sent["messages"][0]["content"][1] == {"type": "image_url",
                                                 "image_url": {"url": IMAGE_URL}}


async def test_sse_fallback_is_one_whole_chunk_then_done(gateway: Any,
                                                         mock_upstream: Upstream) -> None:
    _, base = gateway
    raw = await post(f"{base}/api/v1/chat/completions",
                     vision_chat(stream_options={"include_usage": True}))
    assert raw.status == 200
    assert raw.headers["X-Stream-Fallback"] == "true"
    assert raw.headers["Content-Type"] == "text/event-stream"
    assert raw.headers["Cache-Control"] == "no-cache"
    events = raw.events()
    assert len(events) == 2 and events[1] == b"data: [DONE]\n\n"
    chunk = raw.data()[0]
    assert chunk["object"] == "chat.completion.chunk"
    assert chunk["model"] == VISION_MODEL
    choice = chunk["choices"][0]
    assert choice["delta"] == {"role": "assistant", "content": SEEN}
    assert choice["finish_reason"] == "stop"
    assert chunk["usage"]["total_tokens"] > 0
    # The upstream was asked without streaming (and without the stream-only options).
    sent = last_upstream_body(mock_upstream)
    assert "stream" not in sent and "stream_options" not in sent


async def test_sdk_stream_loops_get_the_whole_text_sync_and_async(gateway: Any) -> None:
    _, base = gateway

    def use(client: OpenAI) -> list[Any]:
        return list(client.chat.completions.create(
            model=VISION_MODEL, messages=image_message(), stream=True))  # type: ignore

    for chunks in (await in_thread(base, use), None):
        if chunks is None:
            client = async_sdk(base)
            stream = await client.chat.completions.create(
                model=VISION_MODEL, messages=image_message(), stream=True)  # type: ignore
            chunks = [c async for c in stream]
            await client.close()
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == SEEN
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert chunks[-1].usage is not None


async def test_sse_fallback_keeps_tool_calls_for_the_sdk_helper(gateway: Any) -> None:
    _, base = gateway
    tool = {"type": "function", "function": {"name": "describe", "parameters": {
        "type": "object", "properties": {"subject": {"type": "string"}}}}}
    client = async_sdk(base)
    async with client.chat.completions.stream(
            model=VISION_MODEL, messages=image_message(), tools=[tool],  # type: ignore
            extra_body={"mock": {"tool_arguments": {"subject": "a cat"}}}) as stream:
        final = await stream.get_final_completion()
    await client.close()
    call = (final.choices[0].message.tool_calls or [])[0]
    assert call.function.name == "describe"
    assert call.function.arguments == '{"subject": "a cat"}'
    assert final.choices[0].finish_reason == "tool_calls"


async def test_fallback_keeps_the_upstreams_refusal_and_status(gateway: Any) -> None:
    _, base = gateway
    client = async_sdk(base)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(
            model=VISION_MODEL, messages=image_message(), stream=True,  # type: ignore
            extra_body={"mock": {"status": 429}})
    await client.close()
    raw = await post(f"{base}/api/v1/chat/completions", vision_chat(mock={"status": 503}))
    assert raw.status == 503
    assert "X-Stream-Fallback" not in raw.headers
    assert raw.error()["type"] == "upstream_error"  # JSON: no Accept names the event stream


async def test_json_fallback_is_the_plain_completion(mock_upstream: Upstream,
                                                     start_gateway: Any) -> None:
    base = await fallback_gateway(mock_upstream, start_gateway, "json")
    raw = await post(f"{base}/api/v1/chat/completions", vision_chat())
    assert raw.status == 200
    assert raw.headers["X-Stream-Fallback"] == "true"
    assert raw.headers["Content-Type"].startswith("application/json")
    body = raw.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == SEEN


async def test_off_relays_the_vision_stream_like_any_other(mock_upstream: Upstream,
                                                           start_gateway: Any) -> None:
    base = await fallback_gateway(mock_upstream, start_gateway, "off")
    raw = await post(f"{base}/api/v1/chat/completions", vision_chat())
    assert "X-Stream-Fallback" not in raw.headers
    assert raw.body == await as_relayed(mock_upstream.url, vision_chat())
    assert len(raw.events()) > 3
    assert last_upstream_body(mock_upstream)["stream"] is True


async def test_text_only_streams_are_never_a_fallback(gateway: Any) -> None:
    _, base = gateway
    raw = await post(f"{base}/api/v1/chat/completions",
                     {"model": VISION_MODEL, "messages": [{"role": "user", "content": "hi"}],
                      "stream": True})
    assert "X-Stream-Fallback" not in raw.headers
    assert len(raw.events()) > 3


async def test_data_url_images_within_the_limit_pass(mock_upstream: Upstream,
                                                     start_gateway: Any) -> None:
    _, base = await start_gateway(settings_for(mock_upstream.url,
                                               vision={"max_image_bytes": 3000}))
    url = data_url(3000, "image/jpeg")
    raw = await post(f"{base}/api/v1/chat/completions",
                     {"model": "grok-4", "messages": image_message(url, detail="low")})
    assert raw.status == 200
    assert last_upstream_body(mock_upstream)["messages"][0]["content"][1]["image_url"] == {
        "url": url, "detail": "low"}


# --- vision/analyze ------------------------------------------------------------------------------

async def test_analyze_becomes_a_chat_completion_with_an_image_part(
        gateway: Any, mock_upstream: Upstream) -> None:
    _, base = gateway
    image = data_url(100)
    raw = await post(f"{base}/api/v1/vision/analyze",
                     {"model": VISION_MODEL, "image": image, "prompt": "Describe it",
                      "detail": "high", "max_tokens": 50})
    assert raw.status == 200
    assert raw.json()["choices"][0]["message"]["content"] == SEEN
    assert "X-Stream-Fallback" not in raw.headers
    seen = mock_upstream.state.requests[-1]
    assert seen["path"] == "/v1/chat/completions"
    assert seen["body"] == {"model": VISION_MODEL, "max_tokens": 50, "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "Describe it"},
            {"type": "image_url", "image_url": {"url": image, "detail": "high"}}]}]}


async def test_analyze_with_stream_falls_back(gateway: Any, mock_upstream: Upstream) -> None:
    _, base = gateway
    raw = await post(f"{base}/v1/vision/analyze", {"model": "grok-4", "image": IMAGE_URL,
                                                   "prompt": "What is it?", "stream": True})
    assert raw.headers["X-Stream-Fallback"] == "true"
    data = raw.data()
    assert data[-1] == "[DONE]" and len(data) == 2
    assert data[0]["choices"][0]["delta"]["content"] == SEEN
    assert "stream" not in last_upstream_body(mock_upstream)


async def test_analyze_json_and_off_modes(mock_upstream: Upstream, start_gateway: Any) -> None:
    body = {"model": "grok-4", "image": IMAGE_URL, "prompt": "What is it?", "stream": True}
    base = await fallback_gateway(mock_upstream, start_gateway, "json")
    raw = await post(f"{base}/api/v1/vision/analyze", body)
    assert raw.headers["X-Stream-Fallback"] == "true"
    assert raw.json()["object"] == "chat.completion"
    base = await fallback_gateway(mock_upstream, start_gateway, "off")
    raw = await post(f"{base}/api/v1/vision/analyze", body)
    assert "X-Stream-Fallback" not in raw.headers
    assert raw.data()[-1] == "[DONE]" and len(raw.data()) > 3


# --- the Responses API with input images ---------------------------------------------------------

async def test_responses_image_stream_falls_back_to_a_minimal_event_sequence(
        gateway: Any, mock_upstream: Upstream) -> None:
    _, base = gateway
    client = async_sdk(base)
    stream = await client.responses.create(model="grok-4", input=RESPONSES_INPUT,  # type: ignore
                                           stream=True)
    events = [e async for e in stream]
    await client.close()
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(9))
    assert events[4].delta == SEEN  # type: ignore[union-attr]
    assert events[0].response.status == "in_progress"  # type: ignore[union-attr]
    assert events[-1].response.output_text == SEEN  # type: ignore[union-attr]
    assert "stream" not in last_upstream_body(mock_upstream)


async def test_responses_image_fallback_with_the_sdk_helper_sync(gateway: Any) -> None:
    _, base = gateway

    def use(client: OpenAI) -> tuple[str, str]:
        with client.responses.stream(model="grok-4", input=RESPONSES_INPUT) as s:  # type: ignore
            text = "".join(e.delta for e in s if e.type == "response.output_text.delta")
            return text, s.get_final_response().output_text

    assert await in_thread(base, use) == (SEEN, SEEN)


async def test_responses_image_fallback_json_and_plain(mock_upstream: Upstream,
                                                       start_gateway: Any) -> None:
    base = await fallback_gateway(mock_upstream, start_gateway, "json")
    body = {"model": "grok-4", "input": RESPONSES_INPUT, "stream": True}
    raw = await post(f"{base}/api/v1/responses", body)
    assert raw.headers["X-Stream-Fallback"] == "true"
    assert raw.json()["object"] == "response"
    raw = await post(f"{base}/api/v1/responses", {**body, "stream": False})
    assert "X-Stream-Fallback" not in raw.headers
    assert raw.json()["output"][0]["content"][0]["text"] == SEEN
