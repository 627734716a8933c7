"""Errors reach every client in the form it parses, with the true status where possible.

Upstream faults (statuses, timeouts, mid-stream failures, retries) are guarantees, in
``tests/guarantees/test_upstream_faults.py``.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import orjson
import pytest
from openai import AsyncOpenAI

from clients import AUTH
from conftest import KEY, Upstream, settings_for

MESSAGES = [{"role": "user", "content": "hi"}]


async def request(method: str, url: str, *, data: bytes | None = None, json: Any = None,
                  headers: dict[str, str] | None = None, skip_auto_headers: tuple[str, ...] = ()
                  ) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession(skip_auto_headers=skip_auto_headers) as s:
        async with s.request(method, url, data=data, json=json,
                             headers={**AUTH, **(headers or {})}) as r:
            return r.status, dict(r.headers), await r.read()


def error_of(body: bytes) -> dict[str, Any]:
    err = orjson.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err  # type: ignore[no-any-return]


@pytest.mark.parametrize("body, message, param", [
    (b"{not json", "not valid JSON", None),
    (b"[1, 2]", "must be a JSON object, not an array", None),
    (b"", "empty", None),
    (b'{"model": "grok-4", "messages": [], "stream": "yes"}', "'stream' must be a boolean",
     "stream"),
    (b'{"messages": []}', "Missing required parameter: 'model'", "model"),
    (b'{"model": "grok-4"}', "Missing required parameter: 'messages'", "messages"),
    (b'{"model": 4, "messages": []}', "'model' must be a string", "model"),
    (b'{"model": "grok-4", "messages": {}}', "'messages' must be an array", "messages"),
])
async def test_bad_requests_get_400_that_says_what_is_wrong(
        gateway: Any, mock_upstream: Upstream, body: bytes, message: str, param: str | None
) -> None:
    _, base = gateway
    status, headers, raw = await request("POST", f"{base}/api/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
    assert status == 400
    err = error_of(raw)
    assert message in err["message"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert headers["Content-Type"].startswith("application/json")
    assert mock_upstream.state.requests == []  # refused before the upstream


async def test_body_over_the_limit_gets_413_before_the_upstream(
        mock_upstream: Upstream, start_gateway: Any) -> None:
    _, base = await start_gateway(settings_for(mock_upstream.url,
                                               stream={"max_body_bytes": 1000}))
    big = {"model": "grok-4", "messages": [{"role": "user", "content": "x" * 5000}]}
    status, _, raw = await request("POST", f"{base}/api/v1/chat/completions", json=big)
    assert status == 413
    assert error_of(raw)["code"] == "request_too_large"
    assert mock_upstream.state.requests == []


async def test_unknown_route_and_wrong_method(gateway: Any) -> None:
    _, base = gateway
    status, _, raw = await request("GET", f"{base}/api/v1/nothing-here")
    assert status == 404 and error_of(raw)["code"] == "not_found"
    status, headers, raw = await request("GET", f"{base}/api/v1/chat/completions")
    assert status == 405 and error_of(raw)["code"] == "method_not_allowed"
    assert headers["Allow"] == "POST"


async def test_unsupported_content_type_gets_415(gateway: Any) -> None:
    _, base = gateway
    status, _, raw = await request("POST", f"{base}/api/v1/chat/completions", data=b"a=b",
                                   headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert status == 415 and "application/json" in error_of(raw)["message"]


async def test_stream_error_before_headers_is_an_sse_frame_only_when_accept_names_it(
        gateway: Any) -> None:
    _, base = gateway
    body = {"model": "grok-4", "messages": MESSAGES, "stream": True, "mock": {"status": 404,
                                                                           "message": "no model"}}
    # A client that names the event stream in Accept gets the frame, with the true status.
    for accept in ("text/event-stream", "application/json, text/event-stream;q=0.5"):
        status, headers, raw = await request("POST", f"{base}/api/v1/chat/completions",
                                             json=body, headers={"Accept": accept})
        assert status == 404
        assert headers["Content-Type"] == "text/event-stream"
        assert raw.startswith(b"data: {") and raw.endswith(b"}\n\n")
        assert error_of(raw[6:-2])["message"] == "no model"
    # Anyone else (no Accept, */*, JSON only, the event stream refused with q=0) gets the JSON
    # body whatever the body's "stream" says: the AI SDK's providers send no Accept.
    for accept in (None, "*/*", "application/json", "text/event-stream;q=0"):
        status, headers, raw = await request(
            "POST", f"{base}/api/v1/chat/completions", json=body,
            headers={} if accept is None else {"Accept": accept},
            skip_auto_headers=("Accept",))
        assert status == 404 and headers["Content-Type"].startswith("application/json"), accept
        assert error_of(raw)["message"] == "no model"


async def test_sdk_gets_its_own_exception_classes_before_the_stream(gateway: Any) -> None:
    _, base = gateway
    bad = AsyncOpenAI(base_url=f"{base}/api/v1", api_key="sk-wrong-key-123", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="Invalid authentication token"):
        await bad.chat.completions.create(model="grok-4", messages=MESSAGES, stream=True)
    await bad.close()
    client = AsyncOpenAI(base_url=f"{base}/api/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="Missing required parameter: 'messages'"):
        await client.chat.completions.create(model="grok-4", messages=openai.omit, stream=True)
    with pytest.raises(openai.NotFoundError, match="no such model"):
        await client.chat.completions.create(model="grok-9", messages=MESSAGES, stream=True,
                                             extra_body={"mock": {"status": 404,
                                                                  "message": "no such model"}})
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="grok-4", messages=MESSAGES, stream=True,
                                             extra_body={"mock": {"status": 500}})
    await client.close()
