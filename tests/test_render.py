"""The render path (``gateway/stream/render.py``) directly: bytes in, bytes out, what each event
is."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.aliases import model_rewriter
from gateway.stream.dialect import CHAT, RESPONSES
from gateway.stream.render import StreamRenderer
from gateway.upstream.secrets import Secrets

SECRET = "xai-operator-secret-key"


def chunk(content: str = "hi", **extra: Any) -> bytes:
    obj = {"id": "c1", "model": "grok-4", "choices": [{"delta": {"content": content}}], **extra}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def frame_of(renderer: StreamRenderer, failure: Any) -> dict[str, Any]:
    raw = renderer.error_frame(failure)
    return orjson.loads(raw.split(b"data: ", 1)[1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("reads", [[chunk(), chunk("b"), DONE],
                                   [chunk() + chunk("b") + DONE]], ids=["one_by_one", "burst"])
def test_one_line_events_pass_as_the_very_same_bytes(reads: list[bytes]) -> None:
    renderer = StreamRenderer(CHAT)
    out = [renderer.feed(r) for r in reads]
    assert [o[0] for o in out] == reads
    assert out[-1][1:] == (True, None)
    assert (renderer.events, renderer.seq) == (3, 2)


@pytest.mark.parametrize("event", [
    b'data: {"error": {"message": "boom", "code": "server_busy"}}\n\n',
    b'data: {"\\u0065rror": {"message": "boom", "code": "server_busy"}}\n\n',
    b'data: {"err\\u006fr": {"message": "boom", "code": "server_busy"}}\n\n',
], ids=["plain", "escaped_first_letter", "escaped_inside"])
@pytest.mark.parametrize("burst", [False, True])
def test_an_error_member_however_spelled_ends_the_stream_with_the_gateways_frame(
        event: bytes, burst: bool) -> None:
    renderer = StreamRenderer(CHAT)
    out, done, failure = renderer.feed(chunk() + event + chunk() if burst else event)
    assert out == (chunk() if burst else b"") and not done and failure is not None
    error = frame_of(renderer, failure)["error"]
    assert (error["message"], error["code"]) == ("Upstream error: boom", "server_busy")


def test_an_in_stream_error_never_carries_the_operator_key() -> None:
    renderer = StreamRenderer(CHAT, secrets=Secrets.of(SECRET))
    event = b'data: {"error": {"message": "bad key ' + SECRET.encode() + \
        b'", "code": "' + SECRET.encode() + b'"}}\n\n'
    _, _, failure = renderer.feed(event)
    assert failure is not None and SECRET.encode() not in renderer.error_frame(failure)


def test_json_that_is_not_an_object_is_relayed_alike_on_every_path() -> None:
    odd = b'data: ["usage"]\n\n'
    alone = StreamRenderer(CHAT).feed(odd)
    in_burst = StreamRenderer(CHAT).feed(chunk() + odd + chunk())
    assert alone == (odd, False, None)
    assert in_burst == (chunk() + odd + chunk(), False, None)


def test_the_last_usage_of_a_burst_is_noted_and_usage_as_text_is_not_mistaken_for_it() -> None:
    renderer = StreamRenderer(CHAT)
    usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    renderer.feed(chunk(usage={"prompt_tokens": 1}) + chunk(usage=usage) + chunk('"usage"')
                  + DONE)
    assert renderer.usage == usage


@pytest.mark.parametrize("burst", [False, True])
def test_an_empty_usage_does_not_undo_the_counts_before_it(burst: bool) -> None:
    renderer = StreamRenderer(CHAT)
    reads = [chunk(usage={"prompt_tokens": 5}), chunk(usage={})]
    for read in [b"".join(reads)] if burst else reads:
        renderer.feed(read)
    assert renderer.usage == {"prompt_tokens": 5}


@pytest.mark.parametrize("long_first", [False, True])
def test_the_usage_of_a_long_event_counts_in_its_turn(long_first: bool) -> None:
    """A short event's usage is read when the stream ends, a long one's (past 64 KiB, not
    kept for later) at once: the latest one counts either way."""
    long = chunk("x" * 70_000, usage={"prompt_tokens": 7})
    short = chunk(usage={"prompt_tokens": 2})
    renderer = StreamRenderer(CHAT)
    for read in [short, long] if not long_first else [long, short]:
        renderer.feed(read)
    assert renderer.usage == {"prompt_tokens": 2 if long_first else 7}


@pytest.mark.parametrize("read", [
    b'data: {"usage": {"completion_tokens": 1}, "usage": {"completion_tokens": 9}}\n\n',
    b'data: {"usage": {"completion_tokens": 1}, "usage": {}}\n\n',
    b'data: {"usage": {"completion_tokens": 9}, "usage": null}\n\n',
], ids=["last_counts", "last_empty", "last_null"])
def test_a_duplicate_usage_key_is_read_as_clients_read_it_the_last_one_wins(read: bytes) -> None:
    renderer, reference = StreamRenderer(CHAT), StreamRenderer(CHAT, fast=False)
    assert renderer.feed(read) == reference.feed(read) == (read, False, None)
    assert renderer.usage == reference.usage == (orjson.loads(read[6:]).get("usage") or None)


def test_done_in_the_middle_of_a_burst_ends_the_stream_there() -> None:
    renderer = StreamRenderer(CHAT)
    out, done, failure = renderer.feed(chunk() + DONE + chunk("after"))
    assert (out, done, failure) == (chunk() + DONE, True, None)


def test_the_operator_key_inside_an_event_is_taken_out() -> None:
    renderer = StreamRenderer(CHAT, secrets=Secrets.of(SECRET))
    out, _, _ = renderer.feed(chunk(f"the key is {SECRET}") + chunk("next"))
    assert SECRET.encode() not in out
    assert b"the key is [redacted]" in out and out.endswith(chunk("next"))


def test_a_model_alias_is_rewritten_in_every_event() -> None:
    renderer = StreamRenderer(CHAT, rewrite=model_rewriter("my-model"))
    out, done, _ = renderer.feed(chunk() + chunk("b") + DONE)
    assert out.count(b'"model":"my-model"') == 2 and b"grok-4" not in out and done


def test_a_stream_that_ends_before_its_terminal_event_is_a_failure() -> None:
    renderer = StreamRenderer(CHAT)
    renderer.feed(chunk())
    out, done, failure = renderer.close()
    assert out == b"" and not done and failure is not None
    assert failure.code == "upstream_bad_stream"


def test_comments_pass_and_are_not_counted_as_events() -> None:
    renderer = StreamRenderer(CHAT)
    assert renderer.feed(b": ping\n\n" + chunk())[0] == b": ping\n\n" + chunk()
    assert renderer.events == 1


def test_invalid_json_ends_the_stream_as_malformed() -> None:
    renderer = StreamRenderer(CHAT)
    out, _, failure = renderer.feed(chunk() + b"data: {nope}\n\n")
    assert out == chunk() and failure is not None and "malformed" in failure.message


def responses_event(name: str, **fields: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **fields}) \
        + b"\n\n"


def test_responses_usage_inside_the_terminal_event_is_noted() -> None:
    renderer = StreamRenderer(RESPONSES)
    usage = {"input_tokens": 2, "output_tokens": 4}
    completed = responses_event("response.completed", response={"usage": usage})
    out, done, _ = renderer.feed(responses_event("response.created") + completed)
    assert done and renderer.usage == usage and out.endswith(completed)


def test_a_responses_failure_is_relayed_with_the_key_taken_out() -> None:
    renderer = StreamRenderer(RESPONSES, secrets=Secrets.of(SECRET))
    failed = responses_event("response.failed", response={"error": {"message": SECRET}})
    out, done, failure = renderer.feed(failed)
    assert done and failure is None and SECRET.encode() not in out
    assert orjson.loads(out.split(b"data: ")[1])["response"]["error"]["message"] == "[redacted]"


@pytest.mark.parametrize("event", [
    responses_event("error", code="too_busy", message="try later"),
    b'event: response.output_text.delta\ndata: {"type": "response.output_text.delta", '
    b'"\\u0065rror": {"message": "try later", "code": "too_busy"}}\n\n',
], ids=["error_event", "error_member_on_a_delta"])
def test_a_responses_error_becomes_the_gateways_error_event_continuing_the_numbering(
        event: bytes) -> None:
    renderer = StreamRenderer(RESPONSES)
    _, _, failure = renderer.feed(responses_event("response.created") + event)
    assert failure is not None
    frame = frame_of(renderer, failure)
    assert frame["type"] == "error" and frame["sequence_number"] == 1
    assert (frame["message"], frame["code"]) == ("Upstream error: try later", "too_busy")


@pytest.mark.parametrize("chunk, shortcut", [
    (b'data: {"a":1}\n\n', True),
    (b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: [DONE]\n\n', True),
    (b'data: {\n"a": 1}\n\n', False),  # multi-line
    (b'event: x\ndata: {"a":1}\n\n', False),  # a named event
    (b'data: {"a":1}\n\n\n\ndata: {"b":2}\n\n', False),  # an extra blank line
    (b": ping\n\n", False),
    (b'data: {"a":1}\n\n: ping\n\n', False),
    (b'data: {"a":1}\n\ndata:{"b":2}\n\n', False),  # no space after the colon
    (b"data: 0,[1\n\ndata: 2]\n\n", False),  # a value split across two events
    (b'data: {"a":"x}\n\ndata: {"},{"b":1}\n\n', False),
    (b"data: [DONE]\n\ndata: {}\n\n", False),  # [DONE] not last
    (b"data: \xef\xbb\xbf{}\n\n", False),  # a BOM, which simdjson skips
    (b"data: 123456789012345678901234567890\n\n", False),  # past simdjson's integers
])
def test_the_shortcut_takes_only_regions_of_one_line_events_each_one_json_value(
        chunk: bytes, shortcut: bool) -> None:
    assert (StreamRenderer(CHAT)._region(chunk) is not None) is shortcut


# --- Nothing of the key, on any line, whole or in part (issue 24) ------------------------------

KEY = "opk-9Fq3Zr7Lx2Vb8Nm4Tw6Hy1"  # like no key format: only the renderer's secrets catch it
PIECES = {KEY[i:i + 8] for i in range(len(KEY) - 7)}
PARTS = [KEY, KEY[:-3], KEY[2:], KEY[3:-3], KEY[6:14]]


def no_piece(out: bytes) -> bool:
    text = out.decode("utf-8", "replace")
    return not any(piece in text for piece in PIECES)


def both_paths(read: bytes, dialect: Any = CHAT) -> bytes:
    """What the shortcut and the reference that parses every event send: the same bytes."""
    fast = StreamRenderer(dialect, secrets=Secrets.of(KEY)).feed(read)
    reference = StreamRenderer(dialect, secrets=Secrets.of(KEY), fast=False).feed(read)
    assert fast == reference
    return fast[0]


@pytest.mark.parametrize("part", PARTS, ids=["whole", "less_3", "less_first_2", "middle",
                                             "eight"])
@pytest.mark.parametrize("burst", [False, True])
def test_a_part_of_the_key_in_an_event_is_taken_out_as_one_run(part: str, burst: bool) -> None:
    read = chunk(f"auth={part}.") + (chunk("next") if burst else b"")
    out = both_paths(read)
    assert no_piece(out) and b'"content":"auth=[redacted]."' in out


@pytest.mark.parametrize("event, sent", [
    (b": debug auth=" + KEY[:-2].encode() + b"\n\n", b""),
    (b": debug auth=" + KEY.encode() + b"\n" + chunk(), chunk()),
    (b"event: " + KEY[3:].encode() + b"\n" + chunk(), b"event: [redacted]\n" + chunk()),
    (b"event: message " + KEY[3:].encode() + b"\n" + chunk(),
     b"event: message [redacted]\n" + chunk()),
    (b"id: " + KEY[:-3].encode() + b"\n" + chunk(), chunk()),
    (b"id: 7\nretry: " + KEY[6:14].encode() + b"\n" + chunk(), b"id: 7\n" + chunk()),
    (b"event: " + KEY.encode() + b"\nevent: delta\n" + chunk(), b"event: delta\n" + chunk()),
    (b"id: " + KEY.encode() + b"\ndata: [DONE]\n\n", DONE),
], ids=["comment_event", "comment_line", "event", "event_appended", "id", "retry",
        "overridden_event", "done_with_an_id"])
def test_every_line_of_an_event_is_checked_not_only_its_data(event: bytes, sent: bytes) -> None:
    out = both_paths(event)
    assert out == sent and no_piece(out)


def test_lines_without_a_part_of_the_key_pass_as_they_came() -> None:
    read = b": ping " + KEY[:7].encode() + b"\n\nid: 7\nevent: delta\n" + chunk(KEY[1:8])
    assert both_paths(read) == read  # seven characters: not a part


def test_a_responses_event_name_with_the_key_appended_is_redacted() -> None:
    read = responses_event("response.created").replace(
        b"response.created\n", b"response.created " + KEY[2:].encode() + b"\n", 1)
    out = both_paths(read, RESPONSES)
    assert out == responses_event("response.created").replace(
        b"response.created\n", b"response.created [redacted]\n", 1)


@pytest.mark.parametrize("spelled", [
    KEY[3:].replace("F", "\\u0046"),  # an escape: the shortcut sends it to the exact path
    KEY[:-2].replace("-", "\\u002d"),
])
def test_an_escaped_part_of_the_key_is_taken_out(spelled: str) -> None:
    read = b'data: {"choices": [{"delta": {"content": "' + spelled.encode() + b'"}}]}\n\n'
    out = both_paths(read)
    assert no_piece(orjson.loads(out[6:])["choices"][0]["delta"]["content"].encode())


def test_a_key_holding_a_slash_is_found_spelled_with_an_escaped_slash() -> None:
    key = "opk/9Fq3Zr7Lx2Vb8Nm4"
    read = chunk("x").replace(b'"x"', b'"' + key.replace("/", "\\/").encode() + b'"')
    renderer = StreamRenderer(CHAT, secrets=Secrets.of(key))
    out, _, _ = renderer.feed(read)
    assert orjson.loads(out[6:])["choices"][0]["delta"]["content"] == "[redacted]"


def test_an_error_code_holding_part_of_the_key_is_dropped_and_its_message_redacted() -> None:
    renderer = StreamRenderer(CHAT, secrets=Secrets.of(KEY))
    event = b'data: {"error": {"message": "bad ' + KEY[:-3].encode() + b'", "code": "' + \
        KEY[2:].encode() + b'"}}\n\n'
    _, _, failure = renderer.feed(event)
    assert failure is not None and (failure.message, failure.code) == (
        "Upstream error: bad [redacted]", "upstream_error")
    assert no_piece(renderer.error_frame(failure))


def test_a_streams_repeated_head_is_left_out_of_the_search_and_a_key_in_a_new_one_found() -> None:
    """The id every chunk repeats (random, like a key) is looked at once; a chunk whose head
    differs, the key in its id, is looked at whole."""
    renderer = StreamRenderer(CHAT, secrets=Secrets.of(KEY))
    head = "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG"  # an OpenAI id: capitals, like the key's
    for word in ("a", "b"):
        assert renderer.feed(chunk(word).replace(b'"c1"', f'"{head}"'.encode()))[0] \
            == chunk(word).replace(b'"c1"', f'"{head}"'.encode())
    assert renderer.clean is not None and head.encode() in renderer.clean
    leaky = chunk("c").replace(b'"c1"', f'"{KEY[1:]}"'.encode())
    out, _, _ = renderer.feed(leaky)
    assert no_piece(out) and b'"id":"[redacted]"' in out
