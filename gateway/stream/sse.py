"""Incremental Server-Sent Events framing: bytes in, events out; no I/O, no package imports.

The framer splits an upstream byte stream into events at blank lines, whatever the chunk
boundaries (inside a line, inside ``\\r\\n``, inside a UTF-8 character: it splits only at ASCII
line breaks, so multi-byte characters are never cut). Line endings may be LF, CRLF or CR
(https://html.spec.whatwg.org/multipage/server-sent-events.html#parsing-an-event-stream).

Each event keeps its exact bytes. An event already in the form every SSE client reads (LF line
endings, at most one ``data:`` line, only known fields or comments) is ``verbatim`` and the relay
forwards those very bytes. Anything else is parsed leniently and re-encoded by ``encode_event``
into ``[event: ...\\n]data: <one line>\\n\\n``. Lenient means the multi-line JSON of xAI's own
docs is understood: lines after ``data: {`` that carry no field name continue the data, and a new
``data:`` line after a complete JSON value starts a new event even without a blank line.

Two things raise ``SSEProtocolError`` instead of being guessed at: an event that grows past
``max_event_bytes`` without a blank line (memory stays bounded), and a line that is neither a
known field (``data``, ``event``, ``id``, ``retry``), a comment, nor the continuation of a
``data:`` value (garbage: the upstream is not sending an event stream).
"""

from __future__ import annotations

from typing import Any

import orjson

DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"
"""The terminal event as upstreams send it, in the one-line form."""
KEEPALIVE = b": keep-alive\n"
"""A comment line with no blank line after it: it keeps proxies awake but dispatches no event."""

_Fields = tuple["bytes | None", "bytes | None", "bytes | None", "bytes | None"]
Fields = tuple["bytes | None", "bytes | None", "bytes | None"]
"""An event's ``event``, ``id`` and ``retry`` values (None: not written), as ``encode_event``
writes them."""
_KNOWN_FIELDS = (b"data", b"event", b"id", b"retry")


class SSEProtocolError(ValueError):
    """The upstream's stream cannot be framed (an event larger than the limit, or garbage)."""


class Event:
    """One SSE event: ``raw`` is its bytes, ending in ``\\n\\n`` (LF-normalised)."""

    __slots__ = ("raw", "verbatim", "_fields")

    def __init__(self, raw: bytes, verbatim: bool, fields: _Fields | None = None) -> None:
        self.raw = raw
        self.verbatim = verbatim
        self._fields = fields

    def _parse(self) -> _Fields:
        if self._fields is None:
            self._fields = _parse_block(self.raw)[0]
        return self._fields

    @property
    def data(self) -> bytes | None:
        """The joined ``data:`` lines, or None for an event with no data (comments only)."""
        if self._fields is None and self.raw[:6] == b"data: " \
                and self.raw.find(b"\n") == len(self.raw) - 2:
            return self.raw[6:-2]  # the common case: one `data: ` line, nothing to parse
        return self._parse()[0]

    @property
    def event(self) -> bytes | None:
        return self._parse()[1]

    @property
    def id(self) -> bytes | None:
        return self._parse()[2]

    @property
    def retry(self) -> bytes | None:
        return self._parse()[3]

    def __repr__(self) -> str:
        return f"Event({self.raw!r}, verbatim={self.verbatim})"


def _is_complete_json(data: list[bytes]) -> bool:
    joined = b"\n".join(data)
    if joined[:1] not in (b"{", b"["):
        return False
    try:
        orjson.loads(joined)
    except orjson.JSONDecodeError:
        return False
    return True


def _parse_block(block: bytes) -> list[_Fields]:
    """Parse an LF-only block leniently into one or more events' fields."""
    out: list[_Fields] = []
    data: list[bytes] = []
    event = id_ = retry = None
    for line in block.split(b"\n"):
        if not line or line[0] == 58:  # blank, or ":" comment
            continue
        name, sep, value = line.partition(b":")
        if name not in _KNOWN_FIELDS or not sep:
            if not data:
                # Not a field, and no data for it to continue: not an event stream (an HTML
                # error page, binary junk). Dropping it, as a browser would, could turn a broken
                # upstream into a clean-looking stream; the relay ends the stream instead.
                raise SSEProtocolError("the upstream sent a line that is not an SSE field")
            data.append(line)  # an unprefixed continuation of multi-line JSON
            continue
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            if data and _is_complete_json(data):
                out.append((b"\n".join(data), event, id_, retry))
                data, event, id_, retry = [], None, None, None
            data.append(value)
        elif name == b"event":
            event = value
        elif name == b"id":
            id_ = value
        else:
            retry = value
    if data or event is not None or id_ is not None or retry is not None or not out:
        out.append((b"\n".join(data) if data else None, event, id_, retry))
    return out


def _is_verbatim(block: bytes) -> bool:
    """True when the block (LF-only, ending in one blank line) can be forwarded as it is."""
    if block[:5] == b"data:" and block.find(b"\n") == len(block) - 2:
        return True  # fast path: a single data line
    seen_data = False
    for line in block[:-2].split(b"\n"):
        if line[:1] == b":":
            continue
        name, sep, _ = line.partition(b":")
        if not sep or name not in _KNOWN_FIELDS:
            return False
        if name == b"data":
            if seen_data:
                return False
            seen_data = True
    return True


class SSEFramer:
    """Feed it chunks; it returns the events they complete."""

    __slots__ = ("_buf", "_scan_from", "_dirty", "_skip_lf", "max_event_bytes", "clean")

    def __init__(self, max_event_bytes: int = 4 * 1024 * 1024) -> None:
        self._buf = bytearray()
        self._scan_from = 0  # where to resume looking for a blank line in _buf
        self._dirty = False  # _buf holds bytes whose line endings were rewritten
        self._skip_lf = False  # the last chunk ended in CR: a leading LF next is its CRLF's
        self.max_event_bytes = max_event_bytes
        # After take(): the region returned is exactly the bytes received (line endings
        # untouched), so a relay may forward it as it is when its events are all verbatim.
        self.clean = False

    @property
    def pending(self) -> int:
        """Bytes held for an incomplete event."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[Event]:
        """Add a chunk; the events it completes."""
        region = self.take(chunk)
        events = self.split(region) if region else []
        return events + self.held_events() if self._buf else events

    def take(self, chunk: bytes) -> bytes:
        """Add a chunk and cut off the bytes of every event it completes: what was held before
        and the chunk up to its last blank line (LF line endings). The rest is held. A relay
        can forward a region whole; ``split`` makes it events. Then call ``held_events``."""
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:
            self._skip_lf = chunk[-1:] == b"\r"
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            self._dirty = True
        if not self._buf:
            # Nothing held: cut the chunk itself, without copying it when it ends an event.
            end = chunk.rfind(b"\n\n")
            if end == -1:
                self._buf += chunk
                return b""
            self.clean = not self._dirty
            if end + 2 == len(chunk):
                self._dirty = False
                return chunk
            rest = chunk[end + 2:]
            if rest.strip(b"\n"):
                self._buf += rest
            else:
                self._dirty = False  # extra blank lines belong to no event
            return chunk[:end + 2]
        self._buf += chunk
        end = self._buf.rfind(b"\n\n", max(self._scan_from - 1, 0))
        if end == -1:
            return b""
        region = bytes(self._buf[:end + 2])
        del self._buf[:end + 2]
        self.clean = not self._dirty
        if not self._buf.strip(b"\n"):
            self._buf.clear()
            self._dirty = False
        return region

    def split(self, region: bytes) -> list[Event]:
        """The events of a region that ``take`` returned."""
        return self._split(region, len(region))

    @property
    def idle(self) -> bool:
        """Nothing is held: a chunk of whole events may skip ``take``."""
        return not self._buf and not self._skip_lf

    def held_events(self) -> list[Event]:
        """Events that the held bytes prove complete without a blank line (xAI's documented
        frames); raises when what is held outgrows the event size limit."""
        if not self._buf:
            self._scan_from = 0
            return []
        return self._no_blank_line()

    def close(self) -> list[Event]:
        """End of input: a trailing event without its blank line still counts."""
        rest = bytes(self._buf).strip(b"\n")
        self._buf.clear()
        self._scan_from = 0
        self._dirty = False
        if not rest:
            return []
        if len(rest) > self.max_event_bytes:
            raise SSEProtocolError(f"upstream event exceeds {self.max_event_bytes} bytes")
        return self._parsed(rest + b"\n\n")

    def _no_blank_line(self) -> list[Event]:
        """``_buf`` has no blank line. Cut off events that a new ``data:`` line proves complete
        (xAI's documented multi-line frames come without blank lines), else check the size."""
        events: list[Event] = []
        at = self._buf.find(b"\ndata:", max(self._scan_from - 6, 0))
        while at != -1:
            head = bytes(self._buf[:at + 1])
            fields = _parse_block(head)
            data = fields[-1][0]
            if data is not None and _is_complete_json([data]):
                del self._buf[:at + 1]
                events += self._parsed(head + b"\n")
                at = self._buf.find(b"\ndata:")
            else:
                at = self._buf.find(b"\ndata:", at + 1)
        self._scan_from = len(self._buf)
        if len(self._buf) > self.max_event_bytes:
            raise SSEProtocolError(
                f"upstream event exceeds {self.max_event_bytes} bytes without a blank line")
        return events

    def _check_sizes(self, data: bytes, end: int) -> None:
        """An event that arrived whole, in one chunk, is held to the limit too."""
        start = 0
        while start < end:
            stop = data.find(b"\n\n", start, end)
            if stop - start > self.max_event_bytes:
                raise SSEProtocolError(f"upstream event exceeds {self.max_event_bytes} bytes")
            start = stop + 2

    def _parsed(self, block: bytes) -> list[Event]:
        return [Event(block, verbatim=False, fields=f) for f in _parse_block(block)
                if f != (None, None, None, None)]

    def _split(self, data: bytes, end: int) -> list[Event]:
        """Split ``data[:end]``, which ends in a blank line, into events."""
        if end > self.max_event_bytes:
            self._check_sizes(data, end)  # rare: only chunks larger than the limit
        dirty = not self.clean
        events: list[Event] = []
        start = 0
        while start < end:
            stop = data.find(b"\n\n", start, end) + 2
            block = data[start:stop]
            start = stop
            while start < end and data[start] == 10:
                start += 1  # extra blank lines between events belong to no event
            if not dirty and block[0] != 10 and _is_verbatim(block):
                events.append(Event(block, verbatim=True))
                continue
            body = block.strip(b"\n")
            if body:
                if body[:1] == b":" and b"\n" not in body:
                    events.append(Event(body + b"\n\n", verbatim=True))  # an upstream ping
                else:
                    events += self._parsed(body + b"\n\n")
        return events


def encode_event(event: Event, data_obj: Any = None, fields: Fields | None = None) -> bytes:
    """Re-encode an event as at most one ``data:`` line (JSON compacted by orjson), and no
    comment.

    ``data_obj``, when given, replaces the event's data (a field the gateway rewrote);
    ``fields``, when given, its ``event``, ``id`` and ``retry`` (values the relay took a
    secret out of, or dropped).
    """
    name, id_, retry = (event.event, event.id, event.retry) if fields is None else fields
    out = bytearray()
    if name is not None:
        out += b"event: " + name + b"\n"
    if id_ is not None:
        out += b"id: " + id_ + b"\n"
    if retry is not None:
        out += b"retry: " + retry + b"\n"
    if data_obj is not None:
        out += b"data: " + orjson.dumps(data_obj) + b"\n"
    elif event.data is not None:
        try:
            out += b"data: " + orjson.dumps(orjson.loads(event.data)) + b"\n"
        except orjson.JSONDecodeError:
            for line in event.data.split(b"\n"):
                out += b"data: " + line + b"\n"
    return bytes(out) + b"\n" if out else b""
