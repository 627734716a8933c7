"""Chat completions through the gateway: byte for byte, headers, keep-alive.

Backpressure from slow clients is a guarantee, in ``tests/guarantees/test_slow_clients.py``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest
from openai import AsyncOpenAI, OpenAI

from clients import AUTH, USER, as_relayed, blocks, chat_body
from conftest import KEY, Upstream, settings_for


async def post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None
               ) -> tuple[aiohttp.ClientResponse, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=body, headers={**AUTH, **(headers or {})}) as r:
            return r, await r.read()


async def test_stream_is_relayed_byte_for_byte(gateway: Any, mock_upstream: Upstream) -> None:
    _, base = gateway
    body = chat_body(stream=True, messages=USER, chunks=30,
                     fields={"stream_options": {"include_usage": True}})
    _, direct = await post(f"{mock_upstream.url}/chat/completions", body)
    r, relayed = await post(f"{base}/api/v1/chat/completions", body)
    assert r.status == 200
    assert relayed == direct
    assert relayed.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' in blocks(relayed)[-2]  # the usage chunk reached the client


async def test_stream_on_the_wire_http11_in_chunks_http10_until_close(
        gateway: Any, mock_upstream: Upstream) -> None:
    """The relay frames HTTP/1.1 chunks itself; an HTTP/1.0 client gets the bare events and
    the connection's end (chunked encoding does not exist in HTTP/1.0)."""
    _, base = gateway
    body = orjson.dumps(chat_body(stream=True, messages=USER, chunks=5))
    expected = await as_relayed(mock_upstream.url, orjson.loads(body))
    port = int(base.rsplit(":", 1)[1])
    for version in (b"1.1", b"1.0"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/chat/completions HTTP/%b\r\nHost: x\r\nAuthorization: "
                     b"Bearer %b\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%b" % (version, KEY.encode(), len(body), body))
        raw = await asyncio.wait_for(reader.read(), 10)  # to the connection's end
        writer.close()
        head, _, wire = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/%b 200" % version)
        if version == b"1.1":
            assert b"Transfer-Encoding: chunked" in head
            assert wire.endswith(b"\r\n0\r\n\r\n")
            decoded, rest = b"", wire
            while (size := int(rest[:rest.index(b"\r\n")], 16)):
                start = rest.index(b"\r\n") + 2
                decoded, rest = decoded + rest[start:start + size], rest[start + size + 2:]
            wire = decoded
        else:
            assert b"Transfer-Encoding" not in head
        assert wire == expected


async def test_stream_headers_and_request_id(gateway: Any, mock_upstream: Upstream) -> None:
    _, base = gateway
    r, _ = await post(f"{base}/v1/chat/completions", chat_body(stream=True, messages=USER),
                      {"X-Request-ID": "req-123"})
    assert r.headers["Content-Type"] == "text/event-stream"
    assert r.headers["Cache-Control"] == "no-cache"
    assert r.headers["X-Accel-Buffering"] == "no"
    assert r.headers["X-Request-ID"] == "req-123"
    assert mock_upstream.state.requests[-1]["headers"]["X-Request-ID"] == "req-123"
    r, _ = await post(f"{base}/v1/chat/completions", chat_body(stream=True, messages=USER))
    generated = r.headers["X-Request-ID"]
    assert len(generated) == 32
    assert mock_upstream.state.requests[-1]["headers"]["X-Request-ID"] == generated


async def test_upstream_gets_the_operator_key_never_the_clients(
        gateway: Any, mock_upstream: Upstream) -> None:
    _, base = gateway
    await post(f"{base}/v1/chat/completions", chat_body(stream=True, messages=USER))
    headers = mock_upstream.state.requests[-1]["headers"]
    assert headers["Authorization"] == "Bearer xai-operator-secret-key"
    assert KEY not in str(headers)


@pytest.mark.parametrize("split", [1, 3, 7])
async def test_awkward_upstream_chunking_changes_nothing(
        gateway: Any, mock_upstream: Upstream, split: int) -> None:
    _, base = gateway
    text = "Ünïcödé 漢字 🚀 split everywhere"
    whole = await as_relayed(mock_upstream.url, chat_body(stream=True, messages=USER,
                                                          text=text))
    _, relayed = await post(f"{base}/api/v1/chat/completions",
                            chat_body(stream=True, messages=USER, text=text, split=split))
    assert relayed == whole


@pytest.mark.parametrize("fmt", ["multiline", "multidata", "crlf", "cr"])
async def test_non_standard_frames_are_reencoded_as_one_line_events(
        gateway: Any, mock_upstream: Upstream, fmt: str) -> None:
    _, base = gateway
    standard = await as_relayed(mock_upstream.url, chat_body(stream=True, messages=USER))
    r, relayed = await post(f"{base}/api/v1/chat/completions",
                            chat_body(stream=True, messages=USER, format=fmt, split=5))
    assert r.status == 200
    got = blocks(relayed)
    assert all(e.startswith(b"data: ") and e.count(b"\n") == 2 for e in got)
    assert got[-1] == b"data: [DONE]\n\n"
    # Same objects as the well-formed stream, only compacted by orjson.
    assert [orjson.loads(e[6:]) for e in got[:-1]] == \
        [orjson.loads(e[6:]) for e in blocks(standard)[:-1]]


async def test_plain_request_returns_the_upstream_json(gateway: Any, mock_upstream: Upstream
                                                       ) -> None:
    _, base = gateway
    r, body = await post(f"{base}/api/v1/chat/completions",
                         chat_body(stream=False, messages=USER))
    assert r.status == 200
    assert r.content_type == "application/json"
    data = orjson.loads(body)
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["content"].startswith("Ah,")
    assert r.headers["x-ratelimit-limit-requests"] == "1000"


async def test_keepalive_comments_before_the_upstream_answers_and_during_silence(
        mock_upstream: Upstream, start_gateway: Any) -> None:
    _, base = await start_gateway(settings_for(mock_upstream.url,
                                               stream={"keepalive_seconds": 0.2}))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/api/v1/chat/completions", headers=AUTH,
                          json=chat_body(stream=True, messages=USER, headers_delay=0.7,
                                         pause_after=2, pause=0.7)) as r:
            # Headers come before the upstream's: the gateway committed 200 to keep the
            # connection alive while the upstream was silent.
            assert r.status == 200
            assert mock_upstream.state.open_streams == 0
            raw = await r.read()
    head, _, rest = raw.partition(b"data: ")
    assert head.count(b": keep-alive\n") >= 2 and head == b": keep-alive\n" * head.count(b"\n")
    assert rest.count(b": keep-alive\n") >= 2  # during the pause after the 2nd chunk
    assert b"\n\n: keep-alive\n" in raw  # comments sit between events, never inside one
    assert raw.endswith(b"data: [DONE]\n\n")


async def test_sdk_streams_through_the_gateway_sync_and_async(gateway: Any) -> None:
    _, base = gateway
    aclient = AsyncOpenAI(base_url=f"{base}/api/v1", api_key=KEY, max_retries=0)
    stream = await aclient.chat.completions.create(
        model="grok-4", messages=USER, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Ah, the meaning of life is forty-two, as everyone knows."
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    await aclient.close()

    def sync() -> str:
        with OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0) as client:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model="grok-4", messages=USER, stream=True))

    assert await asyncio.to_thread(sync) == text


@pytest.mark.parametrize("inject, message", [
    # Two JSON values in one event: valid inside the fast path's `[...]`, so the element count
    # must catch it.
    (b'data: {"a": 1},{"b": 2}\n\n', "malformed"),
    (b"data: [DONE]\n\n", None),  # [DONE] before the end of a burst: the stream ends there
])
async def test_burst_chunks_are_checked_as_strictly_as_single_events(
        gateway: Any, inject: bytes, message: str | None) -> None:
    _, base = gateway
    r, raw = await post(f"{base}/api/v1/chat/completions",
                        chat_body(stream=True, messages=USER, chunks=20, inject_after=5,
                                  inject_hex=inject.hex()))
    assert r.status == 200
    got = blocks(raw)
    assert all(e.startswith(b'data: {"id"') for e in got[:5])  # the events before it arrived
    if message is None:
        assert got[-1] == b"data: [DONE]\n\n" and len(got) == 6
    else:
        assert message in orjson.loads(got[-1][6:])["error"]["message"]
        assert len(got) == 6


async def test_usage_is_taken_from_a_burst_for_the_access_log(
        gateway: Any, caplog: pytest.LogCaptureFixture) -> None:
    _, base = gateway
    body = chat_body(stream=True, messages=USER, chunks=40,
                     fields={"stream_options": {"include_usage": True}})
    with caplog.at_level("INFO", logger="gateway.access"):
        r, raw = await post(f"{base}/api/v1/chat/completions", body)
    assert raw.endswith(b"data: [DONE]\n\n")
    line = orjson.loads([rec.getMessage() for rec in caplog.records
                         if rec.name == "gateway.access"][-1])
    assert line["usage"]["completion_tokens"] == 40
    assert line["chunks"] == 43  # 40 content chunks, the finish chunk, usage, [DONE]


async def test_x_grok_conv_id_and_the_headers_named_to_forward_reach_the_upstream(
        mock_upstream: Upstream, start_gateway: Any) -> None:
    """xAI routes one conversation's requests to one server (its prompt cache); the client's
    credentials never go up, and a value past 1,024 characters is not passed on."""
    _, base = await start_gateway(settings_for(mock_upstream.url, upstream={
        "forward_headers": ["x-grok-conv-id", "X-Tenant"]}))
    r, _ = await post(f"{base}/api/v1/chat/completions", chat_body(stream=True, messages=USER),
                      headers={"x-grok-conv-id": "conv-42", "X-Tenant": "t1",
                               "X-Other": "not named", "x-api-key": "sk-client-key"})
    assert r.status == 200
    seen = {k.lower(): v for k, v in mock_upstream.state.requests[-1]["headers"].items()}
    assert seen["x-grok-conv-id"] == "conv-42" and seen["x-tenant"] == "t1"
    assert "x-other" not in seen and "x-api-key" not in seen
    assert seen["authorization"] == "Bearer xai-operator-secret-key"
    await post(f"{base}/api/v1/chat/completions", chat_body(stream=False, messages=USER),
               headers={"x-grok-conv-id": "c" * 1025})
    assert "x-grok-conv-id" not in {k.lower() for k in mock_upstream.state.requests[-1]["headers"]}
