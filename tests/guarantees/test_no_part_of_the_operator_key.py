"""Nothing of the operator's key reaches a client, a log line or ``/metrics``: not the whole key,
and no eight consecutive characters of it, wherever a hostile upstream puts them.

The mock upstream echoes the key it was sent (``echo_auth``), whole or in part
(``echo_slice``: less a few characters at either end, or eight from its middle), outside the
``data:`` lines of a stream (a comment of its own or inside an event, an ``event:``, ``id:`` or
``retry:`` line, after a Responses event's name), in an answer's text (plain and streamed), and
in an error's ``message``, ``param`` and ``code``. The key has no ``sk-`` or ``xai-`` prefix:
only the gateway's knowledge of its own key can take it out. Each answer is read by a real
client through a real gateway, and its raw bytes, every log line and ``/metrics`` are searched
for every eight characters of the key.

And the client gets JSON or SSE, never what else an upstream answers: a ``200`` plain answer
that is not JSON (an HTML page) is a 502 in the error shape, with nothing of it shown.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.mock.upstream import DEFAULT_TEXT

from clients import AUTH, chat_body, in_thread, sse_events
from conftest import Upstream, settings_for
from observe import access_lines, error_of

OPERATOR_KEY = "opk-9Fq3Zr7Lx2Vb8Nm4Tw6Hy1"
PIECES = {OPERATOR_KEY[i:i + 8] for i in range(len(OPERATOR_KEY) - 7)}
PARTS = {"whole": None, "less_the_last_3": [None, -3], "less_the_first_2": [2, None],
         "less_3_at_each_end": [3, -3], "eight_from_the_middle": [6, 14]}
CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
LINES = ["comment", "comment_line", "event", "id", "retry"]


@pytest.fixture
async def base(mock_upstream: Upstream, start_gateway: Any) -> str:
    _, url = await start_gateway(settings_for(mock_upstream.url,
                                              upstream={"api_key": OPERATOR_KEY}))
    return url  # type: ignore[no-any-return]


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def data(self) -> list[Any]:
        """Each ``data:`` line's JSON, as a client reads it."""
        return [orjson.loads(line[6:]) for line in self.body.split(b"\n")
                if line.startswith(b"data: {")]


async def post(base: str, body: dict[str, Any], path: str = CHAT) -> Answer:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        async with s.post(f"{base}{path}", json=body, headers=AUTH) as r:
            return Answer(r.status, dict(r.headers), await r.read())


async def assert_no_part_of_the_key(base: str, answer: Answer,
                                    caplog: pytest.LogCaptureFixture) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/metrics") as r:
            metrics = await r.text()
    places = {
        "the body": answer.body.decode("utf-8", "replace"),
        "the headers": "\n".join(f"{k}: {v}" for k, v in answer.headers.items()),
        "a log line": "\n".join(r.getMessage() for r in caplog.records),
        "/metrics": metrics,
    }
    for place, text in places.items():
        leaked = sorted(piece for piece in PIECES if piece in text)
        assert not leaked, f"{leaked} in {place}: {text[:600]}"


def mock(part: str, *places: str, **more: Any) -> dict[str, Any]:
    return {"echo_auth": list(places), "echo_slice": PARTS[part], **more}


def streamed_text(answer: Answer) -> str:
    return "".join(c["delta"].get("content") or "" for d in answer.data()
                   for c in d.get("choices", []))


PART = pytest.mark.parametrize("part", list(PARTS))


@PART
@pytest.mark.parametrize("place", LINES)
async def test_a_chat_stream_echoing_the_key_outside_its_data_lines_reaches_no_client(
        base: str, caplog: pytest.LogCaptureFixture, place: str, part: str) -> None:
    caplog.set_level(logging.DEBUG)
    answer = await post(base, chat_body(stream=True, **mock(part, place)))
    assert answer.status == 200 and answer.body.endswith(b"data: [DONE]\n\n")
    assert streamed_text(answer) == DEFAULT_TEXT  # every event still there, its data whole
    await assert_no_part_of_the_key(base, answer, caplog)


@PART
@pytest.mark.parametrize("place", [*LINES, "event_name"])
async def test_a_responses_stream_echoing_the_key_outside_its_data_lines_reaches_no_client(
        base: str, caplog: pytest.LogCaptureFixture, place: str, part: str) -> None:
    caplog.set_level(logging.DEBUG)
    answer = await post(base, {"model": "grok-4", "input": "hi", "stream": True,
                               "mock": mock(part, place)}, RESPONSES)
    assert answer.status == 200
    data = answer.data()
    assert data[-1]["type"] == "response.completed"
    assert data[-1]["response"]["output"][0]["content"][0]["text"] == DEFAULT_TEXT
    names = [e.split(b"\n", 1)[0] for e in sse_events(answer.body)]
    assert len(names) == len(data)  # every event still has its one name line
    if place == "event_name":  # the name is kept, the key after it redacted
        assert names[1] == b"event: response.in_progress [redacted]"
    await assert_no_part_of_the_key(base, answer, caplog)


async def test_every_line_at_once_and_the_sdk_still_reads_the_whole_answer(
        base: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    answer = await post(base, chat_body(stream=True, **mock("less_the_last_3", *LINES)))
    await assert_no_part_of_the_key(base, answer, caplog)

    def read(client: Any) -> str:
        stream = client.chat.completions.create(
            model="grok-4", messages=[{"role": "user", "content": "hi"}], stream=True,
            extra_body={"mock": mock("less_the_last_3", *LINES)})
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    assert await in_thread(f"{base}", read) == DEFAULT_TEXT


@PART
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("path", [CHAT, RESPONSES], ids=["chat", "responses"])
async def test_an_answer_whose_text_echoes_the_key_has_the_run_taken_out(
        base: str, caplog: pytest.LogCaptureFixture, path: str, stream: bool,
        part: str) -> None:
    caplog.set_level(logging.DEBUG)
    body: dict[str, Any] = {"model": "grok-4", "stream": stream, "mock": mock(part, "text")}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if path == CHAT
                else {"input": "hi"})
    answer = await post(base, body, path)
    assert answer.status == 200
    text = streamed_text(answer) if path == CHAT and stream else answer.body.decode()
    assert "the key is [redacted] as it was sent" in text  # one run, taken out as one
    await assert_no_part_of_the_key(base, answer, caplog)


@PART
@pytest.mark.parametrize("field", ["message", "param", "code"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("status", [400, 429])
async def test_an_error_field_echoing_part_of_the_key_reaches_no_client_log_or_metric(
        base: str, caplog: pytest.LogCaptureFixture, status: int, stream: bool, field: str,
        part: str) -> None:
    caplog.set_level(logging.DEBUG)
    answer = await post(base, chat_body(stream=stream, status=status, error_shape="openai",
                                        **mock(part, field)))
    assert answer.status == status
    frame = sse_events(answer.body)[-1] if stream else answer.body
    err = error_of(frame)
    if field == "message":
        assert err["message"] == "[redacted]"
    elif field == "param":
        assert err["param"] == "[redacted]"
    else:  # not an identifier once redacted: the gateway's own code
        assert err["code"] == ("rate_limit_exceeded" if status == 429
                               else f"upstream_http_{status}")
    [line] = access_lines(caplog, CHAT)
    assert line["error"] == err["code"]
    await assert_no_part_of_the_key(base, answer, caplog)


@PART
@pytest.mark.parametrize("field", ["message", "code"])
@pytest.mark.parametrize("path", [CHAT, RESPONSES], ids=["chat", "responses"])
async def test_an_error_event_inside_a_stream_echoing_part_of_the_key_is_redacted(
        base: str, caplog: pytest.LogCaptureFixture, path: str, field: str, part: str) -> None:
    caplog.set_level(logging.DEBUG)
    body: dict[str, Any] = {"model": "grok-4", "stream": True,
                            "mock": mock(part, field, error_after=2)}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if path == CHAT
                else {"input": "hi"})
    answer = await post(base, body, path)
    assert answer.status == 200
    last = sse_events(answer.body)[-1]
    err = error_of(last.split(b"\n")[-3] if last.startswith(b"event:") else last.strip())
    if field == "message":
        assert err["message"] == "Upstream error: [redacted]"
    else:
        assert err["code"] == "upstream_error"
    await assert_no_part_of_the_key(base, answer, caplog)


# --- The client gets JSON or SSE ---------------------------------------------------------------

@pytest.mark.parametrize("path", [CHAT, RESPONSES], ids=["chat", "responses"])
async def test_a_200_plain_answer_that_is_not_json_is_a_502_showing_nothing_of_it(
        base: str, mock_upstream: Upstream, caplog: pytest.LogCaptureFixture,
        path: str) -> None:
    caplog.set_level(logging.DEBUG)
    body: dict[str, Any] = {"model": "grok-4", "stream": False, "mock": {
        "status": 200, "error_text_bytes": 3000, "key_at": 100}}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if path == CHAT
                else {"input": "hi"})
    answer = await post(base, body, path)
    assert answer.status == 502
    assert answer.headers["Content-Type"].startswith("application/json")
    assert error_of(answer.body) == {
        "message": "The upstream answered with something that is not JSON",
        "type": "upstream_error", "param": None, "code": "upstream_bad_stream"}
    assert b"xxxx" not in answer.body
    logged = [r for r in caplog.records if r.name == "gateway.upstream"]
    assert len(logged) == 1 and "text/html" in logged[0].getMessage()
    [line] = access_lines(caplog, path)
    assert (line["status"], line["error"]) == (502, "upstream_bad_stream")
    await assert_no_part_of_the_key(base, answer, caplog)


async def test_a_200_plain_answer_in_json_passes_as_json_whatever_its_content_type(
        start_gateway: Any) -> None:
    """What is decided is the body, parsed: JSON goes out as ``application/json``."""
    async def labelled_html(request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"id": "c1", "object": "chat.completion",
                                               "choices": []}), content_type="text/html")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", labelled_html)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        _, url = await start_gateway(settings_for(
            f"http://127.0.0.1:{runner.addresses[0][1]}/v1"))
        answer = await post(url, chat_body(stream=False))
    finally:
        await runner.cleanup()
    assert answer.status == 200 and answer.headers["Content-Type"] == "application/json"
    assert orjson.loads(answer.body)["object"] == "chat.completion"
