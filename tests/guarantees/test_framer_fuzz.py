"""The SSE framer under fuzzing (hypothesis), and byte soup from a real upstream through a real
gateway.

Any split of any valid stream yields exactly the same events; any byte soup yields well-formed
events or a clean ``SSEProtocolError``, never another exception or a hang; an event over the
limit, or a line that is not SSE, is an error wherever the chunk boundaries fall. Through the
gateway, soup in the middle of a stream ends it with one error frame (or, if it was harmless
to SSE, the stream completes): the client never gets malformed events.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.stream.sse import Event, SSEFramer, SSEProtocolError, encode_event

from clients import mock_events, sse_events
from conftest import KEY, Upstream, settings_for
from observe import Baseline, assert_released


def feed_all(framer: SSEFramer, data: bytes, cuts: list[int]) -> list[Event]:
    events, last = [], 0
    for cut in sorted({c for c in cuts if 0 < c < len(data)}) + [len(data)]:
        events += framer.feed(data[last:cut])
        last = cut
    return events + framer.close()


def frame(data: bytes, cuts: list[int] | None = None) -> list[bytes]:
    """What a client receives: each event as the bytes the relay would send."""
    return [e.raw if e.verbatim else encode_event(e)
            for e in feed_all(SSEFramer(), data, cuts or [])]


events_st = st.lists(
    st.one_of(
        st.dictionaries(st.text(max_size=5), st.text(max_size=8), max_size=3).map(
            lambda d: b"data: " + orjson.dumps(d) + b"\n\n"),
        st.text(alphabet="abc\u00e9\u6f22\U0001f680", min_size=1, max_size=6).map(
            lambda t: b"event: e\ndata: " + orjson.dumps({"t": t}) + b"\n\n"),
        st.just(b": ping\n\n"),
    ), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(events=events_st, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
       newline=st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_any_split_of_any_valid_stream_yields_the_same_events(
        events: list[bytes], cuts: list[int], newline: bytes) -> None:
    data = b"".join(events).replace(b"\n", newline)
    whole = frame(data)
    assert frame(data, cuts) == whole
    if newline == b"\n":
        assert whole == events  # already well formed: byte for byte


@settings(max_examples=300, deadline=None)
@given(soup=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=8))
def test_any_byte_soup_yields_events_or_a_clean_error(soup: bytes, cuts: list[int]) -> None:
    try:
        events = feed_all(SSEFramer(max_event_bytes=256), soup, cuts)
    except SSEProtocolError:
        return
    for event in events:
        assert event.raw.endswith(b"\n\n")
        encode_event(event)


@settings(max_examples=100, deadline=None)
@given(size=st.integers(1001, 5000), before=events_st, cuts=st.lists(st.integers(0, 6000),
                                                                      max_size=6))
def test_an_event_over_the_limit_is_an_error_wherever_the_chunks_end(
        size: int, before: list[bytes], cuts: list[int]) -> None:
    data = b"".join(before) + b"data: " + b"x" * size + b"\n\n" + b"data: [DONE]\n\n"
    with pytest.raises(SSEProtocolError, match="exceeds 1000 bytes"):
        feed_all(SSEFramer(max_event_bytes=1000), data, cuts)


@settings(max_examples=100, deadline=None)
@given(junk=st.binary(min_size=1, max_size=40).filter(
    lambda b: b.strip(b"\r\n") and not b.lstrip(b"\r\n").startswith(
        (b":", b"data:", b"event:", b"id:", b"retry:"))),
    before=events_st, cuts=st.lists(st.integers(0, 600), max_size=6))
def test_a_line_that_is_not_sse_is_an_error_not_silently_dropped(
        junk: bytes, before: list[bytes], cuts: list[int]) -> None:
    line = junk.replace(b"\r", b"").replace(b"\n", b"") or b"?"
    if line.startswith(b":") or line.partition(b":")[0] in (b"data", b"event", b"id", b"retry"):
        return  # became a comment or a field once its line breaks were taken out
    data = b"".join(before) + line + b"\n\n" + b"data: [DONE]\n\n"
    with pytest.raises(SSEProtocolError, match="not an SSE field"):
        feed_all(SSEFramer(), data, cuts)


# --- byte soup from a real upstream, through a real gateway ---------------------------------

TEXT = "soup arrives in the middle of this stream"
CLEAN = mock_events(TEXT)


def soups(count: int) -> list[bytes]:
    """Deterministic soups: raw bytes, and SSE-ish shards (fields, colons, line breaks, bytes
    that are not UTF-8), which reach the framer's less travelled paths."""
    rng = random.Random(7)
    shards = [b"data:", b"data: ", b"event: x", b": c", b"id: 1", b"retry: 5", b"\n", b"\r",
              b"\r\n", b"\n\n", b"{", b"}", b'"', b"\xff", b"\xc3", b"[DONE]", b"x", b" ",
              b"\x00", b'{"error":{"message":"m"}}', b'{"a":1}']
    out = []
    for i in range(count):
        if i % 2:
            out.append(rng.randbytes(rng.randint(1, 64)))
        else:
            out.append(b"".join(rng.choice(shards) for _ in range(rng.randint(1, 12))))
    return out


def well_formed(event: bytes) -> bool:
    """Known fields only, and one ``data:`` line holding JSON or ``[DONE]``."""
    lines = event[:-2].split(b"\n")
    fields = [line.partition(b": ")[0] for line in lines]
    if fields.count(b"data") != 1 or not set(fields) <= {b"data", b"event", b"id", b"retry"}:
        return False
    data = lines[fields.index(b"data")][6:]
    if data != b"[DONE]":
        try:
            orjson.loads(data)
        except orjson.JSONDecodeError:
            return False
    return True


async def test_byte_soup_mid_stream_never_reaches_the_client_as_a_malformed_event(
        mock_upstream: Upstream, start_gateway: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    app, base = await start_gateway(settings_for(mock_upstream.url, stream={
        "keepalive_seconds": 0.2, "idle_timeout_seconds": 0.5}))
    baseline = await Baseline.after_one_request(base, KEY)
    ended = {"done": 0, "error": 0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for soup in soups(150):
            async with http.post(f"{base}/v1/chat/completions", headers={
                    "Authorization": f"Bearer {KEY}"}, json={
                    "model": "grok-4", "stream": True, "messages": [],
                    "mock": {"text": TEXT, "inject_after": 3, "inject_hex": soup.hex()}}) as r:
                assert r.status == 200
                raw = await r.read()
            events = sse_events(raw)
            for event in events:
                assert well_formed(event), (soup, event)
            if events[-1].endswith(b"data: [DONE]\n\n"):
                ended["done"] += 1
                assert b'"error"' not in raw
            else:
                ended["error"] += 1
                assert orjson.loads(events[-1][6:])["error"]["code"] == "upstream_bad_stream"
                assert sum(b'"error"' in e for e in events) == 1 and b"[DONE]" not in raw
                assert events[:-1] == CLEAN[:len(events) - 1], soup
    assert ended["error"] > 0
    await assert_released(app, mock_upstream.state, baseline)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no crash, no bug
