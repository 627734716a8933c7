"""LangChain's ``ChatOpenAI`` (``langchain-openai``) against the gateway, as its users call it:
invoke, stream, tool calls (``bind_tools``), structured output (``with_structured_output``),
errors before the stream (401, 429) and one during it.

``ChatOpenAI`` runs on the OpenAI SDK, so its errors are the SDK's exception classes; what is
asserted is what a LangChain user reads: the message, the text, the parsed call or object.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import openai
import pytest
from langchain_core.messages import AIMessageChunk
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from gateway.mock.upstream import DEFAULT_TEXT

from conftest import KEY, Upstream, settings_for

PROMPT = "What is the meaning of life?"
WEATHER_ARGS = {"location": "Paris, France", "unit": "celsius"}


class Cities(BaseModel):
    """Cities and how many there are."""
    cities: list[str]
    count: int


def get_weather(location: str, unit: str) -> str:
    """Current weather for a place."""
    raise AssertionError("only the model's call is checked; the tool never runs")


def chat(base: str, key: str = KEY, **mock: Any) -> ChatOpenAI:
    """A ChatOpenAI on the gateway; the mock upstream's options go in the body (extra_body)."""
    return ChatOpenAI(model="grok-4", base_url=f"{base}/api/v1", api_key=key,  # type: ignore[arg-type]
                      max_retries=0, extra_body={"mock": mock} if mock else None)


async def test_invoke_and_stream_get_the_whole_answer_in_order(gateway: Any) -> None:
    _, base = gateway
    llm = chat(base)
    answer = await llm.ainvoke(PROMPT)
    assert answer.content == DEFAULT_TEXT
    pieces = [chunk.content async for chunk in llm.astream(PROMPT)]
    assert len([p for p in pieces if p]) > 3  # streamed in pieces, not one block at the end
    assert "".join(str(p) for p in pieces) == DEFAULT_TEXT
    # The sync API too, in a thread: the gateway serves from this test's event loop.
    chunks = await asyncio.to_thread(lambda: list(llm.stream(PROMPT)))
    assert "".join(str(c.content) for c in chunks) == DEFAULT_TEXT


async def test_bind_tools_gives_the_call_with_parsed_arguments_plain_and_streamed(
        gateway: Any) -> None:
    _, base = gateway
    llm = chat(base, tool_arguments=WEATHER_ARGS).bind_tools([get_weather])
    message = await llm.ainvoke(PROMPT)
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", WEATHER_ARGS)]
    gathered: AIMessageChunk | None = None
    async for chunk in llm.astream(PROMPT):
        gathered = chunk if gathered is None else gathered + chunk  # type: ignore[assignment]
    assert gathered is not None
    assert [(c["name"], c["args"]) for c in gathered.tool_calls] == [
        ("get_weather", WEATHER_ARGS)]


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
async def test_with_structured_output_gives_the_object(
        gateway: Any, method: Literal["json_schema", "function_calling"]) -> None:
    _, base = gateway
    value: dict[str, Any] = {"cities": ["Paris", "Lyon", "Nice"], "count": 3}
    # json_schema sends response_format; function_calling forces a tool call whose arguments
    # are the object.
    mock: dict[str, Any] = {"json": value} if method == "json_schema" else {"tool_arguments": value}
    llm = chat(base, **mock).with_structured_output(Cities, method=method)
    assert await llm.ainvoke(PROMPT) == Cities(**value)


async def test_a_bad_key_shows_the_gateways_message_before_the_stream(gateway: Any) -> None:
    _, base = gateway
    llm = chat(base, key="sk-not-a-key-of-this-gateway")
    with pytest.raises(openai.AuthenticationError, match="Invalid authentication token"):
        async for _ in llm.astream(PROMPT):
            pass
    with pytest.raises(openai.AuthenticationError, match="Invalid authentication token"):
        await llm.ainvoke(PROMPT)


async def test_a_spent_rate_limit_shows_the_gateways_429_message(
        mock_upstream: Upstream, start_gateway: Any) -> None:
    _, base = await start_gateway(settings_for(mock_upstream.url, keys=[
        {"name": "alice", "key": KEY, "burst": 1, "requests_per_minute": 1}]))
    llm = chat(base)
    assert await llm.ainvoke(PROMPT)  # the only token
    with pytest.raises(openai.RateLimitError,
                       match="Rate limit reached: this key may send 1 request in a row"):
        async for _ in llm.astream(PROMPT):
            pass


async def test_a_mid_stream_failure_raises_after_the_text_before_it(gateway: Any) -> None:
    _, base = gateway
    llm = chat(base, error_after=3)
    received: list[str] = []
    with pytest.raises(openai.APIError, match="mock mid-stream failure"):
        async for chunk in llm.astream(PROMPT):
            received.append(str(chunk.content))
    assert "".join(received) == "Ah, the meaning "  # the three chunks before the failure
