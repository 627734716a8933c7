"""The render path under fuzzing: for any split of any upstream stream, the bytes the client gets
are exactly those of a reference that parses every event (``StreamRenderer(fast=False)``, fed
the whole stream at once). The streams mix what the shortcut must never get wrong: error
members however their key is spelled, ``usage`` as a key and as text, JSON that is not an
object, ``[DONE]`` mid-region, comments, multi-line frames, LF, CRLF or CR line endings (one
kind a stream, as an upstream sends them), invalid JSON, and the operator's key in an event,
whole or in part, in its data or on any other line: no eight characters of it reach the client.
"""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.stream.dialect import CHAT, RESPONSES, Dialect
from gateway.stream.render import StreamRenderer
from gateway.upstream.secrets import Secrets

SECRET = "xai-operator-secret-key"
PIECES = {SECRET[i:i + 8] for i in range(len(SECRET) - 7)}
PARTS = [SECRET[:-3], SECRET[2:], SECRET[3:-3], SECRET[5:13]]


def chunk(content: str, **extra: Any) -> bytes:
    obj = {"id": "c1", "object": "chat.completion.chunk", "model": "grok-4",
           "choices": [{"index": 0, "delta": {"content": content}}], **extra}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


texts = st.sampled_from(["hi", "error", '"error"', "usage", '"usage"', "\\u0065rror", "é漢🚀",
                         SECRET, f"key {SECRET}!", "sk-abcdefgh12345", *PARTS,
                         SECRET[:7], f"{SECRET[3:-3]}".replace("o", "\\u006f")])
lines = st.sampled_from([f": debug auth={p}\n" for p in (SECRET, *PARTS)] +
                        [f"{name}: {p}\n" for name in ("event", "id", "retry")
                         for p in (SECRET, PARTS[1], PARTS[3])] +
                        [": ping\n", "id: 7\n", "event: x\n", f"id: {SECRET[:7]}\n"]
                        ).map(str.encode)
usage = st.builds(lambda n: {"prompt_tokens": n, "completion_tokens": n, "total_tokens": 2 * n},
                  st.integers(0, 99))


def usage_chunk(u: Any) -> bytes:
    """The last chunk of a stream that asked for usage (``include_usage``)."""
    return b"data: " + orjson.dumps({"id": "c1", "object": "chat.completion.chunk",
                                     "choices": [], "usage": u}) + b"\n\n"


chat_events = st.one_of(
    texts.map(chunk),
    usage.map(usage_chunk),
    st.sampled_from([usage_chunk({}), usage_chunk(None), usage_chunk({"total_tokens": 3})[:-3]
                     + b', "usage": {"total_tokens": 4}}\n\n']),
    st.builds(lambda t, u: chunk(t, usage=u), texts, usage),
    st.builds(lambda t: chunk(t, usage=None), texts),
    st.sampled_from([
        b'data: {"error": {"message": "boom ' + SECRET.encode() + b'", "code": "oops"}}\n\n',
        b'data: {"\\u0065rror": {"message": "escaped", "code": "x"}}\n\n',
        b'data: {"e\\u0072ror": "bare string"}\n\n',
        b'data: {"error": null, "choices": []}\n\n',
        b'data: {"\\u0075sage": {"prompt_tokens": 5}}\n\n',
        b'data: ["usage"]\n\n',
        b'data: ["error"]\n\n',
        b"data: 42\n\n",
        b'data: "text"\n\n',
        b"data: [DONE]\n\n",
        b": keep-alive\n\n",
        b'data: {"a": 1},{"b": 2}\n\n',
        b"data: 0,[1\n\ndata: 2]\n\n",  # a value split across two events
        b'data: {"a":"x}\n\ndata: {"} ,{"b":1}\n\n',
        b"data: 123456789012345678901234567890\n\n",  # past simdjson's integers
        b"data: " + b"[" * 1024 + b"]" * 1024 + b"\n\n",  # at the nesting limit
        b'data: {"a":' * 1024 + b"1" + b"}" * 1024 + b"\n\n",
        b"data: \xef\xbb\xbf{}\n\n",  # a BOM, which simdjson skips
        b'data: {"usage": {}}\n\n',  # an empty usage does not undo an earlier one
        b'data: {"choices": [], "note": "' + SECRET.replace("-", "\\u002d").encode() + b'"}\n\n',
        b"data: {not json}\n\n",
        b'data: {\n  "id": "multi",\n  "choices": []\n}\n\n',
        b"event: x\n\n",
    ]),
    st.builds(lambda line, event: line + event, lines, texts.map(chunk)),
    st.builds(lambda line: line + b"\n", lines.filter(lambda line: line[:1] == b":")),
)

responses_events = st.one_of(
    st.builds(lambda t, n: b"event: response.output_text.delta\ndata: " + orjson.dumps(
        {"type": "response.output_text.delta", "delta": t, "sequence_number": n}) + b"\n\n",
        texts, st.integers(0, 9)),
    st.builds(lambda u: b"event: response.completed\ndata: " + orjson.dumps(
        {"type": "response.completed", "response": {"usage": u}}) + b"\n\n", usage),
    st.sampled_from([
        b'event: response.failed\ndata: {"type": "response.failed", "response": {"error": '
        b'{"message": "failed with ' + SECRET.encode() + b'"}}}\n\n',
        b'event: error\ndata: {"type": "error", "code": "bad", "message": "nope"}\n\n',
        b'event: response.in_progress\ndata: {"type": "response.in_progress", '
        b'"\\u0065rror": {"message": "hidden"}}\n\n',
        b"data: [DONE]\n\n",
        b": ping\n\n",
    ]),
    st.builds(lambda p, n: b"event: response.output_text.delta " + p.encode() + b"\ndata: "
              + orjson.dumps({"type": "response.output_text.delta", "delta": "x",
                              "sequence_number": n}) + b"\n\n",
              st.sampled_from([SECRET, *PARTS]), st.integers(0, 9)),
)


def outcome(renderer: StreamRenderer, pieces: list[bytes]) -> tuple[Any, ...]:
    """Everything a client and the access log see."""
    out = b""
    done, failure = False, None
    for piece in pieces:
        sent, done, failure = renderer.feed(piece)
        out += sent
        if done or failure:
            break
    else:
        sent, done, failure = renderer.close()
        out += sent
    frame = renderer.error_frame(failure) if failure else None
    return (out, done, frame, renderer.events, renderer.seq, renderer.bytes_out,
            renderer.usage, renderer.tail)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def check(dialect: Dialect, events: list[bytes], cuts: list[int], newline: bytes = b"\n",
          hide_usage: bool = False) -> None:
    data = b"".join(events).replace(b"\n", newline)
    reference = outcome(StreamRenderer(dialect, secrets=Secrets.of(SECRET), fast=False,
                                       hide_usage=hide_usage), [data])
    got = outcome(StreamRenderer(dialect, secrets=Secrets.of(SECRET), hide_usage=hide_usage),
                  split(data, cuts))
    assert got == reference
    for sent in (got[0], got[2] or b""):  # the key, as a client's parser reads it
        for text in (sent.decode("utf-8", "replace"), sent.decode("unicode_escape", "replace")):
            assert not [piece for piece in PIECES if piece in text], text


@settings(max_examples=600, deadline=None)
@given(events=st.lists(chat_events, min_size=1, max_size=12),
       cuts=st.lists(st.integers(0, 4000), max_size=10),
       newline=st.sampled_from([b"\n", b"\n", b"\r\n", b"\r"]), hide_usage=st.booleans())
def test_any_split_of_any_chat_stream_gives_the_bytes_of_the_reference_that_parses_all(
        events: list[bytes], cuts: list[int], newline: bytes, hide_usage: bool) -> None:
    """Also for a stream whose client did not ask for usage: the reference drops the usage
    chunk (``choices: []``) the gateway asked for, and so must every split."""
    check(CHAT, events, cuts, newline, hide_usage)


@settings(max_examples=300, deadline=None)
@given(events=st.lists(responses_events, min_size=1, max_size=8),
       cuts=st.lists(st.integers(0, 3000), max_size=8))
def test_any_split_of_any_responses_stream_gives_the_bytes_of_the_reference(
        events: list[bytes], cuts: list[int]) -> None:
    check(RESPONSES, events, cuts)


@settings(max_examples=300, deadline=None)
@given(events=st.lists(texts.map(chunk), min_size=1, max_size=30), with_usage=usage)
def test_a_clean_burst_in_one_read_passes_as_the_very_same_bytes(
        events: list[bytes], with_usage: dict[str, int]) -> None:
    data = b"".join(events) + chunk("", usage=with_usage) + b"data: [DONE]\n\n"
    renderer = StreamRenderer(CHAT)
    out, done, failure = renderer.feed(data)
    assert out is data  # not a copy: the region goes out as it came
    assert done and failure is None and renderer.usage == with_usage


@settings(max_examples=200, deadline=None)
@given(events=st.lists(texts.map(chunk), min_size=1, max_size=30), with_usage=usage)
def test_a_clean_burst_loses_its_unasked_usage_chunk_and_nothing_else(
        events: list[bytes], with_usage: dict[str, int]) -> None:
    """The read a stream ends with, as upstreams send it when asked for usage: the gateway
    asked, the client did not; it gets every other byte, and the usage is still counted."""
    data = b"".join(events) + usage_chunk(with_usage) + b"data: [DONE]\n\n"
    renderer = StreamRenderer(CHAT, hide_usage=True)
    out, done, failure = renderer.feed(data)
    assert out == b"".join(events) + b"data: [DONE]\n\n"
    assert done and failure is None and renderer.usage == with_usage
    assert renderer.tail == len(b"data: [DONE]\n\n") and renderer.events == len(events) + 1
