"""Errors tell a client what went wrong and nothing more: never the operator's upstream key
(even when the upstream's own error message echoes it), never an internal address (the
upstream's or Redis's host and port), never a stack trace.

The generic 500 path: after the fixes of this issue, no input found reaches it (an upstream that
answers garbage instead of HTTP used to: it is a 502 now, see ``test_upstream_faults.py``). So
the last tests plant a bug, a real route on the real app whose handler raises, and a rewrite
that raises mid-stream, and check what the client gets through the real middleware and relay.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.appkeys import PROXY
from gateway.request_body import json_body

from clients import AUTH, sse_events
from conftest import Upstream, settings_for
from observe import access_lines, error_of
from servers import free_port

# No key-like prefix: only the gateway's knowledge of its own key can redact it.
OPERATOR_KEY = "operator-7Hq2Lw9ZxK4m"
SECRETS = (OPERATOR_KEY, "xai-another-credential-123456")
MESSAGES = [{"role": "user", "content": "hi"}]


def echoing(status: int) -> dict[str, Any]:
    return {"status": status, "message": f"invalid key {OPERATOR_KEY}; "
                                         f"also xai-another-credential-123456"}


def assert_no_secret(text: str | bytes) -> None:
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    for secret in SECRETS:
        assert secret not in text, f"{secret} leaked: {text[:300]}"


@pytest.fixture
async def base(mock_upstream: Upstream, start_gateway: Any) -> str:
    _, url = await start_gateway(settings_for(mock_upstream.url,
                                              upstream={"api_key": OPERATOR_KEY}))
    return url  # type: ignore[no-any-return]


async def post(base: str, body: dict[str, Any], path: str = "/v1/chat/completions",
               headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}{path}", json=body, headers={**AUTH, **(headers or {})}) as r:
            return r.status, await r.read()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("status", [400, 404, 429, 500, 503])
async def test_an_upstream_error_status_that_echoes_the_upstream_key_is_redacted(
        base: str, mock_upstream: Upstream, caplog: pytest.LogCaptureFixture, status: int,
        stream: bool) -> None:
    caplog.set_level(logging.DEBUG)
    got, raw = await post(base, {"model": "grok-4", "messages": MESSAGES, "stream": stream,
                                 "mock": echoing(status)})
    assert got == status
    message = error_of(raw)["message"]
    if status < 500:
        assert "[redacted]" in message
    else:  # a 5xx's message goes to the log only (redacted); the client gets a generic one
        assert message == f"The upstream failed (HTTP {status})"
    assert_no_secret(raw)
    assert_no_secret(caplog.text)
    # The upstream did get the key: redaction is on the way back only.
    assert mock_upstream.state.requests[-1]["headers"]["Authorization"] == \
        f"Bearer {OPERATOR_KEY}"


def injected(event: bytes) -> dict[str, Any]:
    return {"inject_after": 2, "inject_hex": event.hex()}


async def test_a_mid_stream_error_event_that_echoes_the_upstream_key_is_redacted(
        base: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    event = b"data: " + orjson.dumps({"error": {"message": f"bad credentials {OPERATOR_KEY}",
                                                "type": "server_error"}}) + b"\n\n"
    status, raw = await post(base, {"model": "grok-4", "messages": MESSAGES, "stream": True,
                                    "mock": injected(event)})
    assert status == 200
    assert error_of(sse_events(raw)[-1])["message"] == "Upstream error: bad credentials [redacted]"
    assert_no_secret(raw)
    assert_no_secret(caplog.text)


@pytest.mark.parametrize("name", [b"error", b"response.failed"])
async def test_a_responses_api_failure_event_that_echoes_the_upstream_key_is_redacted(
        base: str, name: bytes) -> None:
    message = f"bad credentials {OPERATOR_KEY}"
    data = {"type": "error", "code": "auth", "message": message, "error": {"message": message}} \
        if name == b"error" else {"type": "response.failed", "response": {
            "status": "failed", "error": {"code": "auth", "message": message}}}
    event = b"event: " + name + b"\ndata: " + orjson.dumps(data) + b"\n\n"
    status, raw = await post(base, {"model": "grok-4", "input": "hi", "stream": True,
                                    "mock": injected(event)}, path="/v1/responses")
    assert status == 200
    last = sse_events(raw)[-1]
    assert last.startswith(b"event: " + name + b"\n") and b"[redacted]" in last
    assert_no_secret(raw)


async def test_an_unreachable_upstream_and_redis_are_not_named_by_address(
        start_gateway: Any, caplog: pytest.LogCaptureFixture) -> None:
    upstream_port, redis_port = free_port(), free_port()
    _, url = await start_gateway(settings_for(
        f"http://127.0.0.1:{upstream_port}/v1", upstream={"max_retries": 0},
        redis={"url": f"redis://127.0.0.1:{redis_port}/0", "key_prefix": "gwtest-unreachable",
               "failure_policy": "fail_closed", "timeout_seconds": 0.2}))
    bodies = []
    async with aiohttp.ClientSession() as s:
        for stream in (False, True):
            async with s.post(f"{url}/v1/chat/completions", headers=AUTH, json={
                    "model": "grok-4", "messages": MESSAGES, "stream": stream}) as r:
                assert r.status == 503  # Redis first: fail_closed refuses
                bodies.append(await r.read())
        async with s.get(f"{url}/readyz") as r:
            assert r.status == 503
            bodies.append(await r.read())
    _, open_url = await start_gateway(settings_for(f"http://127.0.0.1:{upstream_port}/v1",
                                                   upstream={"max_retries": 0}))
    async with aiohttp.ClientSession() as s:
        for stream in (False, True):
            async with s.post(f"{open_url}/v1/chat/completions", headers=AUTH, json={
                    "model": "grok-4", "messages": MESSAGES, "stream": stream}) as r:
                assert r.status == 502
                body = await r.read()
                assert error_of(body)["code"] == "upstream_unreachable"  # JSON: no Accept
                bodies.append(body)
    for body in bodies:
        for address in ("127.0.0.1", str(upstream_port), str(redis_port), "redis://"):
            assert address.encode() not in body, (address, body)


@contextlib.asynccontextmanager
async def gateway_with_a_bug(upstream_url: str) -> AsyncIterator[str]:
    """The real app, with two routes whose code raises: one before answering, one in the
    middle of a stream (a rewrite of the third event)."""
    app = create_app(settings_for(upstream_url, upstream={"api_key": OPERATOR_KEY}),
                     environ={})
    bug = RuntimeError(f"bug near 10.1.2.3:6379 holding {OPERATOR_KEY}")

    async def broken(request: web.Request) -> web.StreamResponse:
        await json_body(request)
        raise bug

    async def broken_mid_stream(request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        seen = []

        def rewrite(obj: Any) -> None:
            seen.append(obj)
            if len(seen) == 3:
                raise bug
        proxy = request.app[PROXY]
        call = proxy.post(request, "chat/completions", body)
        return await proxy.stream(request, call, rewrite=rewrite)

    app.router.add_post("/v1/broken", broken)
    app.router.add_post("/v1/broken-stream", broken_mid_stream)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def assert_no_internals(raw: bytes) -> None:
    assert_no_secret(raw)
    for internal in (b"Traceback", b"RuntimeError", b"bug near", b"10.1.2.3", b'File "'):
        assert internal not in raw, raw


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_bug_before_the_answer_is_a_generic_500_with_no_stack_trace(
        mock_upstream: Upstream, caplog: pytest.LogCaptureFixture, stream: bool) -> None:
    caplog.set_level(logging.INFO)
    async with gateway_with_a_bug(mock_upstream.url) as url:
        status, raw = await post(url, {"model": "grok-4", "messages": MESSAGES,
                                       "stream": stream}, path="/v1/broken")
    assert status == 500
    err = error_of(raw)  # JSON either way: no Accept names the event stream
    assert (err["code"], err["message"]) == ("internal_error",
                                             "The gateway failed to handle this request")
    assert_no_internals(raw)
    assert "Traceback" in caplog.text and "bug near" in caplog.text  # the operator's to read
    [line] = access_lines(caplog, "/v1/broken")
    assert (line["status"], line["outcome"], line["error"]) == (500, "error", "internal_error")


async def test_a_bug_mid_stream_ends_the_stream_with_one_generic_frame(
        mock_upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with gateway_with_a_bug(mock_upstream.url) as url:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            async with s.post(f"{url}/v1/broken-stream", headers=AUTH, json={
                    "model": "grok-4", "messages": MESSAGES, "stream": True,
                    "mock": {"chunk_delay": 0.02}}) as r:
                assert r.status == 200
                raw = await r.read()  # ends: the client is not left waiting
    events = sse_events(raw)
    assert error_of(events[-1]) == {"message": "The gateway failed to handle this request",
                                    "type": "server_error", "param": None,
                                    "code": "internal_error"}
    assert sum(b'"error"' in e for e in events) == 1 and b"[DONE]" not in raw
    assert_no_internals(raw)
    assert "Traceback" in caplog.text and "bug near" in caplog.text
    [line] = access_lines(caplog, "/v1/broken-stream")
    assert (line["status"], line["outcome"], line["error"]) == (200, "error", "internal_error")
