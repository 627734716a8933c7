"""One timer per stream, instead of a timeout around every read: keep-alives, a silent upstream,
a client that reads nothing, a stream that has lasted too long.

The read callback only stamps ``last``. When the upstream has been silent for a keep-alive
interval, the timer writes a ``: keep-alive`` comment (each write is whole events, so a comment
can only land between events); when the silence reaches the first-byte or idle limit, it ends
the stream with ``UpstreamTimeout``. A stream paused for a slow client is not silent: its clock
stops, and the client's starts. A client that reads nothing for the idle limit while the
upstream waits on it is treated as gone (``ClientGone``): its stream, lease and upstream
connection are not held for ever by a reader that stopped. Nor by one that keeps reading: at
its ``deadline`` (``[stream] max_duration_seconds`` after the request arrived) the stream ends
with ``StreamTooLong``, paused or not; the timer is set no later than the deadline, so that
costs no tick of its own.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from ..errors import StreamTooLong, UpstreamTimeout
from ..settings import StreamSettings
from .client_stream import ClientGone


class Watched(Protocol):
    """What the watchdog needs of a stream (``StreamRelay``, ``gateway/stream/relay.py``)."""

    @property
    def running(self) -> bool: ...
    @property
    def paused(self) -> bool: ...
    @property
    def started(self) -> bool:
        """An event has reached the client: the idle limit applies, not the first-byte one."""
    def ping(self) -> None:
        """Write a keep-alive comment; ``ClientGone`` when the client has left."""
    def finish(self, reason: BaseException | None) -> None:
        """End the stream for ``reason``."""


class Watchdog:
    __slots__ = ("stream", "loop", "interval", "first_byte_limit", "idle_limit", "max_duration",
                 "deadline", "last", "paused_since", "handle")

    def __init__(self, stream: Watched, settings: StreamSettings, started: float) -> None:
        """``started``: when the stream's request arrived (``time.monotonic``)."""
        self.stream = stream
        self.loop = asyncio.get_running_loop()
        self.interval = settings.keepalive_seconds
        self.first_byte_limit = settings.first_byte_timeout_seconds
        self.idle_limit = settings.idle_timeout_seconds
        self.max_duration = settings.max_duration_seconds
        self.deadline = started + self.max_duration
        self.last = time.monotonic()  # the upstream's last read (stamped by the relay)
        self.paused_since = 0.0
        self.handle: asyncio.TimerHandle | None = None
        self._again(self.interval, self.last)

    def pause(self) -> None:
        self.paused_since = time.monotonic()

    def resume(self) -> None:
        """The client drained: the upstream's silence counts from now, not from before."""
        self.last = time.monotonic()

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _tick(self) -> None:
        self.handle = None
        stream = self.stream
        if not stream.running:
            return
        now = time.monotonic()
        if now >= self.deadline:
            stream.finish(StreamTooLong(f"The stream reached its maximum duration of "
                                        f"{self.max_duration:g} seconds; the answer is cut "
                                        f"short here"))
            return
        if stream.paused:
            stalled = now - self.paused_since
            if stalled >= self.idle_limit:
                stream.finish(ClientGone(f"the client read nothing for {stalled:.3g} seconds"))
                return
            self._again(min(self.interval, self.idle_limit - stalled), now)
            return
        silent = now - self.last
        if silent < self.interval:
            self._again(self.interval - silent, now)
            return
        limit = self.idle_limit if stream.started else self.first_byte_limit
        if silent >= limit:
            stream.finish(UpstreamTimeout(f"The upstream sent nothing for {silent:.3g} seconds"))
            return
        try:
            stream.ping()
        except ClientGone as e:
            stream.finish(e)
            return
        self._again(min(self.interval, limit - silent), now)

    def _again(self, delay: float, now: float) -> None:
        """The next tick after ``delay`` seconds, and no later than the deadline."""
        delay = min(delay, self.deadline - now)
        self.handle = self.loop.call_later(max(delay, 0.001), self._tick)
