"""The token usage one stream carried, by the one rule both of the renderer's paths follow
(``gateway/stream/render.py``): the latest non-empty usage object counts. Read once, when the
stream ends, for the access log, the metrics and, later, settling a token budget.

The exact path notes a usage from the event it parsed. The shortcut parses nothing into Python
objects: when it sends a one-event read that carries a usage (xAI sends the running usage on
every chunk, unasked), it keeps the payload, which is parsed here, once, when the usage is
read. Taking the usage out of every such chunk as it passed was a large share of the relay's
Python per event (``docs/performance.md``).
"""

from __future__ import annotations

from typing import Any

import orjson

from .dialect import Dialect, Kind
from .sse import DONE_EVENT

KEPT_USAGE_BYTES = 64 * 1024
"""A payload that carries usage is kept to be parsed later up to this size, which is far past an
ordinary chunk's: the framer's ``max_event_bytes`` bounds what a stream holds, and a kept
payload must not double it."""


class UsageTracker:
    """The usage part of a ``StreamRenderer``: its base class, not a member, because both render
    paths note a usage per event, and a member would cost each such event a lookup more."""

    __slots__ = ("dialect", "_usage", "_usage_payload")

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect  # where the usage sits in an event
        self._usage: dict[str, Any] | None = None
        self._usage_payload: bytes | None = None  # a newer usage, not parsed yet (``usage``)

    @property
    def usage(self) -> dict[str, Any] | None:
        """The latest non-empty usage the stream carried; a kept payload is parsed here."""
        payload = self._usage_payload
        if payload is not None:
            self._usage_payload = None
            self._note_usage_in(payload)
        return self._usage

    def _usage_in(self, payloads: list[bytes], k: int) -> bool:
        """Note the last usage among the first ``k`` payloads that spell it; False if one of
        them is not an object (the exact path then decides)."""
        for i in range(k - 1, -1, -1):
            if b'"usage"' in payloads[i]:
                obj = orjson.loads(payloads[i])
                if not isinstance(obj, dict):
                    return False
                if self._note_usage(obj):
                    return True
        return True

    def _note_usage_in(self, payload: bytes) -> None:
        try:
            self._note_usage(orjson.loads(payload))
        except orjson.JSONDecodeError:  # past orjson's limits, though simdjson took it
            pass

    def _note_usage(self, obj: Any) -> bool:
        """The one usage rule of both paths: the latest non-empty usage object counts."""
        usage = self.dialect.usage(obj)
        if usage:
            self._usage, self._usage_payload = usage, None
            return True
        return False

    def _without_asked_usage(self, region: bytes, payloads: list[bytes], done: bool
                             ) -> tuple[bytes, Any] | None:
        """``region`` without its last event before ``[DONE]`` when that is a usage chunk to
        drop, as the exact path decides it (one JSON object, no error, ``choices: []``, a
        usage), taken out of ``payloads``, and the chunk (its usage is to be noted if the
        region is sent); None when it is not."""
        k = len(payloads) - done
        payload = payloads[k - 1]
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
        if self.dialect.classify(obj) is not Kind.USAGE or obj.get("choices") != []:
            return None
        del payloads[k - 1]
        end = len(region) - (len(DONE_EVENT) if done else 0)
        return region[:end - len(payload) - len(b"data: \n\n")] + region[end:], obj
