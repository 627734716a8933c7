"""The renderer of a stream that may still move to another upstream: it says whether anything
the client would count as output has gone out (``before_output``), and on the Responses API it
holds back the preamble (``response.created``, ``response.in_progress``, and comments between
them) until the first event that is output. Pure, as ``gateway/stream/render.py`` is.

Why hold the preamble: xAI and OpenAI answer 200 and send ``response.created`` before they know
whether the model can answer; a quota or capacity failure then comes as ``response.failed`` or
an ``error`` event. Sent on at once, the preamble would tie the client to that upstream (it
would hold a response id no other upstream knows), and the failure would reach it raw. Held,
the failure moves the request to another upstream (``gateway/stream/failover.py``), and the
client sees one answer, as if from that one. Where the request may not move, nothing is held:
the preamble goes out as it comes. Only the exact path (which every Responses event takes)
holds: chat streams have no preamble, and their fast path is left as it is.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..upstream.secrets import NO_SECRETS, Secrets
from .dialect import CHAT, Dialect
from .render import Rendered, Rewrite, StreamRenderer
from .sse import DONE, Event

_PREAMBLE = frozenset(("response.created", "response.in_progress"))


class PreambleHeld(StreamRenderer):
    __slots__ = ("hold", "held", "early")

    def __init__(self, dialect: Dialect = CHAT, *, hold: bool = False,
                 rewrite: Rewrite | None = None, secrets: Secrets = NO_SECRETS,
                 max_event_bytes: int = 4 * 1024 * 1024, hide_usage: bool = False) -> None:
        super().__init__(dialect, rewrite=rewrite, secrets=secrets,
                         max_event_bytes=max_event_bytes, hide_usage=hide_usage)
        self.hold = hold
        self.held: list[bytes] | None = [] if hold else None  # until the first output
        self.early = False  # the first event past the preamble was a failure

    @property
    def before_output(self) -> bool:
        """Whether the client has had nothing but, at most, the preamble and a failure."""
        return self.events == 0 or self.held is not None or self.early

    def fresh(self) -> PreambleHeld:
        """The same renderer, unused: for the next upstream's stream."""
        return PreambleHeld(self.dialect, hold=self.hold, rewrite=self.rewrite,
                            secrets=self.secrets, max_event_bytes=self.framer.max_event_bytes,
                            hide_usage=self.hide_usage)

    def _events(self, events: list[Event], whole: bytes | None) -> Rendered:
        held = self.held
        if held is None:
            return super()._events(events, whole)
        at = 0
        for ev in events:
            if not _preamble(ev):
                break
            out, done, failure = super()._events([ev], None)
            if failure is not None or done:  # not what a preamble can be: no longer held
                self.held = None
                return b"".join(held) + out, done, failure
            held.append(out)
            at += 1
        else:
            return b"", False, None
        self.held = None
        first = events[at]
        out, done, failure = super()._events(events[at:], None)
        self.early = (failure is not None and not out) or _type(first) == "response.failed"
        return b"".join(held) + out, done, failure


def _preamble(ev: Event) -> bool:
    """A comment, or an event whose parsed ``type`` is of the preamble."""
    if ev.data is None:
        return ev.raw[:1] == b":"
    return ev.data != DONE and _type(ev) in _PREAMBLE


def _type(ev: Event) -> Any:
    """The event's parsed ``type`` (None for anything else: the render path decides on it)."""
    if ev.data is None or ev.data == DONE:
        return None
    try:
        obj = orjson.loads(ev.data)
    except orjson.JSONDecodeError:
        return None
    return obj.get("type") if isinstance(obj, dict) else None
