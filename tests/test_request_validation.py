"""Requests the gateway refuses itself, before the upstream hears of them: 400 with a message
and a ``param`` that name the field."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from clients import IMAGE_URL, USER, async_sdk, chat_body, data_url, image_message, post
from conftest import Upstream, settings_for

LIMIT = 1000  # [vision] max_image_bytes in these tests


@pytest.fixture
async def base(mock_upstream: Upstream, start_gateway: Any) -> str:
    _, url = await start_gateway(settings_for(mock_upstream.url,
                                              vision={"max_image_bytes": LIMIT}))
    return url  # type: ignore[no-any-return]


def image_part(url: str = IMAGE_URL, **image: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, **image}}


def chat_of_parts(*content: Any, role: str = "user", model: str = "grok-4") -> dict[str, Any]:
    """One message whose content is an array of these parts; no ``stream`` field."""
    return chat_body(stream=None, model=model, messages=[{"role": role, "content": list(content)}])


CHAT_CASES = [
    ({"model": "grok-4", "messages": "hi"}, "messages", "must be an array"),
    ({"model": "grok-4"}, "messages", "Missing required parameter"),
    ({"model": 4, "messages": USER}, "model", "must be a string"),
    ({"model": "grok-4", "messages": ["hi"]}, "messages[0]", "must be an object"),
    ({"model": "grok-4", "messages": [{"role": "user", "content": 7}]},
     "messages[0].content", "string or an array"),
    (chat_of_parts({"text": "hi"}), "messages[0].content[0].type", "must be a string"),
    (chat_of_parts("hi"), "messages[0].content[0]", "must be an object"),
    (chat_of_parts({"type": "image_url", "image_url": "https://example.com/a.png"}),
     "messages[0].content[0].image_url", "must be an object"),
    (chat_of_parts({"type": "image_url", "image_url": {"url": 5}}),
     "messages[0].content[0].image_url.url", "must be a string"),
    (chat_of_parts(image_part("ftp://example.com/a.png")),
     "messages[0].content[0].image_url.url", "http(s) URL or a data: URL"),
    (chat_of_parts(image_part("data:text/plain;base64,aGk=")),
     "messages[0].content[0].image_url.url", "data: URL of an image"),
    (chat_of_parts(image_part("data:image/png,rawbytes")),
     "messages[0].content[0].image_url.url", "base64"),
    (chat_of_parts(image_part(detail="ultra")),
     "messages[0].content[0].image_url.detail", "auto, low, high"),
    (chat_of_parts({"type": "text", "text": "hi"}, image_part(data_url(LIMIT + 1))),
     "messages[0].content[1].image_url.url", f"is {LIMIT + 1} bytes; the limit is {LIMIT}"),
    (chat_of_parts(image_part(), role="assistant"),
     "messages[0].content[0]", "only allowed in user messages"),
    (chat_of_parts({"type": "text", "text": "hi"}, image_part(), model="grok-3-mini"),
     "messages[0].content[1]", "Model 'grok-3-mini' does not accept images"),
]


@pytest.mark.parametrize("body, param, message", CHAT_CASES)
@pytest.mark.parametrize("stream", [False, True])
async def test_chat_requests_are_refused_naming_the_field(
        base: str, mock_upstream: Upstream, body: dict[str, Any], param: str, message: str,
        stream: bool) -> None:
    raw = await post(f"{base}/api/v1/chat/completions", {**body, "stream": stream},
                     headers={"Accept": "application/json"})
    assert raw.status == 400, raw.body
    error = raw.error()
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert message in error["message"]
    assert param in error["message"] or param in ("messages", "model")
    assert mock_upstream.state.requests == []


async def test_invalid_json_is_refused(base: str, mock_upstream: Upstream) -> None:
    for path in ("chat/completions", "responses", "images/generations", "vision/analyze"):
        raw = await post(f"{base}/api/v1/{path}", data=b'{"model": "grok-4",',
                         headers={"Content-Type": "application/json"})
        assert raw.status == 400
        assert "not valid JSON" in raw.error()["message"]
    assert mock_upstream.state.requests == []


async def test_exact_size_limit_passes_and_one_byte_more_does_not(base: str) -> None:
    ok = await post(f"{base}/api/v1/chat/completions", chat_of_parts(image_part(data_url(LIMIT))))
    assert ok.status == 200
    over = await post(f"{base}/api/v1/chat/completions",
                      chat_of_parts(image_part(data_url(LIMIT + 1))))
    assert over.status == 400 and over.error()["code"] == "image_too_large"


@pytest.mark.parametrize("input_, param, message", [
    (7, "input", "string or an array"),
    (["hi"], "input[0]", "must be an object"),
    ([{"role": "user", "content": [{"type": "input_image", "image_url": data_url(LIMIT + 1)}]}],
     "input[0].content[0].image_url", "the limit is"),
    ([{"role": "user", "content": [{"type": "input_image"}]}],
     "input[0].content[0].image_url", "must be a string"),
    ([{"role": "user", "content": [{"type": "input_image", "image_url": IMAGE_URL,
                                    "detail": "max"}]}],
     "input[0].content[0].detail", "auto, low, high"),
])
async def test_responses_requests_are_refused_naming_the_field(
        base: str, mock_upstream: Upstream, input_: Any, param: str, message: str) -> None:
    raw = await post(f"{base}/api/v1/responses", {"model": "grok-4", "input": input_,
                                                  "stream": True},
                     headers={"Accept": "application/json"})
    assert raw.status == 400
    assert raw.error()["param"] == param
    assert message in raw.error()["message"]
    assert mock_upstream.state.requests == []


async def test_responses_image_for_a_text_model(base: str) -> None:
    client = async_sdk(base)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model="grok-3-mini", stream=True, input=[  # type: ignore
            {"role": "user", "content": [{"type": "input_image", "image_url": IMAGE_URL,
                                          "detail": "auto"}]}])
    await client.close()
    assert caught.value.param == "input[0].content[0]"
    assert caught.value.code == "model_not_vision_capable"


@pytest.mark.parametrize("body, param", [
    ({"image": IMAGE_URL, "prompt": "What?"}, "model"),
    ({"model": "grok-4", "prompt": "What?"}, "image"),
    ({"model": "grok-4", "image": {"url": IMAGE_URL}, "prompt": "What?"}, "image"),
    ({"model": "grok-4", "image": IMAGE_URL}, "prompt"),
    ({"model": "grok-4", "image": IMAGE_URL, "prompt": "What?", "detail": "max"}, "detail"),
    ({"model": "grok-4", "image": "file:///etc/passwd", "prompt": "What?"}, "image"),
    ({"model": "grok-4", "image": data_url(LIMIT + 1), "prompt": "What?"}, "image"),
    ({"model": "grok-3-mini", "image": IMAGE_URL, "prompt": "What?"}, "model"),
    ({"model": "grok-4", "image": IMAGE_URL, "prompt": "What?", "messages": USER}, "messages"),
])
async def test_analyze_requests_are_refused_naming_the_field(
        base: str, mock_upstream: Upstream, body: dict[str, Any], param: str) -> None:
    raw = await post(f"{base}/api/v1/vision/analyze", body)
    assert raw.status == 400
    assert raw.error()["param"] == param
    assert mock_upstream.state.requests == []


async def test_sdk_gets_bad_request_with_the_param(base: str) -> None:
    client = async_sdk(base)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model="grok-4", stream=True,
            messages=image_message(data_url(LIMIT * 2)))  # type: ignore[arg-type]
    await client.close()
    assert caught.value.param == "messages[0].content[1].image_url.url"
    assert caught.value.code == "image_too_large"


async def test_vision_models_are_configurable(mock_upstream: Upstream,
                                              start_gateway: Any) -> None:
    _, url = await start_gateway(settings_for(mock_upstream.url,
                                              vision={"models": ["*vision*"]}))
    refused = await post(f"{url}/api/v1/chat/completions", chat_of_parts(image_part()))
    assert refused.status == 400 and refused.error()["code"] == "model_not_vision_capable"
    assert "*vision*" in refused.error()["message"]
    ok = await post(f"{url}/api/v1/chat/completions",
                    chat_of_parts(image_part(), model="grok-2-vision-1212"))
    assert ok.status == 200
