"""Chat completions with everything the upstream streams: tool calls, structured outputs,
reasoning content (with long silences), the usage chunk; through the real OpenAI SDK."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai import OpenAI
from pydantic import BaseModel

from clients import USER, as_relayed, async_sdk, chat_body, in_thread, post
from conftest import Upstream, settings_for

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a place",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "f"]}},
        "required": ["location"]}}}
ARGS = {"location": "Paris, France", "unit": "celsius"}
CITIES_SCHEMA = {"type": "object", "properties": {
    "cities": {"type": "array", "items": {"type": "string"}},
    "count": {"type": "integer"}}, "required": ["cities", "count"],
    "additionalProperties": False}


class Cities(BaseModel):
    cities: list[str]
    count: int


# --- tool calls ---------------------------------------------------------------------------------

async def test_a_tool_call_sent_whole_as_xai_does_is_relayed_byte_for_byte(
        gateway: Any, mock_upstream: Upstream) -> None:
    _, base = gateway
    body = chat_body(stream=True, messages=USER, fields={"tools": [WEATHER_TOOL]},
                     tool_arguments=ARGS)
    relayed = await post(f"{base}/api/v1/chat/completions", body)
    assert relayed.status == 200
    assert relayed.body == await as_relayed(mock_upstream.url, body)
    chunks = [d for d in relayed.data() if d != "[DONE]"]
    calls = [c["choices"][0]["delta"]["tool_calls"] for c in chunks
             if c["choices"][0]["delta"].get("tool_calls")]
    assert len(calls) == 1  # one delta: index, id, type, name and all the arguments
    (call,) = calls[0]
    assert call["index"] == 0 and call["id"] == "call_mock_1" and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == ARGS
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_tool_call_deltas_are_relayed_incrementally_byte_for_byte(
        gateway: Any, mock_upstream: Upstream) -> None:
    _, base = gateway
    body = chat_body(stream=True, messages=USER, fields={"tools": [WEATHER_TOOL]},
                     tool_arguments=ARGS, style="openai")
    direct = await post(f"{mock_upstream.url}/chat/completions", body)
    relayed = await post(f"{base}/api/v1/chat/completions", body)
    assert relayed.status == 200
    assert relayed.body == direct.body
    chunks = [d for d in relayed.data() if d != "[DONE]"]
    fragments = [c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                 for c in chunks if c["choices"][0]["delta"].get("tool_calls")]
    assert len(fragments) > 5  # streamed in pieces, as the upstream sent them
    assert fragments[1:4] == ['{"', "location", '": "']
    assert json.loads("".join(fragments)) == ARGS
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(("style", "deltas"), [("xai", 2), ("openai", 24)])
async def test_sdk_accumulates_parallel_tool_calls_async(gateway: Any, style: str,
                                                         deltas: int) -> None:
    _, base = gateway
    client = async_sdk(base)
    async with client.chat.completions.stream(
            model="grok-4", messages=USER, tools=[WEATHER_TOOL],  # type: ignore[list-item]
            extra_body={"mock": {"tool_calls": 2, "tool_arguments": ARGS,
                                 "style": style}}) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_completion()
    await client.close()
    # xAI: each call whole, one delta each; OpenAI: the arguments in fragments.
    assert kinds.count("tool_calls.function.arguments.delta") == deltas
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [c.id for c in calls] == ["call_mock_1", "call_mock_2"]
    assert all(c.function.name == "get_weather" for c in calls)
    assert [json.loads(c.function.arguments) for c in calls] == [ARGS, ARGS]


async def test_sdk_tool_call_arguments_sync(gateway: Any) -> None:
    _, base = gateway

    def use(client: OpenAI) -> tuple[str, str]:
        name, arguments = "", ""
        stream = client.chat.completions.create(
            model="grok-4", messages=USER, tools=[WEATHER_TOOL],  # type: ignore[list-item]
            stream=True)
        for chunk in stream:
            for call in chunk.choices[0].delta.tool_calls or []:
                assert call.index == 0
                name += call.function.name or "" if call.function else ""
                arguments += call.function.arguments or "" if call.function else ""
        return name, arguments

    name, arguments = await in_thread(base, use)
    assert name == "get_weather"
    # Without mock arguments the upstream makes them from the tool's schema.
    assert json.loads(arguments) == {"location": "location", "unit": "celsius"}


# --- structured outputs ------------------------------------------------------------------------

async def test_structured_output_streams_json_matching_the_schema_async(gateway: Any) -> None:
    _, base = gateway
    client = async_sdk(base)
    async with client.chat.completions.stream(model="grok-4", messages=USER,
                                              response_format=Cities) as stream:
        deltas = [e.delta async for e in stream if e.type == "content.delta"]
        final = await stream.get_final_completion()
    await client.close()
    assert len(deltas) > 3
    parsed = final.choices[0].message.parsed
    assert isinstance(parsed, Cities)
    assert parsed.count == 42 and len(parsed.cities) == 3


async def test_structured_output_with_a_raw_json_schema_sync(gateway: Any,
                                                             mock_upstream: Upstream) -> None:
    _, base = gateway
    response_format = {"type": "json_schema",
                       "json_schema": {"name": "cities", "strict": True, "schema": CITIES_SCHEMA}}

    def use(client: OpenAI) -> str:
        stream = client.chat.completions.create(
            model="grok-4", messages=USER, stream=True,
            response_format=response_format)  # type: ignore[arg-type]
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    value = json.loads(await in_thread(base, use))
    assert set(value) == {"cities", "count"}
    assert isinstance(value["count"], int)
    assert all(isinstance(c, str) for c in value["cities"])
    assert mock_upstream.state.requests[-1]["body"]["response_format"] == response_format


# --- reasoning ---------------------------------------------------------------------------------

async def test_reasoning_content_is_relayed_and_a_long_silence_kept_alive(
        mock_upstream: Upstream, start_gateway: Any) -> None:
    _, base = await start_gateway(settings_for(mock_upstream.url,
                                               stream={"keepalive_seconds": 0.1}))
    body = {"model": "grok-3-mini", "messages": USER, "stream": True,
            "mock": {"reasoning_silence": 0.45}}
    raw = await post(f"{base}/api/v1/chat/completions", body)
    # Between the last reasoning delta and the first content delta the upstream was silent
    # for 0.45 s; the gateway kept the connection alive with comments (one per 0.1 s).
    last_reasoning = raw.body.rindex(b'"reasoning_content"')
    first_content = raw.body.index(b'"delta":{"content"')
    assert last_reasoning < first_content
    assert raw.body[last_reasoning:first_content].count(b": keep-alive\n") >= 3
    data = [d for d in raw.data() if d != "[DONE]"]
    assert "".join(d["choices"][0]["delta"].get("reasoning_content", "") for d in data
                   if d["choices"]).startswith("The user asks a question.")

    client = async_sdk(base)
    stream = await client.chat.completions.create(
        model="grok-3-mini", messages=USER, stream=True,  # type: ignore[arg-type]
        extra_body={"mock": {"reasoning": "Hmm, forty-two.", "reasoning_silence": 0.25}})
    reasoning, content = "", ""
    async for chunk in stream:
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
    await client.close()
    assert reasoning == "Hmm, forty-two."
    assert content.startswith("Ah, the meaning of life")


async def test_reasoning_content_in_a_plain_answer_sync(gateway: Any) -> None:
    _, base = gateway

    def use(client: OpenAI) -> Any:
        return client.chat.completions.create(model="grok-3-mini", messages=USER)  # type: ignore

    completion = await in_thread(base, use)
    message = completion.choices[0].message
    assert getattr(message, "reasoning_content", "").startswith("The user asks")
    assert completion.usage.completion_tokens_details.reasoning_tokens > 0


# --- usage -------------------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["xai", "openai"])
@pytest.mark.parametrize("model", ["grok-4", "grok-3-mini"])
async def test_usage_chunk_reaches_the_sdk_sync_and_async(gateway: Any, model: str,
                                                           style: str) -> None:
    _, base = gateway
    mock = {"mock": {"style": style}}

    def use(client: OpenAI) -> list[Any]:
        return list(client.chat.completions.create(
            model=model, messages=USER, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True}, extra_body=mock))

    chunks = await in_thread(base, use)
    client = async_sdk(base)
    stream = await client.chat.completions.create(
        model=model, messages=USER, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}, extra_body=mock)
    async_chunks = [c async for c in stream]
    await client.close()
    for got in (chunks, async_chunks):
        last = got[-1]
        assert last.choices == []
        assert last.usage is not None
        # Asked for, the usage is in the last chunk only, in both dialects (xAI's running usage
        # on every chunk comes only when include_usage is not asked for: test_xai_dialect.py).
        assert all(c.usage is None for c in got[:-1])
        details = last.usage.completion_tokens_details
        reasoning = details.reasoning_tokens if details is not None else None
        assert (reasoning is not None) is (model == "grok-3-mini")
        if style == "xai" and reasoning:  # xAI leaves reasoning out of completion_tokens
            assert last.usage.total_tokens == \
                last.usage.prompt_tokens + last.usage.completion_tokens + reasoning
        else:
            assert last.usage.total_tokens == \
                last.usage.prompt_tokens + last.usage.completion_tokens


async def test_no_usage_chunk_unless_asked(gateway: Any) -> None:
    _, base = gateway
    raw = await post(f"{base}/api/v1/chat/completions",
                     chat_body(stream=True, messages=USER, style="openai"))
    assert not any("usage" in d for d in raw.data() if d != "[DONE]")
    raw = await post(f"{base}/api/v1/chat/completions", chat_body(stream=True, messages=USER))
    chunks = [d for d in raw.data() if d != "[DONE]"]
    assert all(c["choices"] for c in chunks)  # xAI: usage on each chunk, but no usage chunk
