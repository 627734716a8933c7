"""The SSE framer: any chunking of a stream gives the same events, in the form clients read.

The properties over any split and any byte soup (hypothesis) are guarantees, in
``tests/guarantees/test_framer_fuzz.py``.
"""

from __future__ import annotations

import pytest

from gateway.stream.sse import SSEFramer, SSEProtocolError, encode_event

CHUNK = (b'data: {"id":"c1","choices":[{"delta":{"content":'
         b'"\xc3\xa9t\xc3\xa9 \xf0\x9f\x9a\x80"}}]}\n\n')
STREAM = CHUNK + b'event: response.output_text.delta\ndata: {"delta":"x"}\n\n' \
    + b": upstream ping\n\n" + b"data: [DONE]\n\n"


def frame(data: bytes, cuts: list[int] | None = None, step: int | None = None) -> list[bytes]:
    """What a client receives: each event as the bytes the relay would send."""
    framer = SSEFramer()
    if step is not None:
        cuts = list(range(step, len(data), step))
    pieces, last = [], 0
    for cut in sorted(set(cuts or [])):
        pieces.append(data[last:cut])
        last = cut
    pieces.append(data[last:])
    events = []
    for piece in pieces:
        events += framer.feed(piece)
    events += framer.close()
    return [e.raw if e.verbatim else encode_event(e) for e in events]


def test_one_line_events_pass_as_the_very_same_bytes() -> None:
    assert b"".join(frame(STREAM)) == STREAM


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64])
def test_any_split_gives_the_same_events_even_inside_a_utf8_character(step: int) -> None:
    assert frame(STREAM, step=step) == frame(STREAM)


def test_utf8_character_split_across_two_chunks() -> None:
    cut = CHUNK.index(b"\xf0\x9f") + 2  # in the middle of the rocket emoji
    assert frame(CHUNK, [cut]) == [CHUNK]


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"])
def test_crlf_and_cr_streams_come_out_with_lf(newline: bytes) -> None:
    data = STREAM.replace(b"\n", newline)
    expected = frame(STREAM)
    assert frame(data) == expected
    assert frame(data, step=1) == expected
    # A CRLF split between its CR and its LF is still one line break.
    cr = data.index(b"\r")
    assert frame(data, [cr + 1]) == expected


def test_multi_line_json_as_in_xai_docs_is_reencoded_on_one_line() -> None:
    data = (b'data: {\n"id": "a",\n"choices": [{"delta": {"content": " Ah "}}]\n}\n'
            b'data: {\n"id": "b",\n"choices": []\n}\n'
            b"data: [DONE]\n")
    out = frame(data, step=5)
    assert out == [b'data: {"id":"a","choices":[{"delta":{"content":" Ah "}}]}\n\n',
                   b'data: {"id":"b","choices":[]}\n\n', b"data: [DONE]\n\n"]


def test_multiple_data_lines_are_joined_and_reencoded() -> None:
    data = b'data: {\ndata:   "a": 1\ndata: }\n\n'
    assert frame(data) == [b'data: {"a":1}\n\n']


def test_event_id_and_retry_fields_are_kept_when_reencoding() -> None:
    data = b'event: delta\r\nid: 7\r\nretry: 100\r\ndata: {"a": 1}\r\n\r\n'
    assert frame(data) == [b'event: delta\nid: 7\nretry: 100\ndata: {"a":1}\n\n']


def test_last_event_without_blank_line_still_ends_with_one() -> None:
    assert frame(b'data: {"a":1}\n\ndata: [DONE]') == [b'data: {"a":1}\n\n', b"data: [DONE]\n\n"]
    assert frame(b"data: [DONE]\n") == [b"data: [DONE]\n\n"]


def test_extra_blank_lines_belong_to_no_event() -> None:
    assert frame(b'\n\ndata: {"a":1}\n\n\n\ndata: [DONE]\n\n') == \
        [b'data: {"a":1}\n\n', b"data: [DONE]\n\n"]


def test_oversized_event_is_an_error_not_unbounded_buffering() -> None:
    framer = SSEFramer(max_event_bytes=1000)
    framer.feed(b"data: " + b"x" * 900)
    with pytest.raises(SSEProtocolError):
        framer.feed(b"x" * 200)


def test_take_cuts_the_completed_region_and_holds_the_rest() -> None:
    framer = SSEFramer()
    assert framer.take(CHUNK) is CHUNK and framer.clean  # a whole chunk: no copy
    assert framer.take(CHUNK[:10]) == b""
    assert framer.pending == 10
    assert framer.take(CHUNK[10:] + CHUNK[:7]) == CHUNK  # carried over, then completed
    assert framer.pending == 7 and framer.clean
    assert framer.take(CHUNK[7:].replace(b"\n", b"\r\n")) == CHUNK
    assert not framer.clean  # its line endings were rewritten: re-encode, do not forward
    assert framer.split(CHUNK)[0].data == CHUNK[6:-2]


def test_reencoding_writes_the_fields_given_and_no_comment() -> None:
    """What the renderer hands back when it took a secret out of an event's name, or dropped
    its id: the data as it was, no comment line."""
    [event] = SSEFramer().feed(b": note\nevent: delta\nid: 7\nretry: 100\ndata: {"
                               b'"a": 1}\n\n')
    assert encode_event(event) == b'event: delta\nid: 7\nretry: 100\ndata: {"a":1}\n\n'
    assert encode_event(event, None, (b"delta [redacted]", None, None)) == \
        b'event: delta [redacted]\ndata: {"a":1}\n\n'
    assert encode_event(event, {"b": 2}, (None, b"8", None)) == b'id: 8\ndata: {"b":2}\n\n'
