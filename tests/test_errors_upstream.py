"""What of an upstream's answer ``errors.py`` lets through to a client: ``from_upstream`` (an
error status), ``stream_error`` (an error inside a stream) and ``redact_strings`` (an event
relayed whole), called directly with what a hostile or broken upstream sends.

The same defects, injected through a real gateway and a real client, are guarantees in
``tests/guarantees/test_upstream_secrets.py``.
"""

from __future__ import annotations

import email.utils
import logging
import time
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import PART_CHARS, UpstreamFailure, UpstreamStatus, redact
from gateway.upstream.errors import from_upstream, redact_strings, stream_error
from gateway.upstream.secrets import Secrets

SECRET = "opk-9Fq3Zr7Lx2Vb8Nm4Tw6Hy1"  # like no key format: only the secrets list catches it
SECRETS = (SECRET,)
PIECES = {SECRET[i:i + 6] for i in range(len(SECRET) - 5)}
PARTS = [SECRET[:-3], SECRET[2:], SECRET[3:-3], SECRET[6:14]]
"""What an upstream may echo of the key: less a few characters at either end, eight from its
middle. Each is redacted as the whole key is."""


def assert_no_piece(text: str) -> None:
    leaked = [piece for piece in PIECES if piece in text]
    assert not leaked, text[:400]


def openai_body(**err: Any) -> bytes:
    return orjson.dumps({"error": {"message": "bad request", "type": "invalid_request_error",
                                   "param": None, "code": None, **err}})


def fields(failure: UpstreamFailure) -> dict[str, Any]:
    return failure.body()["error"]  # type: ignore[no-any-return]


def withheld(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "gateway.upstream" and "withheld" in r.getMessage()]


# --- from_upstream: the fields of a JSON error ------------------------------------------------

@pytest.mark.parametrize("field", ["type", "code"])
@pytest.mark.parametrize("value", [SECRET, f"Bearer {SECRET}", f"x{SECRET}x", "two words",
                                   "a" * 65, "semi;colon", "", 4.5, True, ["list"], {"o": 1}])
def test_a_code_or_type_that_is_not_an_identifier_is_dropped(field: str, value: Any) -> None:
    failure = from_upstream(400, openai_body(**{field: value}), {}, SECRETS)
    assert (failure.type, failure.code) == ("invalid_request_error", "upstream_http_400")


@pytest.mark.parametrize("value, passed", [("context_length_exceeded", "context_length_exceeded"),
                                           ("model.not-found_2", "model.not-found_2"),
                                           ("a" * 64, "a" * 64), (1234, "1234")])
def test_a_code_that_is_an_identifier_passes(value: Any, passed: str) -> None:
    assert from_upstream(400, openai_body(code=value), {}, SECRETS).code == passed


def test_a_param_is_redacted_and_bounded() -> None:
    param = "messages[0]." + SECRET + "x" * 1000
    err = fields(from_upstream(400, openai_body(param=param), {}, SECRETS))
    assert err["param"].startswith("messages[0].[redacted]") and len(err["param"]) <= 259


def test_a_long_message_is_redacted_before_it_is_cut() -> None:
    """A key straddling the 2,000-character cut: redacted whole, then cut."""
    message = "m" * 1990 + SECRET + "m" * 500
    err = fields(from_upstream(400, openai_body(message=message), {}, SECRETS))
    assert_no_piece(err["message"])
    assert err["message"].startswith("m" * 1990 + "[")
    assert len(err["message"]) <= 2003


@pytest.mark.parametrize("code, expected", [(SECRET, "upstream_http_400"),
                                            ("invalid_model", "invalid_model")])
def test_the_code_of_xais_own_shape_passes_only_as_an_identifier(code: str,
                                                                 expected: str) -> None:
    body = orjson.dumps({"error": f"Model not found; key {SECRET}", "code": code})
    failure = from_upstream(400, body, {}, SECRETS)
    assert (failure.message, failure.code) == ("Model not found; key [redacted]", expected)


# --- from_upstream: what is withheld ----------------------------------------------------------

@pytest.mark.parametrize("status", [500, 502, 503, 504, 599])
def test_a_5xx_message_is_generic_and_its_detail_is_one_redacted_log_line(
        caplog: pytest.LogCaptureFixture, status: int) -> None:
    caplog.set_level(logging.WARNING)
    body = openai_body(message=f"Traceback:\n  at db-3.internal:5432\nkey {SECRET}",
                       code="overloaded")
    failure = from_upstream(status, body, {}, SECRETS)
    assert isinstance(failure, UpstreamStatus)
    assert fields(failure) == {"message": f"The upstream failed (HTTP {status})",
                               "type": "upstream_error", "param": None,
                               "code": f"upstream_http_{status}"}
    [line] = withheld(caplog)
    assert "db-3.internal:5432" in line and "[redacted]" in line and "\n" not in line
    assert_no_piece(line)


def test_a_key_escaped_in_a_json_body_is_redacted_in_the_log(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    escaped = "".join(f"\\u{ord(c):04x}" for c in SECRET)
    body = b'{"error": {"message": "key ' + escaped.encode() + b'"}}'
    from_upstream(503, body, {}, SECRETS)
    [line] = withheld(caplog)
    assert_no_piece(line)


@pytest.mark.parametrize("key_at", [0, 190, 195, 199, 200, 4990])
@pytest.mark.parametrize("status", [400, 404, 500, 502])
def test_a_non_json_body_is_never_echoed_and_its_detail_is_redacted_before_the_cut(
        caplog: pytest.LogCaptureFixture, key_at: int, status: int) -> None:
    caplog.set_level(logging.WARNING)
    text = b"<html>" + b"x" * 5000
    body = text[:key_at] + SECRET.encode() + text[key_at:]
    failure = fields(from_upstream(status, body, {}, SECRETS))
    generic = (f"The upstream failed (HTTP {status})" if status >= 500
               else f"The upstream refused the request (HTTP {status})")
    assert (failure["message"], failure["code"]) == (generic, f"upstream_http_{status}")
    [line] = withheld(caplog)
    assert_no_piece(line)
    assert len(line) < 1200


@pytest.mark.parametrize("cut", [4, 10, 20, len(SECRET) - 1])
def test_a_body_that_was_read_only_up_to_a_cut_inside_the_key_logs_no_part_of_it(
        caplog: pytest.LogCaptureFixture, cut: int) -> None:
    """The relay reads at most 64 KiB of an error body: the key may be cut there."""
    caplog.set_level(logging.WARNING)
    from_upstream(502, b"upstream said: " + SECRET[:cut].encode(), {}, SECRETS)
    [line] = withheld(caplog)
    assert SECRET[:4] not in line


@pytest.mark.parametrize("body", [b"[1, 2]", b'"a string"', b"null", b'{"detail": "x"}',
                                  b'{"error": 42}', b'{"error": {"message": 7}}', b""])
def test_a_json_body_that_is_no_error_shape_gets_a_generic_message(body: bytes) -> None:
    assert from_upstream(400, body, {}, SECRETS).message == \
        "The upstream refused the request (HTTP 400)"


@pytest.mark.parametrize("status", [100, 199, 204, 300, 301, 302, 303, 304, 307, 308, 399, 600,
                                    999])
def test_a_status_that_is_not_an_error_nor_success_is_502_bad_status(status: int) -> None:
    failure = from_upstream(status, openai_body(message=SECRET),
                            {"Location": f"https://x/{SECRET}", "Retry-After": "5"}, SECRETS)
    assert (failure.status, failure.type, failure.code, failure.headers) == (
        502, "upstream_error", "upstream_bad_status", {})
    assert failure.message == f"The upstream answered with an unexpected status (HTTP {status})"


# --- from_upstream: Retry-After and retry-after-ms --------------------------------------------

@pytest.mark.parametrize("value, passed", [
    ("7", "7"), (" 12 ", "12"), ("0", "0"), ("1.5", "2"), ("999999", "86400"),
    ("9" * 11, None), ("-1", None), ("7s", None), ("0x10", None), ("", None), (SECRET, None),
    (f"Bearer {SECRET}", None), ("1e3", None), ("7, 8", None),
])
def test_retry_after_passes_only_as_seconds(value: str, passed: str | None) -> None:
    failure = from_upstream(429, openai_body(), {"Retry-After": value}, SECRETS)
    assert failure.headers.get("Retry-After") == passed


def test_a_retry_after_date_becomes_seconds() -> None:
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    past = email.utils.formatdate(time.time() - 30, usegmt=True)
    far = email.utils.formatdate(time.time() + 10 * 86400, usegmt=True)
    get = [from_upstream(503, b"", {"retry-after": d}).headers["Retry-After"]
           for d in (future, past, far)]
    assert 28 <= int(get[0]) <= 31 and get[1:] == ["0", "86400"]


@pytest.mark.parametrize("value, passed", [("250", "250"), ("2.5", "3"), ("abc", None),
                                           (SECRET, None), ("9999999999", "86400000"),
                                           ("9" * 11, None)])
def test_retry_after_ms_passes_only_as_milliseconds(value: str, passed: str | None) -> None:
    failure = from_upstream(429, openai_body(), {"RETRY-AFTER-MS": value}, SECRETS)
    assert {k.lower(): v for k, v in failure.headers.items()}.get("retry-after-ms") == passed


# --- stream_error -----------------------------------------------------------------------------

def test_an_error_object_in_a_stream_is_redacted_and_keeps_an_identifier_code() -> None:
    failure = stream_error({"message": f"bad {SECRET}", "type": SECRET, "code": "overloaded",
                            "param": SECRET}, SECRETS)
    assert (failure.status, failure.message, failure.type, failure.code, failure.param) == (
        502, "Upstream error: bad [redacted]", "upstream_error", "overloaded", None)


@pytest.mark.parametrize("code", [SECRET, f"Bearer {SECRET}", "a b", "x" * 65, 2.5, None,
                                  False, {"a": 1}])
def test_an_error_code_in_a_stream_that_is_not_an_identifier_is_dropped(code: Any) -> None:
    assert stream_error({"message": "m", "code": code}, SECRETS).code == "upstream_error"


@pytest.mark.parametrize("obj, message", [
    (f"bare {SECRET}", "Upstream error: bare [redacted]"),
    ({"code": "x"}, "Upstream error: The upstream reported an error"),
    ({"message": 42}, "Upstream error: The upstream reported an error"),
    ({"message": "   "}, "Upstream error: The upstream reported an error"),
    (42, "Upstream error: The upstream reported an error"),
    ([SECRET], "Upstream error: The upstream reported an error"),
    (None, "Upstream error: The upstream reported an error"),
    (True, "Upstream error: The upstream reported an error"),
])
def test_any_error_value_in_a_stream_gets_a_safe_message(obj: Any, message: str) -> None:
    failure = stream_error(obj, SECRETS)
    assert (failure.message, failure.code) == (message, "upstream_error" if not isinstance(
        obj, dict) or "code" not in obj else "x")


def test_a_long_error_message_in_a_stream_is_redacted_before_it_is_cut() -> None:
    failure = stream_error({"message": "m" * 1995 + SECRET + "m" * 5000}, SECRETS)
    assert_no_piece(failure.message)
    assert len(failure.message) <= len("Upstream error: ") + 2003


def test_a_responses_error_event_gives_its_flat_or_nested_fields() -> None:
    flat = {"type": "error", "code": "server_error", "message": f"down {SECRET}", "param": None,
            "sequence_number": 3}
    assert (stream_error(flat, SECRETS).code, stream_error(flat, SECRETS).message) == (
        "server_error", "Upstream error: down [redacted]")
    nested = {"type": "error", "code": SECRET, "message": None,
              "error": {"message": f"nested {SECRET}", "code": "rate_limited"}}
    failure = stream_error(nested, SECRETS)
    assert (failure.code, failure.message) == ("rate_limited", "Upstream error: nested [redacted]")
    assert stream_error({"type": "error", "error": f"s {SECRET}"}, SECRETS).message == \
        "Upstream error: s [redacted]"


# --- redact_strings ---------------------------------------------------------------------------

def test_redact_strings_redacts_every_string_and_key_and_keeps_the_rest() -> None:
    event = {"type": "response.failed", SECRET: 1, "response": {
        "status": "failed", "error": {"code": SECRET, "message": f"m {SECRET}"},
        "output": [SECRET, 1, 2.5, True, None, {"k": [f"deep {SECRET}"]}]}}
    original = orjson.dumps(event)
    clean = redact_strings(event, SECRETS)
    assert orjson.dumps(event) == original  # a copy: the input is untouched
    assert clean == {"type": "response.failed", "[redacted]": 1, "response": {
        "status": "failed", "error": {"code": "[redacted]", "message": "m [redacted]"},
        "output": ["[redacted]", 1, 2.5, True, None, {"k": ["deep [redacted]"]}]}}
    assert redact_strings(f"s {SECRET}", SECRETS) == "s [redacted]"
    assert redact_strings(7, SECRETS) == 7


def test_redact_strings_walks_nesting_deeper_than_the_recursion_limit() -> None:
    value: Any = [SECRET]
    for _ in range(5000):
        value = [value]
    clean = redact_strings(value, SECRETS)
    for _ in range(5000):
        clean = clean[0]
    assert clean == ["[redacted]"]


# --- Parts of the key (issue 24) --------------------------------------------------------------

@pytest.mark.parametrize("part", PARTS)
def test_a_part_of_the_key_in_a_message_param_or_code_is_redacted_or_dropped(part: str) -> None:
    failure = from_upstream(400, openai_body(message=f"bad key {part}!", param=part, code=part),
                            {}, SECRETS)
    assert fields(failure) == {"message": "bad key [redacted]!", "type": "invalid_request_error",
                               "param": "[redacted]", "code": "upstream_http_400"}
    xai = from_upstream(400, orjson.dumps({"error": part, "code": part}), {}, SECRETS)
    assert (xai.message, xai.code) == ("[redacted]", "upstream_http_400")
    streamed = stream_error({"message": f"m {part}", "code": part}, SECRETS)
    assert (streamed.message, streamed.code) == ("Upstream error: m [redacted]", "upstream_error")
    assert redact_strings({part: [part]}, SECRETS) == {"[redacted]": ["[redacted]"]}


@pytest.mark.parametrize("text, redacted", [
    (f"{SECRET[:7]} and {SECRET[-7:]}", f"{SECRET[:7]} and {SECRET[-7:]}"),  # seven: no part
    (SECRET[:12] + SECRET[6:20], "[redacted][redacted]"),  # one run, then another
    (f"x{SECRET[4:]}{SECRET}y", "x[redacted][redacted]y"),
    (SECRET.lower(), SECRET.lower()),  # not the key's characters
])
def test_redact_takes_out_each_run_of_eight_or_more_of_the_keys_characters(
        text: str, redacted: str) -> None:
    assert redact(text, SECRETS) == redacted


KEY_CHARACTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
keys = st.text(KEY_CHARACTERS, min_size=12, max_size=90)


def echoes(key: str) -> st.SearchStrategy[str]:
    """Text an upstream sends: ordinary characters, JSON, and pieces of the key, any length."""
    cut = st.tuples(st.integers(0, len(key)), st.integers(0, len(key)))
    return st.lists(st.one_of(
        st.text(KEY_CHARACTERS + ' "{}:,.é', max_size=40),
        st.sampled_from(['{"id":"chatcmpl-7f3a9c2b1e","created":1700000000}', "The ",
                         "data: ", "\n", "usage"]),
        cut.map(lambda c: key[min(c):max(c)])), max_size=12).map("".join)


@settings(max_examples=400, deadline=None)
@given(data=st.data(), key=keys)
def test_no_run_of_eight_characters_of_the_key_survives_redact_and_bytes_holding_one_are_found(
        data: st.DataObject, key: str) -> None:
    """``redact`` leaves no part; ``Secrets.may_be_in`` never says no where bytes hold one,
    and, where few of its probes are in them, says exactly whether they do."""
    text = data.draw(echoes(key))
    parts = {key[i:i + PART_CHARS] for i in range(len(key) - PART_CHARS + 1)}
    assert not any(part in redact(text, (key,)) for part in parts)
    raw = text.encode()
    secrets = Secrets.of(key)
    holds = any(part.encode() in raw for part in parts)
    found = secrets.may_be_in(raw)
    assert found or not holds
    if len(raw) - len(raw.translate(None, secrets.probes)) <= 8:
        assert found == holds
    assert all(len(part.encode().translate(None, secrets.probes)) < PART_CHARS
               for part in parts)  # every part holds a probe
    # Bytes known to hold no part, bounded by bytes no key holds, are left out of the search:
    # no answer changes (a part cannot cross their ends).
    clean = ('{"id":"' + redact(data.draw(echoes(key)), (key,)) + '",').encode()
    pieces = data.draw(st.lists(st.one_of(st.just(clean), echoes(key).map(str.encode)),
                                max_size=8))
    mixed = b"".join(pieces)
    holds = any(part.encode() in mixed for part in parts)
    assert secrets.may_be_in(mixed, clean) or not holds


@settings(max_examples=200, deadline=None)
@given(data=st.data(), key=keys)
def test_a_read_past_the_probes_budget_is_searched_by_anchors_and_never_misses_a_part(
        data: st.DataObject, key: str) -> None:
    """A long read full of the key's probe bytes is searched for its anchors, the run followed
    around each: a part in it is always found, and, where no anchor is more than a few times
    in it, exactly."""
    filler = data.draw(echoes(key)) or "x"
    raw = (filler * (4096 // len(filler) + 1)).encode()
    at = data.draw(st.integers(0, len(raw)))
    raw = raw[:at] + data.draw(echoes(key)).encode() + raw[at:]
    secrets = Secrets.of(key)
    parts = {key[i:i + PART_CHARS].encode() for i in range(len(key) - PART_CHARS + 1)}
    holds = any(part in raw for part in parts)
    found = secrets.may_be_in(raw)
    assert found or not holds
    if sum(raw.count(anchor) for anchor in secrets.anchors) <= 8:
        assert found == holds


def test_a_word_the_key_shares_with_the_upstreams_ids_sends_nothing_to_the_exact_path() -> None:
    """``mock-upstream-key`` and the mock's ids (``chatcmpl-mock...``) share an anchor
    (``mock``): in a read past the probes' budget, that alone is no part."""
    secrets = Secrets.of("mock-upstream-key")
    read = b"".join(b'data: {"id":"chatcmpl-mock%d","object":"chat.completion.chunk",'
                    b'"choices":[{"delta":{"content":"rock "}}]}\n\n' % i for i in range(100))
    assert not secrets.may_be_in(read)
    assert secrets.may_be_in(read[:5000] + b"upstream-" + read[5000:])


def test_a_secret_shorter_than_a_part_is_refused() -> None:
    with pytest.raises(ValueError, match="fewer than 8 characters"):
        Secrets.of("short")
