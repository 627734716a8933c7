"""A stream relayed from one of several upstreams, which moves to the next one while the client
has had no output: the relay (``gateway/stream/relay.py``) with one more way through its states.

    WAITING ──headers──> STREAMING ──fails before any output──> (the next try) WAITING

When its upstream fails after the headers but before the first output (a chat stream whose first
event is an error, whose connection breaks or which ends before its first event; a Responses
stream whose first event past the preamble is ``response.failed`` or ``error``: the preamble is
held back by ``PreambleHeld``, ``gateway/stream/preamble.py``), the try is judged a failure and,
if the request may move (``Attempts.again``, ``gateway/upstream/upstreams.py``), that try's
answer is closed, the renderer is replaced by an unused one, and the relay waits for the next
upstream's headers. What the client may have had is the ``200`` and ``: keep-alive`` comments,
which are not output. Once output has gone out, a failure ends the stream as it always does.

Only a gateway with several upstreams builds this class (``Proxy.stream``): with one, the relay
does no more work per read than before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from ..errors import GatewayError, UpstreamFailure
from ..upstream.http1 import UpstreamResponse
from ..upstream.upstreams import Attempts
from .closing import give_back
from .preamble import PreambleHeld
from .recording import RecordingRelay
from .relay import State, StreamRelay

_MOVED = UpstreamFailure("moved to another upstream")
"""What ``ended`` holds while the relay moves to the next try (never sent anywhere)."""


class FailoverRelay(StreamRelay):
    __slots__ = ("tries", "current", "following", "pending")

    renderer: PreambleHeld

    def __init__(self, *args: object, tries: Attempts) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.tries = tries
        self.current: asyncio.Future[UpstreamResponse] | None = None
        self.following: Coroutine[Any, Any, UpstreamResponse] | None = None
        self.pending: BaseException | None | bool = False  # a finish() while moving

    async def _relay(self, task: asyncio.Future[UpstreamResponse]) -> BaseException | None:
        self.current = task
        while True:
            reason = await super()._relay(task)
            if reason is not _MOVED:
                return reason
            task = self.current = self._move(task)
            if self.pending is not False:
                self.finish(self.pending)  # type: ignore[arg-type]

    def _move(self, task: asyncio.Future[UpstreamResponse]) -> asyncio.Future[UpstreamResponse]:
        """The failed try's answer closed, everything it had given back; the next try."""
        give_back(task, self.upstream, None, self.settings.keepalive_seconds)
        if self.drainer is not None:
            self.drainer.cancel()
            self.drainer = None
        self.upstream = None
        self.watchdog = None
        self.ended = asyncio.Future()
        self.upstream_end = asyncio.Future()
        self.renderer = self.renderer.fresh()
        if self.spend is not None:
            self.spend.answered = False  # the next try's 2xx says so again; none: a refund
        self.state = State.WAITING
        assert self.following is not None
        following, self.following = self.following, None
        return asyncio.ensure_future(following)

    def _moved(self) -> bool:
        """Called where the stream would end: whether it moves to another upstream instead."""
        if not self.running or not self.renderer.before_output or not self.tries.may_move:
            return False
        self.following = self.tries.again()
        if self.following is None:
            return False
        if self.state is State.PAUSED and self.upstream is not None:
            self.upstream.resume_reading()  # what follows is drained, unread
        self.state = State.FINISHING
        if self.watchdog is not None:
            self.watchdog.cancel()
        self.ended.set_result(_MOVED)
        return True

    def _send(self, out: bytes, done: bool, failure: GatewayError | None) -> None:
        if (failure is not None or (done and self.renderer.early)) and self._moved():
            if failure is not None:
                # Its trace's frames (the renderer's) hold the failure: a cycle, as ``finish``
                # says, that only the collector would free.
                failure.with_traceback(None)
            return
        super()._send(out, done, failure)

    def _on_end(self, error: BaseException | None) -> None:
        if error is not None and self._moved():
            return
        super()._on_end(error)

    def finish(self, reason: BaseException | None) -> None:
        if self.ended.done() and self.ended.result() is _MOVED:
            if self.pending is False:
                self.pending = reason  # the next try starts ended
            return
        super().finish(reason)

    async def _close(self, reason: BaseException | None, task: asyncio.Future[UpstreamResponse]
                     ) -> web.StreamResponse:
        self.tries.settle(reason)
        return await super()._close(reason, self.current or task)

    def _release(self, task: asyncio.Future[UpstreamResponse], clean: bool) -> None:
        if self.following is not None:  # the client left as the stream moved: never started
            self.following.close()
            self.following = None
        self.tries.settle(None)  # the client left: judged by what the upstream did so far
        super()._release(self.current or task, clean)


class RecordingFailoverRelay(RecordingRelay, FailoverRelay):
    """A Responses stream of several upstreams that the upstream stores: it may move before
    its first output, and each ``response.created`` it relays is recorded first, with the
    upstream that made it (``info.upstream`` as the record is written)."""
