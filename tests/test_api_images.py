"""POST images/generate and images/generations: plain JSON relayed; streaming refused."""

from __future__ import annotations

import base64
from typing import Any

import openai
import pytest
from openai import OpenAI

from clients import async_sdk, in_thread, post
from conftest import Upstream

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


async def test_sdk_generates_images_as_b64_json_async(gateway: Any,
                                                      mock_upstream: Upstream) -> None:
    _, base = gateway
    client = async_sdk(base)
    result = await client.images.generate(model="grok-2-image-1212", prompt="A cat in a tree",
                                          n=2, response_format="b64_json")
    await client.close()
    assert result.data is not None and len(result.data) == 2
    for image in result.data:
        assert base64.b64decode(image.b64_json or "").startswith(PNG_MAGIC)
        assert image.revised_prompt == "A cat in a tree"
    seen = mock_upstream.state.requests[-1]
    assert seen["path"] == "/v1/images/generations"
    assert seen["body"]["n"] == 2 and seen["body"]["response_format"] == "b64_json"


async def test_sdk_generates_image_urls_sync(gateway: Any) -> None:
    _, base = gateway

    def use(client: OpenAI) -> Any:
        return client.images.generate(model="grok-2-image-1212", prompt="A lighthouse",
                                      response_format="url")

    result = await in_thread(base, use)
    assert result.data[0].url == "https://imgen.x.ai/mock/image-1.png"


@pytest.mark.parametrize("path", ["/api/v1/images/generate", "/v1/images/generate",
                                  "/api/v1/images/generations", "/v1/images/generations"])
async def test_both_paths_relay_the_upstream_json_byte_for_byte(
        gateway: Any, mock_upstream: Upstream, path: str) -> None:
    _, base = gateway
    body = {"model": "grok-2-image-1212", "prompt": "A red fox", "response_format": "b64_json"}
    direct = await post(f"{mock_upstream.url}/images/generations", body)
    relayed = await post(f"{base}{path}", body)
    assert relayed.status == 200
    assert relayed.headers["Content-Type"].startswith("application/json")
    assert relayed.body == direct.body


@pytest.mark.parametrize("headers", [{}, {"Accept": "text/plain"}])
async def test_stream_true_is_refused_with_400_naming_stream(
        gateway: Any, mock_upstream: Upstream, headers: dict[str, str]) -> None:
    _, base = gateway
    before = len(mock_upstream.state.requests)
    raw = await post(f"{base}/api/v1/images/generate",
                     {"model": "grok-2-image-1212", "prompt": "A cat", "stream": True},
                     headers=headers)
    assert raw.status == 400
    # Image generation never streams, so the refusal is JSON even for a client that sent
    # "stream": true without saying what it accepts.
    assert raw.headers["Content-Type"].startswith("application/json")
    error = raw.error()
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "stream"
    assert error["code"] == "stream_not_supported"
    assert len(mock_upstream.state.requests) == before  # refused before the upstream


async def test_sdk_sees_the_stream_refusal_as_bad_request(gateway: Any) -> None:
    _, base = gateway
    client = async_sdk(base)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.images.generate(model="grok-2-image-1212", prompt="A cat",
                                     extra_body={"stream": True})
    await client.close()
    assert caught.value.param == "stream"
    assert caught.value.type == "invalid_request_error"


@pytest.mark.parametrize("body, param", [
    ({"model": "grok-2-image-1212"}, "prompt"),
    ({"model": "grok-2-image-1212", "prompt": 7}, "prompt"),
    ({"model": "grok-2-image-1212", "prompt": "A cat", "n": "2"}, "n"),
    ({"model": "grok-2-image-1212", "prompt": "A cat", "stream": "no"}, "stream"),
])
async def test_bad_image_requests_name_the_field(gateway: Any, body: dict[str, Any],
                                                 param: str) -> None:
    _, base = gateway
    raw = await post(f"{base}/api/v1/images/generations", body)
    assert raw.status == 400
    assert raw.error()["param"] == param
