"""The Responses API with function tools and structured output, through the gateway and the
real OpenAI SDK: ``function_call`` output items and their argument events, and ``text.format``
answered with JSON that the SDK parses into the caller's type."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai import OpenAI
from pydantic import BaseModel

from clients import async_sdk, in_thread, post, same_but_ids
from conftest import Upstream

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a place",
           "parameters": {"type": "object", "properties": {
               "location": {"type": "string"}, "unit": {"type": "string",
                                                        "enum": ["celsius", "f"]}},
               "required": ["location", "unit"], "additionalProperties": False}}
ARGS = {"location": "Paris, France", "unit": "celsius"}


class Cities(BaseModel):
    cities: list[str]
    count: int


@pytest.mark.parametrize(("style", "deltas"), [("xai", 1), ("openai", 11)])
async def test_sdk_streams_function_calls_as_output_items(gateway: Any, style: str,
                                                          deltas: int) -> None:
    _, base = gateway
    client = async_sdk(base)
    async with client.responses.stream(
            model="grok-4", input="Weather in Paris?", tools=[WEATHER],  # type: ignore[list-item]
            extra_body={"mock": {"tool_calls": 2, "tool_arguments": ARGS,
                                 "style": style}}) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    await client.close()
    kinds = [e.type for e in events]
    # xAI sends each call's arguments whole; OpenAI in fragments.
    assert kinds.count("response.function_call_arguments.delta") == 2 * deltas
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [json.loads(e.arguments) for e in done] == [ARGS, ARGS]  # type: ignore[union-attr]
    calls = [item for item in final.output if item.type == "function_call"]
    assert [(c.name, c.call_id, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", "call_mock_1", ARGS), ("get_weather", "call_mock_2", ARGS)]
    assert [c.id for c in calls] == [e.item_id for e in done]  # type: ignore[union-attr]
    assert final.output_text == ""
    assert final.usage is not None and final.usage.output_tokens > 0


async def test_plain_request_with_tools_returns_function_calls_sync(gateway: Any) -> None:
    _, base = gateway

    def use(client: OpenAI) -> Any:
        return client.responses.create(model="grok-4", input="Weather in Paris?",
                                       tools=[WEATHER])  # type: ignore[list-item]

    response = await in_thread(base, use)
    (call,) = response.output
    assert call.type == "function_call" and call.name == "get_weather"
    # Without mock arguments the upstream makes them from the tool's schema.
    assert json.loads(call.arguments) == {"location": "location", "unit": "celsius"}
    assert response.tools[0].name == "get_weather"


async def test_tool_choice_none_answers_with_text(gateway: Any) -> None:
    _, base = gateway
    raw = await post(f"{base}/api/v1/responses", {
        "model": "grok-4", "input": "hi", "tools": [WEATHER], "tool_choice": "none",
        "mock": {"text": "No tools today"}})
    assert raw.status == 200
    assert [item["type"] for item in raw.json()["output"]] == ["message"]
    assert raw.json()["output"][0]["content"][0]["text"] == "No tools today"


async def test_function_call_events_are_relayed_byte_for_byte(gateway: Any,
                                                              mock_upstream: Upstream) -> None:
    _, base = gateway
    body = {"model": "grok-4", "input": "hi", "tools": [WEATHER], "stream": True}
    direct = await post(f"{mock_upstream.url}/responses", body)
    relayed = await post(f"{base}/api/v1/responses", body)
    assert relayed.status == 200
    assert same_but_ids(relayed.body) == same_but_ids(direct.body)
    assert b"event: response.function_call_arguments.done\n" in relayed.body


async def test_sdk_parse_returns_the_structured_output_sync_and_async(gateway: Any) -> None:
    _, base = gateway

    def use(client: OpenAI) -> Any:
        return client.responses.parse(model="grok-4", input="Three cities",
                                      text_format=Cities)

    parsed = (await in_thread(base, use)).output_parsed
    assert isinstance(parsed, Cities)
    assert parsed.count == 42 and len(parsed.cities) == 3
    client = async_sdk(base)
    async with client.responses.stream(model="grok-4", input="Three cities",
                                       text_format=Cities) as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    await client.close()
    assert len(deltas) > 3  # the JSON streams in pieces
    assert final.output_parsed == parsed
    assert final.text.format.type == "json_schema"  # type: ignore[union-attr]


async def test_a_raw_json_schema_format_gets_json_that_matches_it(gateway: Any) -> None:
    _, base = gateway
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}},
              "required": ["answer"]}
    raw = await post(f"{base}/api/v1/responses", {
        "model": "grok-4", "input": "hi",
        "text": {"format": {"type": "json_schema", "name": "a", "schema": schema}}})
    assert raw.status == 200
    assert json.loads(raw.json()["output"][0]["content"][0]["text"]) == {"answer": 42}
