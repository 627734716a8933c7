"""The Responses API through the gateway: named events byte for byte, plain requests, and
mid-stream failures as the API's own ``error`` event (which the SDK raises as ``APIError``)."""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest
from openai import OpenAI

from clients import async_sdk, in_thread, post, same_but_ids
from conftest import Upstream, settings_for

EVENT_TYPES = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added"] + ["response.output_text.delta"] * 10 + [
    "response.output_text.done", "response.content_part.done", "response.output_item.done",
    "response.completed"]


def request(stream: bool = True, **mock: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "grok-4", "input": "Explain quantum computing",
                            "stream": stream}
    if mock:
        body["mock"] = mock
    return body


@pytest.mark.parametrize("prefix", ["/api/v1", "/v1"])
async def test_named_event_stream_is_relayed_byte_for_byte(
        gateway: Any, mock_upstream: Upstream, prefix: str) -> None:
    _, base = gateway
    direct = await post(f"{mock_upstream.url}/responses", request())
    relayed = await post(f"{base}{prefix}/responses", request())
    assert relayed.status == 200
    assert same_but_ids(relayed.body) == same_but_ids(direct.body)
    assert relayed.headers["Content-Type"] == "text/event-stream"
    assert relayed.headers["Cache-Control"] == "no-cache"
    assert relayed.headers["X-Accel-Buffering"] == "no"
    assert relayed.headers["X-Request-ID"]
    events = relayed.events()
    assert events[0].startswith(b"event: response.created\ndata: {")
    assert events[-1].startswith(b"event: response.completed\ndata: {")
    assert b"[DONE]" not in relayed.body
    numbers = [orjson.loads(e.split(b"data: ", 1)[1])["sequence_number"] for e in events]
    assert numbers == list(range(len(events)))


async def test_awkwardly_split_upstream_changes_nothing(gateway: Any,
                                                        mock_upstream: Upstream) -> None:
    _, base = gateway
    direct = await post(f"{mock_upstream.url}/responses", request())
    relayed = await post(f"{base}/api/v1/responses", request(split=7))
    assert same_but_ids(relayed.body) == same_but_ids(direct.body)


async def test_sdk_stream_yields_every_event_async(gateway: Any) -> None:
    _, base = gateway
    client = async_sdk(base)
    stream = await client.responses.create(model="grok-4", input="Explain quantum computing",
                                           stream=True)
    events = [e async for e in stream]
    await client.close()
    assert [e.type for e in events] == EVENT_TYPES
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "Ah, the meaning of life is forty-two, as everyone knows."
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.output_text == text
    assert completed.response.usage is not None and completed.response.usage.output_tokens == 10


async def test_sdk_stream_helper_and_plain_request_sync(gateway: Any) -> None:
    _, base = gateway

    def use(client: OpenAI) -> tuple[list[str], str, Any]:
        with client.responses.stream(model="grok-4", input="hi",
                                     extra_body={"mock": {"text": "Hello from Grok"}}) as s:
            deltas = [e.delta for e in s if e.type == "response.output_text.delta"]
            final = s.get_final_response()
        plain = client.responses.create(model="grok-4", input="hi")
        return deltas, final.output_text, plain

    deltas, final_text, plain = await in_thread(base, use)
    assert deltas == ["Hello ", "from ", "Grok"]
    assert final_text == "Hello from Grok"
    assert plain.object == "response" and plain.status == "completed"
    assert plain.output_text == "Ah, the meaning of life is forty-two, as everyone knows."


async def test_plain_request_returns_the_upstream_json(gateway: Any,
                                                       mock_upstream: Upstream) -> None:
    _, base = gateway
    relayed = await post(f"{base}/api/v1/responses", request(stream=False))
    assert relayed.status == 200
    assert relayed.headers["Content-Type"].startswith("application/json")
    body = relayed.json()
    assert body["object"] == "response" and body["model"] == "grok-4"
    assert mock_upstream.state.requests[-1]["path"] == "/v1/responses"


async def test_upstream_error_event_reaches_the_sdk_as_api_error(gateway: Any,
                                                                 mock_upstream: Upstream) -> None:
    _, base = gateway
    relayed = await post(f"{base}/api/v1/responses", request(error_after=6))
    direct = await post(f"{mock_upstream.url}/responses", request(error_after=6))
    # The events before it as the upstream sent them; the error event is the gateway's own,
    # with the upstream's message (redacted) and code, continuing the numbering.
    assert [same_but_ids(e) for e in relayed.events()[:-1]] == \
        [same_but_ids(e) for e in direct.events()[:-1]]
    sent, upstream = (orjson.loads(e.events()[-1].split(b"data: ", 1)[1])
                      for e in (relayed, direct))
    assert relayed.events()[-1].startswith(b"event: error\n")
    assert sent["type"] == "error" and sent["sequence_number"] == upstream["sequence_number"]
    assert sent["message"] == f"Upstream error: {upstream['message']}"
    assert sent["code"] == upstream["code"] and sent["error"]["message"] == sent["message"]

    client = async_sdk(base)
    seen: list[str] = []
    with pytest.raises(openai.APIError, match="mock mid-stream failure"):
        stream = await client.responses.create(model="grok-4", input="hi", stream=True,
                                               extra_body={"mock": {"error_after": 6}})
        async for event in stream:
            seen.append(event.type)
    await client.close()
    assert seen[:4] == EVENT_TYPES[:4] and len(seen) == 6


@pytest.mark.parametrize("mock, message", [
    # (a pause first: a reset connection loses what the gateway had not read yet)
    ({"disconnect_after": 5, "chunk_delay": 0.03}, "connection broke mid-stream"),
    ({"malformed_after": 5}, "malformed"),
    ({"hang_after": 5}, "sent nothing for"),
])
async def test_gateway_detected_failures_end_with_a_responses_error_event(
        mock_upstream: Upstream, start_gateway: Any, mock: dict[str, Any], message: str) -> None:
    _, base = await start_gateway(settings_for(mock_upstream.url, stream={
        "keepalive_seconds": 0.1, "idle_timeout_seconds": 0.3}))
    relayed = await post(f"{base}/api/v1/responses", request(**mock))
    assert relayed.status == 200
    events = relayed.events()
    assert len(events) == 6
    assert events[-1].startswith(b"event: error\ndata: ")
    error = orjson.loads(events[-1].split(b"data: ", 1)[1])
    assert error["type"] == "error"
    assert error["code"] in ("upstream_bad_stream", "upstream_timeout")
    assert error["sequence_number"] == 5  # it continues the upstream's numbering
    assert message in error["message"] and error["error"]["message"] == error["message"]

    def use(client: OpenAI) -> list[str]:
        seen: list[str] = []
        with pytest.raises(openai.APIError, match=message):
            for event in client.responses.create(model="grok-4", input="hi", stream=True,
                                                 extra_body={"mock": mock}):
                seen.append(event.type)
        return seen

    assert await in_thread(base, use) == EVENT_TYPES[:5]


async def test_upstream_refusal_keeps_its_status(gateway: Any) -> None:
    _, base = gateway
    client = async_sdk(base)
    with pytest.raises(openai.RateLimitError):
        await client.responses.create(model="grok-4", input="hi", stream=True,
                                      extra_body={"mock": {"status": 429}})
    with pytest.raises(openai.BadRequestError):
        await client.responses.create(model="grok-4", input="hi",
                                      extra_body={"mock": {"status": 400}})
    await client.close()
