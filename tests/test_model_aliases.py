"""Model aliases: ``model`` rewritten on the way up, and back in every answer; streams without
an alias stay byte for byte."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from openai import OpenAI

from clients import USER, async_sdk, image_message, in_thread, post, same_but_ids
from conftest import KEY, OTHER_KEY, Upstream, settings_for

ALIASES = {"house-model": "grok-4", "house-mini": "grok-3-mini",
           "house-eyes": "grok-2-vision-1212", "house-painter": "grok-2-image-1212"}


@pytest.fixture
async def aliased(mock_upstream: Upstream, start_gateway: Any) -> str:
    _, base = await start_gateway(settings_for(
        mock_upstream.url, models={"aliases": ALIASES},
        keys=[{"name": "alice", "key": KEY},
              {"name": "bob", "key": OTHER_KEY, "models": ["house-model"]}]))
    return base  # type: ignore[no-any-return]


def upstream_model(upstream: Upstream) -> str:
    return upstream.state.requests[-1]["body"]["model"]  # type: ignore[no-any-return]


async def test_chat_stream_every_chunk_carries_the_alias(aliased: str,
                                                         mock_upstream: Upstream) -> None:
    body = {"model": "house-model", "messages": USER, "stream": True,
            "stream_options": {"include_usage": True}}
    raw = await post(f"{aliased}/api/v1/chat/completions", body)
    assert upstream_model(mock_upstream) == "grok-4"
    chunks = [d for d in raw.data() if d != "[DONE]"]
    assert len(chunks) > 5 and all(c["model"] == "house-model" for c in chunks)
    assert raw.body.endswith(b"data: [DONE]\n\n")
    assert b"grok-4" not in raw.body
    # Only the model changed: the same stream as the upstream's otherwise.
    direct = await post(f"{mock_upstream.url}/chat/completions", {**body, "model": "grok-4"})
    upstream_chunks = [d for d in direct.data() if d != "[DONE]"]
    assert [{**c, "model": "grok-4"} for c in chunks] == upstream_chunks


async def test_sdk_sees_the_alias_sync_and_async(aliased: str, mock_upstream: Upstream) -> None:
    def use(client: OpenAI) -> tuple[Any, list[Any]]:
        plain = client.chat.completions.create(model="house-mini", messages=USER)  # type: ignore
        chunks = list(client.chat.completions.create(
            model="house-mini", messages=USER, stream=True))  # type: ignore[arg-type]
        return plain, chunks

    plain, chunks = await in_thread(aliased, use)
    assert plain.model == "house-mini"
    assert getattr(plain.choices[0].message, "reasoning_content", "")  # grok-3-mini answered
    assert {c.model for c in chunks} == {"house-mini"}
    assert upstream_model(mock_upstream) == "grok-3-mini"

    client = async_sdk(aliased)
    stream = await client.responses.create(model="house-model", input="hi", stream=True)
    events = [e async for e in stream]
    plain_response = await client.responses.create(model="house-model", input="hi")
    await client.close()
    assert events[0].response.model == "house-model"  # type: ignore[union-attr]
    assert events[-1].response.model == "house-model"  # type: ignore[union-attr]
    assert plain_response.model == "house-model"
    assert upstream_model(mock_upstream) == "grok-4"


async def test_unaliased_stream_is_untouched(aliased: str, mock_upstream: Upstream) -> None:
    body = {"model": "grok-4", "input": "hi", "stream": True}
    direct = await post(f"{mock_upstream.url}/responses", body)
    relayed = await post(f"{aliased}/api/v1/responses", body)
    assert same_but_ids(relayed.body) == same_but_ids(direct.body)


async def test_allow_list_names_the_alias(aliased: str) -> None:
    client = async_sdk(aliased, OTHER_KEY)
    completion = await client.chat.completions.create(
        model="house-model", messages=USER)  # type: ignore[arg-type]
    assert completion.model == "house-model"
    with pytest.raises(openai.PermissionDeniedError):
        await client.chat.completions.create(model="grok-4", messages=USER)  # type: ignore
    await client.close()


async def test_vision_capability_follows_the_aliased_model(aliased: str,
                                                           mock_upstream: Upstream) -> None:
    raw = await post(f"{aliased}/api/v1/chat/completions",
                     {"model": "house-eyes", "messages": image_message(), "stream": True})
    assert raw.headers["X-Stream-Fallback"] == "true"
    assert raw.data()[0]["model"] == "house-eyes"
    assert upstream_model(mock_upstream) == "grok-2-vision-1212"
    raw = await post(f"{aliased}/api/v1/vision/analyze",
                     {"model": "house-eyes", "image": "https://example.com/a.png",
                      "prompt": "What?"})
    assert raw.json()["model"] == "house-eyes"
    before = len(mock_upstream.state.requests)
    raw = await post(f"{aliased}/api/v1/chat/completions",
                     {"model": "house-mini", "messages": image_message()})
    assert raw.status == 400 and raw.error()["code"] == "model_not_vision_capable"
    assert len(mock_upstream.state.requests) == before


async def test_image_generation_with_an_alias(aliased: str, mock_upstream: Upstream) -> None:
    client = async_sdk(aliased)
    result = await client.images.generate(model="house-painter", prompt="A cat")
    await client.close()
    assert result.data and result.data[0].url
    assert upstream_model(mock_upstream) == "grok-2-image-1212"
