"""Upstream faults, injected for real on loopback, each with a defined answer.

Before the gateway has sent anything, a fault is a response with its true status. After the
stream began, it is exactly one error frame and the end of the stream: never ``[DONE]``, never a
clean-looking truncated stream, and the events before it are the upstream's, untouched. Either
way the stream and the upstream connection are released, the access-log line's ``outcome`` and
``error`` say what happened, and ``gateway_upstream_errors_total`` counts it by kind.

Retries happen only before anything reached the client, are bounded by ``[upstream]
max_retries``, and cost the client one rate-limit token however many tries there were.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from clients import AUTH, HI, chat_body, mock_events, scrape, sse_events
from conftest import KEY, Upstream, settings_for
from observe import Baseline, access_lines, assert_released, error_of
from servers import free_port

ROUTE = "/api/v1/chat/completions"
TEXT = "one two three four five six seven eight"  # the mock's reply (``text=TEXT``) here
CLEAN = mock_events(TEXT)
"""The stream the mock sends for ``TEXT`` when nothing goes wrong."""


async def post(base: str, body: dict[str, Any], headers: dict[str, str] | None = None
               ) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        async with s.post(f"{base}{ROUTE}", json=body, headers={**AUTH, **(headers or {})}) as r:
            return r.status, dict(r.headers), await r.read()


def upstream_errors(samples: dict[Any, float]) -> dict[str, float]:
    return {dict(labels)["kind"]: v for (name, labels), v in samples.items()
            if name == "gateway_upstream_errors_total"}


@dataclass(frozen=True)
class Fault:
    mock: dict[str, Any]
    code: str
    message: str
    kind: str
    outcome: str = "upstream_error"
    stream: dict[str, Any] = field(default_factory=dict)


FAST_TIMEOUTS = {"keepalive_seconds": 0.2, "idle_timeout_seconds": 0.5,
                 "first_byte_timeout_seconds": 0.5}

MID_STREAM = {
    # Paced: bytes still in aiohttp's read buffer when the upstream resets are lost with it.
    "reset": Fault({"disconnect_after": 3, "chunk_delay": 0.05}, "upstream_bad_stream",
                   "upstream connection broke mid-stream", "bad_stream"),
    "hang_after_headers": Fault({"hang_after": 0}, "upstream_timeout", "sent nothing for",
                                "timeout", "timeout", FAST_TIMEOUTS),
    "hang_mid_stream": Fault({"hang_after": 2}, "upstream_timeout", "sent nothing for",
                             "timeout", "timeout", FAST_TIMEOUTS),
    "html_garbage": Fault({"inject_after": 2, "inject_hex": (
        b"<html><body><h1>502 Bad Gateway</h1></body></html>\r\n\r\n").hex()},
        "upstream_bad_stream", "not an SSE field", "bad_stream"),
    "binary_garbage": Fault({"inject_after": 2, "inject_hex": (
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\xff\n\n").hex()},
        "upstream_bad_stream", "not an SSE field", "bad_stream"),
    "oversized_line": Fault({"inject_after": 1, "inject_hex": (
        b"data: " + b"x" * 300_000).hex()}, "upstream_bad_stream", "exceeds 65536 bytes",
        "bad_stream", stream={"max_event_bytes": 65536}),
    # Valid JSON on one line, arriving whole in one read: still over the limit.
    "oversized_event": Fault({"inject_after": 1, "chunk_delay": 0.05, "inject_hex": (
        b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * 30_000
        + b'"}}]}\n\n').hex()}, "upstream_bad_stream", "exceeds 16384 bytes", "bad_stream",
        stream={"max_event_bytes": 16384}),
    # One event whose line ends in "data: [DONE]": not the end, a malformed event.
    "done_inside_a_bad_event": Fault({"inject_after": 2, "chunk_delay": 0.05, "inject_hex": (
        b'data: {"a": data: [DONE]\n\n').hex()}, "upstream_bad_stream", "not valid JSON",
        "bad_stream"),
    "invalid_utf8": Fault({"inject_after": 2, "inject_hex": (
        b'data: {"choices":[{"index":0,"delta":{"content":"\xff\xfe"}}]}\n\n').hex()},
        "upstream_bad_stream", "not valid JSON", "bad_stream"),
    "invalid_json": Fault({"malformed_after": 2}, "upstream_bad_stream", "not valid JSON",
                          "bad_stream"),
    "no_done": Fault({"no_done": True}, "upstream_bad_stream", "ended before it was complete",
                     "bad_stream"),
    "error_event": Fault({"error_after": 3}, "mock_failure",
                         "Upstream error: mock mid-stream failure", "error"),
}


@pytest.mark.parametrize("fault", MID_STREAM.values(), ids=MID_STREAM.keys())
async def test_a_mid_stream_fault_ends_with_one_error_frame_released_logged_and_counted(
        mock_upstream: Upstream, start_gateway: Any, caplog: pytest.LogCaptureFixture,
        fault: Fault) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    app, base = await start_gateway(settings_for(mock_upstream.url, stream=fault.stream))
    baseline = await Baseline.after_one_request(base, KEY)
    status, headers, raw = await post(base, chat_body(stream=True, text=TEXT, **fault.mock))

    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    events = sse_events(raw)
    err = error_of(events[-1])
    assert err["code"] == fault.code and fault.message in err["message"], err
    assert sum(b'"error"' in e for e in events) == 1
    assert b"[DONE]" not in raw and raw.endswith(b"\n\n")
    assert events[:-1] == CLEAN[:len(events) - 1]  # what came before is the upstream's own

    await assert_released(app, mock_upstream.state, baseline)
    [line] = access_lines(caplog, ROUTE)
    assert (line["status"], line["outcome"], line["error"]) == (200, fault.outcome, fault.code)
    assert upstream_errors(await scrape(base)) == {fault.kind: 1}


class NotHTTP:
    """A TCP server that answers every request with bytes that are not HTTP."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.connections = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(OSError):
            await reader.read(65536)
            writer.write(self.answer)
            await writer.drain()
        writer.close()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        try:
            yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        finally:
            server.close()
            await server.wait_closed()


BEFORE_STREAMING = {
    # name: (mock options, status, code, kind, outcome)
    "429": ({"status": 429}, 429, "rate_limit_exceeded", "status", "upstream_error"),
    "500": ({"status": 500}, 500, "upstream_http_500", "status", "upstream_error"),
    "503": ({"status": 503}, 503, "upstream_http_503", "status", "upstream_error"),
    "headers_timeout": ({"headers_delay": 3}, 504, "upstream_timeout", "timeout", "timeout"),
}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "plain"])
@pytest.mark.parametrize("case", BEFORE_STREAMING.values(), ids=BEFORE_STREAMING.keys())
async def test_a_fault_before_streaming_gets_its_true_status_released_logged_and_counted(
        mock_upstream: Upstream, start_gateway: Any, caplog: pytest.LogCaptureFixture,
        case: tuple[dict[str, Any], int, str, str, str], stream: bool) -> None:
    mock, expected, code, kind, outcome = case
    caplog.set_level(logging.INFO, logger="gateway.access")
    app, base = await start_gateway(settings_for(mock_upstream.url, stream={
        "first_byte_timeout_seconds": 0.4, "keepalive_seconds": 5}))
    baseline = await Baseline.after_one_request(base, KEY)
    status, headers, raw = await post(base, chat_body(stream=stream, text=TEXT, **mock),
                                      {"Accept": "application/json"})
    assert status == expected and headers["Content-Type"].startswith("application/json")
    assert error_of(raw)["code"] == code
    await assert_released(app, None, baseline)
    await asyncio.sleep(0)
    [line] = access_lines(caplog, ROUTE)
    assert (line["status"], line["outcome"], line["error"]) == (expected, outcome, code)
    assert upstream_errors(await scrape(base)) == {kind: 1}


async def test_an_error_answer_whose_body_never_ends_is_answered_after_one_keepalive(
        start_gateway: Any) -> None:
    """The error's status is known from its headers; its body gets one keep-alive interval."""
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: application/json\r\n\r\nf\r\n{\"error\": {\"mes\r\n")
        await writer.drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 10)  # and nothing more
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        _, base = await start_gateway(settings_for(url, stream={"keepalive_seconds": 0.3}))
        started = asyncio.get_running_loop().time()
        status, _, raw = await post(base, chat_body(stream=True, text=TEXT),
                                    {"Accept": "application/json"})
        assert asyncio.get_running_loop().time() - started < 5  # not the upstream's 10 s
        assert status == 500 and error_of(raw)["code"] == "upstream_http_500"
    finally:
        done.set()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("upstream_status, status, code", [
    (400, 400, "upstream_http_400"),
    (429, 429, "rate_limit_exceeded"),
    (500, 500, "upstream_http_500"),
    (401, 502, "upstream_auth_failed"),  # the operator's key, not the client's
])
async def test_upstream_error_statuses_map_to_the_error_shape(
        gateway: Any, upstream_status: int, status: int, code: str) -> None:
    _, base = gateway
    got, _, raw = await post(base, chat_body(stream=False, text=TEXT, status=upstream_status,
                                             message="boom xai-operator-secret-key"))
    assert got == status
    assert error_of(raw)["code"] == code
    assert b"xai-operator-secret-key" not in raw


@pytest.mark.parametrize("answer", [b"garbage garbage\r\n\r\n", b"HTTP/1.1 abc OK\r\n\r\n",
                                    b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n"],
                         ids=["not_http", "bad_status_line", "header_too_long"])
async def test_an_answer_that_is_not_http_is_502_bad_stream_never_500(
        start_gateway: Any, caplog: pytest.LogCaptureFixture, answer: bytes) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    upstream = NotHTTP(answer)
    async with upstream.serving() as url:
        app, base = await start_gateway(settings_for(url, upstream={"max_retries": 2}))
        baseline = Baseline(len(asyncio.all_tasks()))
        status, _, raw = await post(base, chat_body(stream=True, text=TEXT),
                                    {"Accept": "application/json"})
        assert status == 502
        err = error_of(raw)
        assert err["code"] == "upstream_bad_stream" and "not valid HTTP" in err["message"]
        assert b"garbage" not in raw and b"abc" not in raw  # nothing of the answer is echoed
        assert upstream.connections == 1  # not retried: it was an answer, a wrong one
        await assert_released(app, None, baseline)
    [line] = access_lines(caplog, ROUTE)
    assert (line["status"], line["outcome"], line["error"]) == (502, "upstream_error",
                                                                 "upstream_bad_stream")
    assert upstream_errors(await scrape(base)) == {"bad_stream": 1}


def http_answer(status: int, body: bytes) -> bytes:
    return (b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%b" % (status, len(body), body))


DEEP = b'{"a":' * 300 + b'"caf\\u00e9"' + b"}" * 300
"""Valid JSON nested 300 deep, with an escape: orjson reads it (1024 levels) but cannot write
it back (254), and an escape makes the gateway re-encode to look for a spelled-out key."""


@pytest.mark.parametrize("status,path,want_status,want_code", [
    (200, "/api/v1/chat/completions", 502, "upstream_bad_stream"),
    (200, "/api/v1/models", 502, "upstream_bad_stream"),
    (400, "/api/v1/chat/completions", 400, "invalid_request_error"),
], ids=["answer", "models", "error_answer"])
async def test_an_answer_nested_too_deep_to_re_encode_is_a_clean_error_never_500(
        start_gateway: Any, caplog: pytest.LogCaptureFixture, status: int, path: str,
        want_status: int, want_code: str) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    upstream = NotHTTP(http_answer(status, DEEP))
    async with upstream.serving() as url:
        _, base = await start_gateway(settings_for(url))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
            method = s.get if path.endswith("models") else s.post
            kwargs = {} if path.endswith("models") else {"json": chat_body(stream=False)}
            async with method(base.removesuffix("/api/v1") + path, headers=AUTH,
                              **kwargs) as r:  # type: ignore[operator]
                got, raw = r.status, await r.read()
    assert got == want_status, raw
    err = error_of(raw)
    assert err["code"] == want_code or err["type"] == want_code, err
    assert b'"a"' not in raw  # nothing of the answer is echoed
    [line] = access_lines(caplog, path)
    assert line["status"] == want_status


async def test_an_unreachable_upstream_is_502_after_bounded_retries(
        start_gateway: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    _, base = await start_gateway(settings_for(f"http://127.0.0.1:{free_port()}/v1",
                                               upstream={"max_retries": 2,
                                                         "retry_backoff_seconds": 0.01}))
    status, _, raw = await post(base, chat_body(stream=True, text=TEXT),
                                {"Accept": "application/json"})
    assert status == 502 and error_of(raw)["code"] == "upstream_unreachable"
    [line] = access_lines(caplog, ROUTE)
    assert (line["outcome"], line["error"]) == ("upstream_error", "upstream_unreachable")
    assert upstream_errors(await scrape(base)) == {"unreachable": 1}


# --- retries ----------------------------------------------------------------------------------

def tagged(mock_upstream: Upstream, tag: str) -> int:
    """Requests the mock saw carrying this ``tag``."""
    return sum(1 for r in mock_upstream.state.requests
               if isinstance(r["body"], dict) and r["body"].get("mock", {}).get("tag") == tag)


@pytest.mark.parametrize("max_retries", [0, 2])
async def test_retries_before_streaming_are_bounded_by_max_retries(
        mock_upstream: Upstream, start_gateway: Any, max_retries: int) -> None:
    _, base = await start_gateway(settings_for(mock_upstream.url, upstream={
        "max_retries": max_retries, "retry_backoff_seconds": 0.01}))
    status, _, _ = await post(base, chat_body(stream=True, text=TEXT, status=503,
                                              tag="always"))
    assert status == 503
    assert tagged(mock_upstream, "always") == 1 + max_retries


async def test_a_retried_request_succeeds_and_costs_the_client_one_token(
        mock_upstream: Upstream, start_gateway: Any) -> None:
    _, base = await start_gateway(settings_for(
        mock_upstream.url, upstream={"max_retries": 2, "retry_backoff_seconds": 0.01},
        keys=[{"name": "alice", "key": KEY, "burst": 5, "requests_per_minute": 1}]))
    status, headers, raw = await post(base, chat_body(stream=True, text=TEXT, fail_first=2,
                                                      tag="flaky"))
    assert status == 200 and raw == b"".join(CLEAN)  # the third try, relayed whole
    assert tagged(mock_upstream, "flaky") == 3
    assert headers["x-ratelimit-remaining-requests"] == "4"  # one token for three tries
    # Retries that all fail cost one token too; the refusal passes with its true status.
    status, headers, _ = await post(base, chat_body(stream=True, text=TEXT, fail_first=5,
                                                    tag="down"))
    assert status == 503 and tagged(mock_upstream, "down") == 3
    assert headers["x-ratelimit-remaining-requests"] == "3"


async def test_nothing_is_retried_once_an_event_reached_the_client(
        mock_upstream: Upstream, start_gateway: Any) -> None:
    _, base = await start_gateway(settings_for(mock_upstream.url, upstream={
        "max_retries": 3, "retry_backoff_seconds": 0.01}))
    status, _, raw = await post(base, chat_body(stream=True, text=TEXT, disconnect_after=3,
                                                chunk_delay=0.05, tag="reset"))
    assert status == 200 and b"[DONE]" not in raw
    assert error_of(sse_events(raw)[-1])["code"] == "upstream_bad_stream"
    await asyncio.sleep(0.2)  # a retry, were there one, would have started by now
    assert tagged(mock_upstream, "reset") == 1


async def test_a_retry_after_keepalive_comments_still_sends_the_stream_once(
        mock_upstream: Upstream, start_gateway: Any) -> None:
    """Comments carry no content: once the gateway has committed 200 to ping a slow upstream,
    a retry can still happen, and the client gets the one stream, whole."""
    _, base = await start_gateway(settings_for(
        mock_upstream.url, stream={"keepalive_seconds": 0.1},
        upstream={"max_retries": 1, "retry_backoff_seconds": 0.01}))
    status, _, raw = await post(base, chat_body(stream=True, text=TEXT, headers_delay=0.3,
                                                fail_first=1, tag="slow"))
    assert status == 200 and tagged(mock_upstream, "slow") == 2
    assert raw.startswith(b": keep-alive\n")
    assert sse_events(raw) == CLEAN


# --- what the OpenAI SDK sees -----------------------------------------------------------------

SDK_FAULTS = ["reset", "error_event", "no_done"]


@pytest.mark.parametrize("name", SDK_FAULTS)
async def test_the_sdk_raises_api_error_with_the_gateways_message_mid_stream(
        mock_upstream: Upstream, start_gateway: Any, name: str) -> None:
    fault = MID_STREAM[name]
    _, base = await start_gateway(settings_for(mock_upstream.url))
    aclient = AsyncOpenAI(base_url=f"{base}/api/v1", api_key=KEY, max_retries=0)
    received = []
    messages: Any = HI
    with pytest.raises(openai.APIError, match=fault.message):
        stream = await aclient.chat.completions.create(
            model="grok-4", messages=messages, stream=True, extra_body={"mock": fault.mock})
        async for chunk in stream:
            received.append(chunk)
    assert received  # the chunks before the failure did arrive
    await aclient.close()

    def sync() -> None:
        with OpenAI(base_url=f"{base}/api/v1", api_key=KEY, max_retries=0) as client:
            for _ in client.chat.completions.create(model="grok-4", messages=messages,
                                                    stream=True,
                                                    extra_body={"mock": fault.mock}):
                pass

    with pytest.raises(openai.APIError, match=fault.message):
        await asyncio.to_thread(sync)
