"""The one render path of a stream: upstream bytes in, client bytes out. Pure: no aiohttp, no I/O.

``StreamRenderer.feed`` takes each upstream read and returns what to send for the events it
completes, whether the terminal event was among them, and the failure that ends the stream if
there is one (the events before it are still sent). ``close`` does the same at the upstream's
end. Framing is ``SSEFramer``'s (``gateway/stream/sse.py``); what an event *is* is decided
here, once, from its parsed object, by the stream's dialect (``Dialect.classify``,
``gateway/stream/dialect.py``):

========  ============================================================================
DATA      an object to relay (chat chunk, Responses event); relayed as its own bytes
USAGE     data that carries the request's token counts (``usage``; Responses: inside
          ``response``); noted in ``usage`` (``gateway/stream/usage.py``), relayed like DATA
CREATED   a Responses ``response.created``: noted in ``created`` (the id of the response,
          which the gateway records before it reaches the client), relayed like DATA
TERMINAL  ``[DONE]``, or a Responses ``response.completed`` / ``incomplete`` / ``failed``
ERROR     an object with an ``error`` member (however its key was spelled), or a Responses
          ``"type": "error"`` event: never relayed; the stream ends with the gateway's
          own error frame, its strings redacted (``stream_error``,
          ``gateway/upstream/errors.py``)
OTHER     a comment (an upstream's keep-alive), or JSON that is not an object
HIDDEN    a chat usage chunk (``choices: []``) of a stream whose client did not ask for
          usage: the gateway asks on every chat stream (its token limits, its log), and
          drops that chunk, noted as USAGE, unless the client asked too (``hide_usage``)
========  ============================================================================

Events already in the one-line form pass as the very bytes the upstream sent; an event is
re-encoded (orjson, one ``data:`` line) only when it must change: multi-line or CR-framed
events, a model alias to rewrite back, an operator secret to take out. A secret counts whole
or in part (any ``PART_CHARS`` consecutive characters of it, ``gateway/errors.py``), and on
every line of an event, not only in its data: a comment or a field that holds a part is
dropped, an event name that holds one is redacted (``_outside_data``), decided on the parsed
lines as the data is.

Parsing every event into Python objects is most of the relay's cost when events come in bursts.
So a region of one-line ``data:`` events (nearly every upstream read) is first checked by
simdjson, each payload on its own (building no objects, for a fraction of a parse's cost:
``docs/performance.md``), and sent as it is when no event in it *can* be anything but DATA.
That is proved, not guessed: a JSON key or string can only be spelled with its own characters
or with ``\\u`` escapes, so a region holding neither ``"error"`` nor ``\\u`` holds no ``error``
member, and one whose bytes hold no part of an operator secret (``Secrets.may_be_in``) holds no
string with a part in it (a secret with a character JSON may escape otherwise, ``/`` for one,
sends every region with an escape to the exact path). The byte checks only send a region to the
exact path; they never decide what an event is. Usage is found the same way: each payload that
spells ``"usage"`` is parsed, last first, until one carries it; for a read of one event (a
paced stream's, with usage on every chunk as xAI sends it unasked) the very parse that
validated it says whether it carries one, and the payload is kept, to be parsed only when the
usage is read at the stream's end.
``tests/guarantees/test_render_fuzz.py`` holds every split of every stream to the bytes of a
reference that parses every event.
"""

from __future__ import annotations

import collections
import operator
from collections.abc import Callable
from typing import Any

import orjson
import simdjson

from ..errors import GatewayError, UpstreamFailure, UpstreamProtocolError, redact
from ..upstream.errors import redact_strings, stream_error
from ..upstream.secrets import NO_SECRETS, Secrets
from .dialect import CHAT, Dialect, Kind
from .sse import DONE, DONE_EVENT, Event, Fields, SSEFramer, SSEProtocolError, encode_event
from .usage import KEPT_USAGE_BYTES, UsageTracker

Rewrite = Callable[[Any], Any]
"""Changes a parsed answer object in place (model aliases)."""

Rendered = tuple[bytes, bool, "UpstreamFailure | None"]
"""What to send now; whether the terminal event went out; the failure that ends the stream."""


class StreamRenderer(UsageTracker):
    """One stream's framer and the counts the access log and metrics read when it ends (its
    token ``usage`` among them, kept by ``UsageTracker``)."""

    __slots__ = ("framer", "rewrite", "secrets", "probes", "long_read", "escapable", "clean",
                 "fast", "hide_usage", "events", "seq", "bytes_out", "tail", "created")

    def __init__(self, dialect: Dialect = CHAT, *, rewrite: Rewrite | None = None,
                 secrets: Secrets = NO_SECRETS, max_event_bytes: int = 4 * 1024 * 1024,
                 fast: bool = True, hide_usage: bool = False) -> None:
        super().__init__(dialect)
        self.framer = SSEFramer(max_event_bytes)
        self.rewrite = rewrite
        self.secrets = secrets
        self.probes = secrets.probes  # looked up on every read: one attribute, not two
        self.long_read = secrets.long_read
        self.escapable = secrets.escapable
        self.clean: bytes | None = None  # a chunk's head known to hold no secret (``_head``)
        # The region shortcut: chat, no alias. ``fast=False`` is the reference that parses all.
        self.fast = fast and rewrite is None and not dialect.responses_api
        self.hide_usage = hide_usage
        self.events = 0  # events sent, the terminal one included
        self.seq = 0  # data events sent: a Responses error event continues their numbering
        self.bytes_out = 0
        self.tail = 0  # the bytes of the terminal event, at the end of the last output
        self.created: Any = None  # a Responses ``response.created`` event, until taken

    def feed(self, chunk: bytes) -> Rendered:
        """One upstream read."""
        framer = self.framer
        if self.fast and framer.idle and chunk[-2:] == b"\n\n" and b"\r" not in chunk \
                and len(chunk) <= framer.max_event_bytes:
            # The common read: whole events and nothing held. The framer would return the
            # chunk as it is, so the shortcut may look at it first.
            sent = self._region(chunk)
            if sent is not None:
                return sent
        try:
            region = framer.take(chunk)
            held = framer.held_events()
            whole = framer.clean and not held
            if region and whole and self.fast and len(region) <= framer.max_event_bytes:
                sent = self._region(region)
                if sent is not None:
                    return sent
            events = framer.split(region) + held if region else held
        except SSEProtocolError as e:
            return b"", False, _malformed(e)
        return self._events(events, region if whole else None)

    def close(self) -> Rendered:
        """The upstream's end: a last event without its blank line still counts; a stream
        that ends before its terminal event is a failure."""
        try:
            events = self.framer.close()
        except SSEProtocolError as e:
            return b"", False, _malformed(e)
        out, done, failure = self._events(events, None)
        if not done and failure is None:
            failure = UpstreamProtocolError("The upstream stream ended before it was complete")
        return out, done, failure

    def error_frame(self, err: GatewayError) -> bytes:
        """The stream's last event when ``err`` ends it after headers were sent."""
        return self.dialect.error_frame(err, self.seq)

    # The shortcut: a region of one-line data events, sent as it came.

    def _region(self, region: bytes) -> Rendered | None:
        """A region of complete events, LF only, sent as it is when every event in it is one
        ``data:`` line holding one valid JSON value that can only be DATA (or USAGE), with
        ``[DONE]`` at most last. None when the per-event path must decide (the module
        docstring says why that is exact)."""
        if region[:6] != b"data: ":
            return None
        if region.find(b"\n") == len(region) - 2:
            payloads = [region[6:-2]]  # one event: the common read of a paced stream
        else:
            payloads = region[6:-2].split(b"\n\ndata: ")
            if region.count(b"\n") != 2 * len(payloads):
                return None  # an event of more than one line, or of other fields
        n = len(payloads)
        done = payloads[-1] == DONE
        k = n - 1 if done else n  # events before [DONE]
        hidden = None
        if self.hide_usage and k and b'"usage"' in payloads[k - 1]:
            # The usage chunk the gateway asked for, last before [DONE] as upstreams send it:
            # taken out here, so that the rest of its read stays on this path.
            rest = self._without_asked_usage(region, payloads, done)
            if rest is None:
                return None
            (region, hidden), n, k = rest, n - 1, k - 1
        if k:
            if b'"error"' in region or (b"\\" in region and (
                    b"\\u" in region or self.escapable)):
                return None  # maybe an error member, or a part of a secret, however spelled
            probes = self.probes  # no probe byte, no part of a secret: the common read, here
            if probes and (len(region) > self.long_read
                           or len(region.translate(None, probes)) != len(region)):
                if self.clean is None:
                    self.clean = _head(payloads[0], self.secrets)
                if self.secrets.near_probes(region, self.clean):  # the rest of the test
                    return None
            if k == 1:  # the common read of a paced stream: one parse validates and reads
                spells = b'"usage"' in region
                carries = _one_json_value(payloads[0], spells)
                if carries is _UNDECIDED or (spells and self.hide_usage):
                    return None  # (hidden or not: the exact path decides)
                if carries and len(payloads[0]) <= KEPT_USAGE_BYTES:
                    self._usage_payload = payloads[0]
                elif carries:  # not kept: a long one would double what a stream may hold
                    self._note_usage_in(payloads[0])
            elif not _each_one_json_value(payloads, k) or (b'"usage"' in region and (
                    self.hide_usage or not self._usage_in(payloads, k))):
                return None
        if hidden is not None:
            self._note_usage(hidden)
        if done:
            self.tail = len(DONE_EVENT)
        self.seq += k
        self.events += n
        self.bytes_out += len(region)
        return region, done, None

    # The exact path: every event parsed and classified.

    def _events(self, events: list[Event], whole: bytes | None) -> Rendered:
        """``whole`` is the region of upstream bytes that held exactly these events: if they
        all pass as they came, it is sent as it is, with no join."""
        parts: list[bytes] = []
        unchanged = 0
        done = False
        failure: UpstreamFailure | None = None
        for ev in events:
            try:
                out, kind = self._event(ev)
            except UpstreamFailure as err:
                failure = err
                break
            parts.append(out)
            unchanged += out is ev.raw
            if (kind is Kind.OTHER and ev.data is None) or kind is Kind.HIDDEN:
                continue  # a comment or a dropped usage chunk: not an event of the API's
            self.events += 1
            if kind is Kind.TERMINAL:
                self.tail = len(out)
                done = True
                break
            self.seq += 1
        out = whole if whole is not None and unchanged == len(events) else b"".join(parts)
        self.bytes_out += len(out)
        return out, done, failure

    def _event(self, ev: Event) -> tuple[bytes, Kind]:
        """One event as it goes out, and what it is; raises the failure it means."""
        data = ev.data
        if data is None:
            if ev.raw[:1] != b":":
                # Fields but no data (an event name, an id): nothing these APIs send, and the
                # mark of a data line merged into another field by broken framing.
                raise UpstreamProtocolError(
                    "The upstream stream was malformed: an event without data")
            if self.probes and self.secrets.may_be_in(ev.raw) and \
                    _redacted(ev.raw, self.secrets.text) is not ev.raw:
                return b"", Kind.OTHER  # a comment holding a part of a secret: dropped
            return ev.raw, Kind.OTHER
        if data == DONE:
            if self.probes and self.secrets.may_be_in(ev.raw):
                fields, held = _outside_data(ev, self.secrets.text)
                if held:
                    return encode_event(ev, None, fields), Kind.TERMINAL
            return (ev.raw if ev.verbatim else encode_event(ev)), Kind.TERMINAL
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise UpstreamProtocolError(
                "The upstream stream was malformed: an event's data is not valid JSON") from None
        kind = self.dialect.classify(obj)
        if kind is Kind.ERROR:
            inner = obj.get("error")
            raise stream_error(obj if inner is None else inner, self.secrets.text)
        if kind is not Kind.DATA:
            if kind is Kind.USAGE or kind is Kind.TERMINAL:
                self._note_usage(obj)
                if self.hide_usage and kind is Kind.USAGE and obj.get("choices") == []:
                    return b"", Kind.HIDDEN
            elif kind is Kind.CREATED:
                self.created = obj  # the response's id, for its record (``stream/recording.py``)
        try:
            return _reencoded(ev, obj, kind, self.rewrite, self.secrets), kind
        except (TypeError, RecursionError):  # orjson writes 254 levels; the reader takes 1024
            raise UpstreamProtocolError(
                "The upstream stream was malformed: an event nested too deeply") from None


def _reencoded(ev: Event, obj: Any, kind: Kind, rewrite: Rewrite | None, secrets: Secrets
               ) -> bytes:
    """The event's bytes: as they came, unless an alias or a secret must change them. Every
    line of the event is looked at, not only its data (``_outside_data``)."""
    changed = False
    fields: Fields | None = None
    if rewrite is not None and isinstance(obj, dict):
        rewrite(obj)
        changed = True
    held = bool(secrets.probes) and secrets.may_hold(ev.raw, obj)
    if held or (kind is Kind.TERMINAL and obj.get("type") == "response.failed"):
        clean = redact_strings(obj, secrets.text)
        changed = changed or clean != obj
        obj = clean
    if held:
        fields, outside = _outside_data(ev, secrets.text)
        changed = changed or outside
    if changed:
        return encode_event(ev, obj, fields)
    return ev.raw if ev.verbatim else encode_event(ev, obj)


def _head(payload: bytes, secrets: Secrets) -> bytes:
    """What a stream's chunks repeat before their ``choices``: the id (random, and as rich in a
    secret's probe bytes as a key), the object, the time, the model. Taken from the stream's
    first chunk that holds a probe byte, from its ``{`` to the ``,`` before ``"choices"``,
    bytes no key holds, once it is found to hold no part of a secret (nor an escape that could
    spell one): ``Secrets.near_probes`` leaves its copies out of the search. Empty when there
    is none such."""
    head = payload[:payload.find(b',"choices"') + 1]
    if not secrets.is_clean(head) or b"\\" in head or secrets.may_be_in(head):
        return b""
    return head


def _outside_data(ev: Event, text: tuple[str, ...]) -> tuple[Fields, bool]:
    """The event's name, id and retry as they may go out, and whether a line besides its
    data held a part of a secret. Re-encoded, the event keeps its name (redacted: it is
    still the event the client expects) and loses the rest that held one: an id or a retry
    (a client keeps an id to send back, and a retry is a number or nothing), a comment, a
    field that a later one of its name overrode (re-encoding writes neither). Decided on
    the parsed lines, as the data is; SSE has no escapes, so their bytes are what a client
    reads."""
    held = any(_redacted(line, text) is not line
               for line in ev.raw.split(b"\n") if line and line[:5] != b"data:")
    name, id_, retry = ev.event, ev.id, ev.retry
    if name is not None:
        clean = _redacted(name, text)
        held = held or clean is not name
        name = clean
    if id_ is not None and _redacted(id_, text) is not id_:
        id_, held = None, True
    if retry is not None and _redacted(retry, text) is not retry:
        retry, held = None, True
    return (name, id_, retry), held


def _redacted(value: bytes, secrets: tuple[str, ...]) -> bytes:
    """``value`` itself if it holds nothing to redact, else its redacted bytes."""
    text = value.decode("utf-8", "replace")
    clean = redact(text, secrets)
    return value if clean == text else clean.encode()


def _malformed(e: SSEProtocolError) -> UpstreamProtocolError:
    return UpstreamProtocolError(f"The upstream stream was malformed: {e}")


_VALIDATOR = simdjson.Parser()
_FIRST_BYTE = operator.itemgetter(0)
_UNDECIDED: Any = object()


def _one_json_value(payload: bytes, spells_usage: bool) -> Any:
    """``_each_one_json_value`` for one payload and, from the same parse, when the payload
    spells ``"usage"``, whether it carries a usage that ``_note_usage`` would take (a non-empty
    object at the top): True or False. ``_UNDECIDED`` sends the exact path to decide: not one
    valid value, not an object, or ``"usage"`` spelled twice (a duplicate key: orjson and
    clients take the last, simdjson the first). One parse, and no Python objects built: the
    usage itself is parsed only when it is read (``UsageTracker.usage``)."""
    if payload[:1] == b"\xef":
        return _UNDECIDED
    try:
        doc = _VALIDATOR.parse(payload)
    except Exception:  # noqa: BLE001 (invalid, or past simdjson's limits)
        return _UNDECIDED
    if not spells_usage:
        return False  # the proxy goes with this frame: the parser is free again
    if not isinstance(doc, simdjson.Object) or payload.count(b'"usage"') != 1:
        return _UNDECIDED
    usage = doc.get("usage")
    return isinstance(usage, simdjson.Object) and len(usage) > 0


def _each_one_json_value(payloads: list[bytes], k: int) -> bool:
    """Whether each of the first ``k`` payloads is one valid JSON value, UTF-8 included,
    checked one by one so that no value can start in one event and end in the next. simdjson
    validates without building Python objects (cheaper than orjson's parse), each proxy dropped
    at once so that the parser is reused; it also skips a leading UTF-8 BOM, which a client's
    parser refuses, so none may start so."""
    if k < len(payloads):
        payloads = payloads[:k]
    if b"\xef" in bytes(map(_FIRST_BYTE, payloads)):  # type: ignore[arg-type]
        return False
    try:
        _DISCARD.extend(map(_VALIDATOR.parse, payloads))  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 (invalid, or past simdjson's limits: the exact path decides)
        return False
    return True


_DISCARD: collections.deque[Any] = collections.deque(maxlen=0)
