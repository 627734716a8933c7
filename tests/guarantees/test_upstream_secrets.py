"""The operator's upstream key never reaches a client, a log line or ``/metrics``, whatever the
upstream echoes and wherever it puts it; and what the upstream answers is bounded.

The mock upstream echoes the key it was sent (``echo_auth``) into each place an upstream's
answer can carry to a client: an error's ``message``, ``type``, ``code`` and ``param``, the
``code`` of xAI's own error shape, the ``Retry-After`` and ``retry-after-ms`` headers, a
redirect's ``Location``, a non-JSON body cut where the key straddles the cut, an error event
inside a stream. Each answer is then searched everywhere it could surface: the client's body
and headers, every log line (the access log included) and ``/metrics``, for any eight
characters of the key. The key looks like no known key format, so only the gateway's knowledge
of its own key can take it out, not a pattern.

A plain answer is held whole before it is sent on: one longer than ``[upstream]
max_answer_bytes`` is a 502, refused as it passes the cap, its connection closed so that the
upstream stops sending.
"""

from __future__ import annotations

import email.utils
import logging
import time
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.appkeys import UPSTREAMS

from clients import AUTH, chat_body, sse_events
from conftest import Upstream, settings_for
from observe import access_lines, error_of, wait_until

OPERATOR_KEY = "opk-9Fq3Zr7Lx2Vb8Nm4Tw6Hy1"
"""Like no key format: only redaction by the gateway's own key can catch it."""
PIECES = {OPERATOR_KEY[i:i + 8] for i in range(len(OPERATOR_KEY) - 7)}
CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"


@pytest.fixture
async def gateway_app(mock_upstream: Upstream, start_gateway: Any) -> tuple[web.Application, str]:
    return await start_gateway(settings_for(  # type: ignore[no-any-return]
        mock_upstream.url, upstream={"api_key": OPERATOR_KEY}))


@pytest.fixture
async def base(gateway_app: tuple[web.Application, str]) -> str:
    return gateway_app[1]


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def error(self) -> dict[str, Any]:
        """The error object, of a JSON body or of the last SSE frame."""
        frame = sse_events(self.body)[-1] if self.body.startswith((b"data:", b"event:")) \
            else self.body
        if frame.startswith(b"event:"):  # a Responses error event: its data line
            frame = frame.split(b"\n")[1]
        return error_of(frame.strip())


async def post(base: str, body: dict[str, Any], path: str = CHAT) -> Answer:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        async with s.post(f"{base}{path}", json=body, headers=AUTH,
                          allow_redirects=False) as r:
            return Answer(r.status, dict(r.headers), await r.read())


async def metrics_text(base: str) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/metrics") as r:
            return await r.text()


async def assert_key_nowhere(base: str, answer: Answer, caplog: pytest.LogCaptureFixture
                             ) -> None:
    """No eight characters of the key in the body, the headers, any log line or /metrics."""
    places = {
        "body": answer.body.decode("utf-8", "replace"),
        "headers": "\n".join(f"{k}: {v}" for k, v in answer.headers.items()),
        "log": "\n".join(r.getMessage() for r in caplog.records),
        "metrics": await metrics_text(base),
    }
    for place, text in places.items():
        leaked = [piece for piece in PIECES if piece in text]
        assert not leaked, f"the key leaked into the {place}: {text[:500]}"


def one_line(caplog: pytest.LogCaptureFixture, route: str) -> dict[str, Any]:
    [line] = access_lines(caplog, route)
    return line


STREAM = pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])


@STREAM
@pytest.mark.parametrize("field", ["type", "code", "param"])
@pytest.mark.parametrize("status", [400, 404, 422, 429])
async def test_a_4xx_error_field_echoing_the_key_reaches_no_client_log_or_metric(
        base: str, mock_upstream: Upstream, caplog: pytest.LogCaptureFixture, status: int,
        field: str, stream: bool) -> None:
    """The fields that are not echoed pass as they came: the message (it describes the
    client's request) and a code that is an identifier. (OpenAI's error shape: xAI's has no
    ``type`` or ``param``.)"""
    caplog.set_level(logging.DEBUG)
    answer = await post(base, chat_body(stream=stream, status=status, echo_auth=[field],
                                        message="the request was refused",
                                        error_code="context_length", error_shape="openai"))
    assert answer.status == status
    code = ("rate_limit_exceeded" if status == 429 else f"upstream_http_{status}") \
        if field == "code" else "context_length"
    assert answer.error() == {
        "message": "the request was refused",
        "type": "rate_limit_error" if status == 429 else "invalid_request_error",
        "param": "[redacted]" if field == "param" else None, "code": code}
    assert one_line(caplog, CHAT)["error"] == code
    await assert_key_nowhere(base, answer, caplog)
    # The upstream did get the key: redaction is on the way back only.
    assert mock_upstream.state.requests[-1]["headers"]["Authorization"] == \
        f"Bearer {OPERATOR_KEY}"


@STREAM
@pytest.mark.parametrize("status", [400, 429, 500])
async def test_the_code_of_xais_own_error_shape_echoing_the_key_is_dropped(
        base: str, caplog: pytest.LogCaptureFixture, status: int, stream: bool) -> None:
    caplog.set_level(logging.DEBUG)
    answer = await post(base, chat_body(stream=stream, status=status, error_shape="xai",
                                        echo_auth=["code"], message="no such thing"))
    assert answer.status == status
    code = answer.error()["code"]
    assert code == ("rate_limit_exceeded" if status == 429 else f"upstream_http_{status}")
    assert one_line(caplog, CHAT)["error"] == code
    await assert_key_nowhere(base, answer, caplog)


@STREAM
@pytest.mark.parametrize("header", ["Retry-After", "retry-after-ms"])
@pytest.mark.parametrize("status", [429, 503])
async def test_a_retry_header_echoing_the_key_is_dropped(
        base: str, caplog: pytest.LogCaptureFixture, header: str, status: int,
        stream: bool) -> None:
    caplog.set_level(logging.DEBUG)
    answer = await post(base, chat_body(stream=stream, status=status, echo_auth=[header]))
    assert answer.status == status
    assert header.lower() not in {k.lower() for k in answer.headers}
    await assert_key_nowhere(base, answer, caplog)


@STREAM
async def test_retry_headers_pass_as_the_numbers_they_hold_a_date_as_seconds(
        base: str, stream: bool) -> None:
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    answer = await post(base, chat_body(stream=stream, status=429, error_headers={
        "Retry-After": in_a_minute, "retry-after-ms": "6500"}))
    assert answer.status == 429 and answer.headers["retry-after-ms"] == "6500"
    assert 55 <= int(answer.headers["Retry-After"]) <= 61


@STREAM
@pytest.mark.parametrize("key_at", [0, 190, 195, 4000])
async def test_a_non_json_error_body_is_never_echoed_and_its_logged_detail_is_redacted(
        base: str, caplog: pytest.LogCaptureFixture, key_at: int, stream: bool) -> None:
    """The key straddles the old 200-byte cut (190, 195), or sits anywhere else."""
    caplog.set_level(logging.DEBUG)
    answer = await post(base, chat_body(stream=stream, status=502, error_text_bytes=5000,
                                        key_at=key_at))
    assert answer.status == 502
    assert answer.error() == {"message": "The upstream failed (HTTP 502)",
                              "type": "upstream_error", "param": None,
                              "code": "upstream_http_502"}
    [detail] = [r.getMessage() for r in caplog.records
                if r.name == "gateway.upstream" and "withheld" in r.getMessage()]
    assert "HTTP 502" in detail and "xxxx" in detail
    await assert_key_nowhere(base, answer, caplog)


@STREAM
@pytest.mark.parametrize("status", [400, 404])
async def test_a_non_json_4xx_body_gets_a_generic_message(
        base: str, caplog: pytest.LogCaptureFixture, status: int, stream: bool) -> None:
    caplog.set_level(logging.DEBUG)
    answer = await post(base, chat_body(stream=stream, status=status, error_text_bytes=300,
                                        key_at=150))
    assert answer.status == status
    err = answer.error()
    assert (err["message"], err["code"]) == (f"The upstream refused the request (HTTP {status})",
                                             f"upstream_http_{status}")
    await assert_key_nowhere(base, answer, caplog)


@STREAM
@pytest.mark.parametrize("status", [500, 503])
async def test_a_5xx_message_with_a_stack_trace_and_a_host_reaches_only_one_log_line(
        base: str, caplog: pytest.LogCaptureFixture, status: int, stream: bool) -> None:
    caplog.set_level(logging.DEBUG)
    trace = ('Traceback (most recent call last):\n  File "/srv/xai/router.py", line 88\n'
             "ConnectionError: inference-7.internal.x.ai:8443 refused")
    answer = await post(base, chat_body(stream=stream, status=status, message=trace,
                                        echo_auth=["param"], error_shape="openai"))
    assert answer.status == status
    assert answer.error() == {"message": f"The upstream failed (HTTP {status})",
                              "type": "upstream_error", "param": None,
                              "code": f"upstream_http_{status}"}
    for internal in (b"Traceback", b"router.py", b"internal.x.ai", b"8443"):
        assert internal not in answer.body
    details = [r for r in caplog.records if "internal.x.ai" in r.getMessage()]
    assert len(details) == 1 and details[0].levelno == logging.WARNING
    assert "\n" not in details[0].getMessage() and "[redacted]" in details[0].getMessage()
    await assert_key_nowhere(base, answer, caplog)


@STREAM
@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_an_upstream_redirect_is_a_502_in_the_error_shape_with_no_location(
        base: str, caplog: pytest.LogCaptureFixture, status: int, stream: bool) -> None:
    caplog.set_level(logging.DEBUG)
    answer = await post(base, chat_body(stream=stream, status=status, echo_auth=["Location"],
                                        message="moved"))
    assert answer.status == 502
    assert answer.error() == {"message": f"The upstream answered with an unexpected status "
                                         f"(HTTP {status})", "type": "upstream_error",
                              "param": None, "code": "upstream_bad_status"}
    assert "location" not in {k.lower() for k in answer.headers}
    assert one_line(caplog, CHAT)["error"] == "upstream_bad_status"
    await assert_key_nowhere(base, answer, caplog)


async def test_the_code_of_an_error_event_inside_a_chat_stream_echoing_the_key_is_dropped(
        base: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    answer = await post(base, chat_body(stream=True, error_after=2, echo_auth=["code"]))
    assert answer.status == 200
    err = answer.error()
    assert (err["code"], err["message"]) == ("upstream_error",
                                             "Upstream error: mock mid-stream failure")
    assert one_line(caplog, CHAT)["error"] == "upstream_error"
    await assert_key_nowhere(base, answer, caplog)


async def test_the_code_of_an_error_event_inside_a_responses_stream_echoing_the_key_is_dropped(
        base: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    answer = await post(base, {"model": "grok-4", "input": "hi", "stream": True,
                               "mock": {"error_after": 2, "echo_auth": ["code"]}},
                        path=RESPONSES)
    assert answer.status == 200
    assert sse_events(answer.body)[-1].startswith(b"event: error\n")
    await assert_key_nowhere(base, answer, caplog)


MAX_ANSWER = 256 * 1024
HUGE = 128 * 1024 * 1024


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content_length"])
async def test_a_plain_answer_over_max_answer_bytes_is_a_502_and_its_connection_is_let_go(
        mock_upstream: Upstream, start_gateway: Any, caplog: pytest.LogCaptureFixture,
        chunked: bool) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    app, base = await start_gateway(settings_for(mock_upstream.url, upstream={
        "max_answer_bytes": MAX_ANSWER}))
    state = mock_upstream.state
    answer = await post(base, chat_body(stream=False, answer_bytes=HUGE,
                                        answer_chunked=chunked))
    assert answer.status == 502
    err = answer.error()
    assert (err["type"], err["code"]) == ("upstream_error", "upstream_answer_too_large")
    assert "longer than" in err["message"] and str(MAX_ANSWER) in err["message"]
    assert one_line(caplog, CHAT)["error"] == "upstream_answer_too_large"
    # The gateway closed the connection as the cap was passed: the upstream's writes fail long
    # before the 128 MiB are out, so nothing near them was ever read, let alone buffered.
    await wait_until(lambda: state.disconnects == 1, 5, "the upstream saw the connection end")
    assert state.answer_bytes_sent < 32 * 1024 * 1024
    pool = app[UPSTREAMS].members[0].client.pool
    assert pool is not None
    await wait_until(lambda: pool.open_connections == 0, 2, "no upstream connection kept")
    # And the gateway goes on: an answer within the cap passes.
    answer = await post(base, chat_body(stream=False, answer_bytes=MAX_ANSWER,
                                        answer_chunked=chunked))
    assert answer.status == 200 and len(answer.body) == MAX_ANSWER


ESCAPED_KEY = "".join(f"\\u{ord(c):04x}" if c == "-" else c for c in OPERATOR_KEY)
"""The key as JSON can spell it: every reader decodes it to the key itself."""


@pytest.mark.parametrize("spelled", ['"error"', '"\\u0065rror"', '"err\\u006fr"'])
async def test_an_error_event_however_its_key_is_spelled_ends_the_stream_with_the_gateways_frame(
        base: str, caplog: pytest.LogCaptureFixture, spelled: str) -> None:
    caplog.set_level(logging.DEBUG)
    event = f'data: {{{spelled}: {{"message": "echo {OPERATOR_KEY}", "code": "{ESCAPED_KEY}"}}}}'
    answer = await post(base, chat_body(stream=True, inject_after=3,
                                        inject_hex=(event + "\n\n").encode().hex()))
    events = sse_events(answer.body)
    assert answer.status == 200 and len(events) == 4 and b"[DONE]" not in answer.body
    assert answer.error() == {"message": "Upstream error: echo [redacted]",
                              "type": "upstream_error", "param": None, "code": "upstream_error"}
    await assert_key_nowhere(base, answer, caplog)


async def test_a_responses_event_carrying_an_escaped_error_member_ends_with_the_gateways_event(
        base: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    event = ('event: response.output_text.delta\ndata: {"type": "response.output_text.delta", '
             f'"\\u0065rror": {{"message": "echo {OPERATOR_KEY}", "code": "rate_limited"}}}}\n\n')
    answer = await post(base, {"model": "grok-4", "input": "hi", "stream": True, "mock": {
        "inject_after": 3, "inject_hex": event.encode().hex()}}, RESPONSES)
    last = sse_events(answer.body)[-1]
    assert answer.status == 200 and last.startswith(b"event: error\n")
    assert answer.error()["message"] == "Upstream error: echo [redacted]"
    assert answer.error()["code"] == "rate_limited"
    await assert_key_nowhere(base, answer, caplog)


@STREAM
async def test_an_answer_whose_content_echoes_the_key_gets_it_taken_out(
        base: str, caplog: pytest.LogCaptureFixture, stream: bool) -> None:
    caplog.set_level(logging.DEBUG)
    answer = await post(base, chat_body(stream=stream, text=f"the key is {OPERATOR_KEY} ok"))
    assert answer.status == 200
    assert b"[redacted]" in answer.body
    await assert_key_nowhere(base, answer, caplog)


async def test_a_stream_event_spelling_the_key_with_escapes_gets_it_taken_out(
        base: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    event = f'data: {{"choices": [{{"index": 0, "delta": {{"content": "{ESCAPED_KEY}"}}}}]}}\n\n'
    answer = await post(base, chat_body(stream=True, inject_after=2,
                                        inject_hex=event.encode().hex()))
    assert answer.status == 200 and answer.body.endswith(b"data: [DONE]\n\n")
    decoded = [orjson.loads(e[6:]) for e in sse_events(answer.body)[:-1]]
    assert decoded[2]["choices"][0]["delta"]["content"] == "[redacted]"
    await assert_key_nowhere(base, answer, caplog)
