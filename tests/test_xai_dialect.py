"""What the gateway makes of xAI's own dialect, which the mock upstream speaks by default: a 404
for a model xAI does not serve, xAI's error body (``{"code", "error": "<message>"}``) and the
running ``usage`` on every chunk, each as an OpenAI-SDK client and the operator see it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import openai
import orjson
import pytest
from openai import OpenAI

from clients import AUTH, USER, async_sdk, chat_body, in_thread, post, scrape, value
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


@pytest.mark.parametrize("split", [None, 9])  # whole events, and events cut mid-way
async def test_usage_on_every_chunk_is_counted_once_the_last_one(
        gateway: Any, mock_upstream: Upstream, caplog: pytest.LogCaptureFixture,
        split: int | None) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    _, base = gateway
    mock: dict[str, Any] = {"chunks": 5} if split is None else {"chunks": 5, "split": split}
    body = chat_body(stream=True, messages=USER, **mock)
    direct = await post(f"{mock_upstream.url}/chat/completions", body)
    running = [d["usage"]["completion_tokens"] for d in direct.data() if d != "[DONE]"]
    assert running == [1, 2, 3, 4, 5, 5]  # the upstream's running count, on every chunk
    raw = await post(f"{base}/api/v1/chat/completions", body, headers=AUTH)
    assert raw.status == 200 and raw.body == direct.body
    for _ in range(100):  # the access line is written as the response ends
        if _access_lines(caplog):
            break
        await asyncio.sleep(0.02)
    (line,) = _access_lines(caplog)
    assert line["usage"] == {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
    samples = await scrape(base)
    assert value(samples, "gateway_tokens_total", key="alice", model="grok-4",
                 type="prompt") == 12
    assert value(samples, "gateway_tokens_total", key="alice", model="grok-4",
                 type="completion") == 5


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
