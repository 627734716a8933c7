"""Bad input and hostile clients get a clear error, cost the upstream nothing, and do not touch
anyone else: each case runs while another client's stream is in flight, and that stream must
arrive whole, byte for byte.

Where our code answers, the answer is an OpenAI-shaped JSON error with the true status (400,
413, 415). Some requests never reach it: aiohttp's HTTP parser refuses a header with a bare CR
or LF, a NUL, an unparseable or conflicting ``Content-Length``, and bytes that are not HTTP at
all. The answer is then built by ``gateway/server/limits.py`` (aiohttp's own quoted the line it
could not parse, key and all): a 400 in the same JSON error shape, quoting nothing of the
request, and the connection closed (see ``test_server_limits.py`` for the key's header).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from clients import AUTH, mock_events
from conftest import KEY, Upstream, settings_for
from observe import error_of

ROUTE = "/api/v1/chat/completions"
LIMIT = 1024 * 1024  # [stream] max_body_bytes for these tests
TEXT = "a healthy stream keeps flowing while others misbehave"
HEALTHY = b"".join(mock_events(TEXT))


@pytest.fixture
async def served(mock_upstream: Upstream, start_gateway: Any) -> tuple[str, int]:
    _, base = await start_gateway(settings_for(mock_upstream.url,
                                               stream={"max_body_bytes": LIMIT}))
    return base, int(base.rsplit(":", 1)[1])


@contextlib.asynccontextmanager
async def healthy_stream(base: str, mock_upstream: Upstream) -> AsyncIterator[None]:
    """Another client's stream, begun before the block and held upstream through it (until a
    second stream opens, after the block); it must then arrive whole."""
    held = {"text": TEXT, "pause_after": 2, "hold_until_open": 2, "pause": 10}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        async def stream(mock: dict[str, Any]) -> aiohttp.ClientResponse:
            return await s.post(f"{base}{ROUTE}", headers=AUTH, json={
                "model": "grok-4", "stream": True, "mock": mock,
                "messages": [{"role": "user", "content": "hi"}]})

        async with await stream(held) as r:
            assert r.status == 200
            head = await r.content.readuntil(b"\n\n")
            seen = len(mock_upstream.state.requests)
            yield
            assert mock_upstream.state.open_streams == 1, "the healthy stream was not in flight"
            assert len(mock_upstream.state.requests) == seen, "a bad request reached upstream"
            async with await stream({**held, "pause_after": 0}) as release:
                assert await release.read() == HEALTHY
            assert head + await r.read() == HEALTHY


async def post(base: str, data: Any, headers: dict[str, str] | None = None
               ) -> tuple[int, bytes]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.post(f"{base}{ROUTE}", data=data, headers={
                **AUTH, "Content-Type": "application/json", **(headers or {})}) as r:
            return r.status, await r.read()


async def exchange(port: int, data: bytes, timeout: float = 2.0) -> tuple[bytes, bool]:
    """Send raw bytes; return the response (once complete, by its ``Content-Length``) and
    whether the server then closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        out = b""
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                out += chunk
                head, sep, body = out.partition(b"\r\n\r\n")
                length = [line for line in head.lower().split(b"\r\n")
                          if line.startswith(b"content-length:")]
                if sep and length and len(body) >= int(length[0].split(b":")[1]):
                    break
            else:
                return out, True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.2):
                return out, await reader.read(1) == b""
        return out, False
    finally:
        writer.close()


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), {k.lower(): v for k, v in headers.items()}, body


def request_head(*headers: bytes) -> bytes:
    return b"POST " + ROUTE.encode() + b" HTTP/1.1\r\nHost: gateway\r\n" + b"".join(
        h + b"\r\n" for h in headers) + b"\r\n"


AUTH_LINE = b"Authorization: Bearer " + KEY.encode()
JSON_LINE = b"Content-Type: application/json"
BODY = orjson.dumps({"model": "grok-4", "messages": [{"role": "user", "content": "hi"}]})


# --- answered by the gateway ------------------------------------------------------------------

async def oversized_body(base: str, port: int) -> None:
    status, raw = await post(base, b'{"model": "grok-4", "pad": "' + b"x" * 2 * LIMIT + b'"}')
    assert status == 413 and error_of(raw)["code"] == "request_too_large"
    assert f"the limit is {LIMIT} bytes" in error_of(raw)["message"]


async def oversized_chunked_body(base: str, port: int) -> None:
    async def body() -> AsyncIterator[bytes]:  # no Content-Length: read up to the limit only
        yield b'{"model": "grok-4", "pad": "'
        for _ in range(32):
            yield b"x" * (LIMIT // 8)
        yield b'"}'

    status, raw = await post(base, body())
    assert status == 413 and error_of(raw)["code"] == "request_too_large"


async def absurd_content_length(base: str, port: int) -> None:
    """Refused from the header alone: the answer comes while the body is still unsent."""
    raw, _ = await exchange(port, request_head(AUTH_LINE, JSON_LINE,
                                               b"Content-Length: 1000000000000"))
    status, headers, body = split_response(raw)
    assert status == 413 and headers["content-type"].startswith("application/json")
    err = error_of(body)
    assert err["code"] == "request_too_large" and "1000000000000 bytes" in err["message"]


async def deeply_nested_json(base: str, port: int) -> None:
    depth = 100_000
    status, raw = await post(base, b'{"model": "grok-4", "messages": ' + b"[" * depth
                             + b"]" * depth + b"}")
    assert status == 400
    err = error_of(raw)
    assert err["code"] == "invalid_request" and "not valid JSON" in err["message"]
    assert "depth" in err["message"]


async def non_utf8_body(base: str, port: int) -> None:
    latin1 = '{"model": "grok-4", "messages": [{"role": "user", "content": "café"}]}'
    status, raw = await post(base, latin1.encode("latin-1"))
    assert status == 400
    err = error_of(raw)
    assert "not valid JSON" in err["message"] and "UTF-8" in err["message"]


async def unknown_content_types(base: str, port: int) -> None:
    for ctype in ("application/xml", "multipart/form-data; boundary=x", "image/png",
                  "text/html; charset=utf-8"):
        status, raw = await post(base, BODY, {"Content-Type": ctype})
        assert status == 415, ctype
        err = error_of(raw)
        assert err["code"] == "unsupported_media_type" and "application/json" in err["message"]


# --- refused by aiohttp's parser, before the gateway's code -----------------------------------

def refused_by_the_parser(*head: bytes) -> Callable[[str, int], Awaitable[None]]:
    async def check(base: str, port: int) -> None:
        raw, closed = await exchange(port, request_head(*head) + BODY)
        status, headers, body = split_response(raw)
        assert status == 400 and headers["content-type"].startswith("application/json")
        assert error_of(body)["code"] == "malformed_request"
        assert KEY.encode() not in body and b"X-Note" not in body, "nothing of it is quoted"
        assert closed, "the connection is closed after a request that could not be parsed"
    return check


async def not_http_at_all(base: str, port: int) -> None:
    raw, closed = await exchange(port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 8)
    assert raw.startswith(b"HTTP/1.") and b" 400 " in raw.split(b"\r\n", 1)[0] and closed


CASES: dict[str, Callable[[str, int], Awaitable[None]]] = {
    "oversized_body_413_before_the_upstream": oversized_body,
    "oversized_chunked_body_413_at_the_limit": oversized_chunked_body,
    "absurd_content_length_413_without_reading": absurd_content_length,
    "deeply_nested_json_400": deeply_nested_json,
    "non_utf8_body_400": non_utf8_body,
    "unknown_content_types_415": unknown_content_types,
    "header_with_bare_cr_400_from_aiohttp": refused_by_the_parser(
        AUTH_LINE, b"X-Note: one\rtwo", JSON_LINE, b"Content-Length: %d" % len(BODY)),
    "header_with_bare_lf_400_from_aiohttp": refused_by_the_parser(
        AUTH_LINE, b"X-Note: one\nInjected: two", JSON_LINE, b"Content-Length: %d" % len(BODY)),
    "header_with_nul_400_from_aiohttp": refused_by_the_parser(
        AUTH_LINE, b"X-Note: one\x00two", JSON_LINE, b"Content-Length: %d" % len(BODY)),
    "overflowing_content_length_400_from_aiohttp": refused_by_the_parser(
        AUTH_LINE, JSON_LINE, b"Content-Length: 99999999999999999999999"),
    "negative_content_length_400_from_aiohttp": refused_by_the_parser(
        AUTH_LINE, JSON_LINE, b"Content-Length: -1"),
    "conflicting_content_lengths_400_from_aiohttp": refused_by_the_parser(
        AUTH_LINE, JSON_LINE, b"Content-Length: %d" % len(BODY), b"Content-Length: 5"),
    "content_length_with_chunked_400_from_aiohttp": refused_by_the_parser(
        AUTH_LINE, JSON_LINE, b"Content-Length: %d" % len(BODY),
        b"Transfer-Encoding: chunked"),
    "not_http_at_all_400_from_aiohttp": not_http_at_all,
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_a_bad_request_gets_a_clear_error_and_another_clients_stream_is_untouched(
        served: tuple[str, int], mock_upstream: Upstream,
        case: Callable[[str, int], Awaitable[None]]) -> None:
    base, port = served
    async with healthy_stream(base, mock_upstream):
        await case(base, port)
