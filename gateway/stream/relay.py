"""One upstream event stream relayed to one client, with explicit states and one way out.

The life of a stream::

    WAITING ──headers──> STREAMING <──drained── PAUSED
       │                    │  └──client buffer full──┘ │
       └──────── every way out: finish(reason) ─────────┴──> FINISHING ──_close──> DONE

- WAITING: the upstream call is in flight. Response headers wait for the upstream's, so an
  upstream error keeps its true status; only if it is silent for one keep-alive interval does
  the gateway commit ``200`` and write ``: keep-alive`` comments (from then on an error can only
  be an SSE frame) (``await_headers``, ``gateway/stream/waiting.py``).
- STREAMING: each upstream read is handed, inside the upstream socket's read callback
  (``UpstreamResponse.stream``, ``gateway/upstream/http1.py``), to the renderer
  (``gateway/stream/render.py``) and its bytes written to the client
  (``gateway/stream/client_stream.py``) before the callback returns: no task switch per chunk.
- PAUSED: the client's send buffer is full; the upstream socket is not read until it drains,
  so a slow client slows the upstream and memory stays bounded.
- FINISHING: the end is decided. Every way out (the terminal event, an upstream error or end,
  a timeout, a stalled client or the maximum duration from the watchdog
  (``gateway/stream/watchdog.py``), a write that found the client gone, shutdown by ``stop()``,
  the key's revocation by ``revoke()``) calls ``finish`` with its reason; the handler's task,
  which only waits, then runs ``_close``, which writes the last bytes: the read that ended the
  stream, held back by ``_send``, and the error frame if any, with the end of the response
  (``end_response``, ``gateway/stream/closing.py``).
- DONE: ``_release`` has stopped the timers, counted the stream into the request's record and
  given the upstream connection back (``give_back``, ``gateway/stream/closing.py``). Every
  stream ends there, also one whose client left: aiohttp then cancels the handler's task, and
  the cancellation goes straight to ``_release`` (there is no one left to write to).

With several upstreams a stream is relayed by ``FailoverRelay`` (``gateway/stream/failover.py``),
which adds one way back: STREAMING to WAITING for the next upstream's headers, while no output
has gone out.

Shutdown and revocation are messages (``stop`` and ``revoke``, from ``InFlight``), not
cancellations. A cancellation of the task means the client left (aiohttp cancels the handler
when its connection drops).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable

from aiohttp import web

from ..errors import (
    GatewayError,
    KeyRevoked,
    ShuttingDown,
    UpstreamProtocolError,
)
from ..ratelimit.spend import Spend
from ..request_info import RequestInfo
from ..settings import StreamSettings
from ..upstream.http1 import UpstreamResponse
from ..upstream.secrets import Secrets
from .client_stream import ClientGone, ClientStream
from .closing import end_response, give_back
from .render import StreamRenderer
from .sse import KEEPALIVE
from .waiting import await_headers, error_answer, open_response
from .watchdog import Watchdog


class State(enum.Enum):
    WAITING = "waiting for headers"
    STREAMING = "streaming"
    PAUSED = "paused"
    FINISHING = "finishing"
    DONE = "done"


class StreamRelay:
    """One stream, built by ``Proxy.stream`` with everything it needs handed to it."""

    __slots__ = ("client", "renderer", "settings", "info", "headers", "secrets", "spend",
                 "state", "upstream", "ended", "upstream_end", "watchdog", "drainer", "last")

    def __init__(self, client: ClientStream, renderer: StreamRenderer, settings: StreamSettings,
                 info: RequestInfo, headers: dict[str, str], secrets: Secrets,
                 spend: Spend | None = None) -> None:
        self.client = client
        self.renderer = renderer
        self.settings = settings
        self.info = info
        self.headers = headers  # the client's response headers
        self.secrets = secrets
        self.spend = spend  # the key's token and spend limits, if it has any
        self.state = State.WAITING
        self.upstream: UpstreamResponse | None = None
        self.ended: asyncio.Future[BaseException | None] = asyncio.Future()
        self.upstream_end: asyncio.Future[BaseException | None] = asyncio.Future()
        self.watchdog: Watchdog | None = None
        self.drainer: asyncio.Task[None] | None = None
        self.last = b""  # the stream's last events, held to go out with its end

    def stop(self) -> None:
        """Shutdown, past the drain time: the stream ends with ``gateway_restarting``."""
        self.finish(ShuttingDown("The gateway is restarting; retry the request"))

    def revoke(self) -> None:
        """The stream's key was revoked: the stream ends with ``api_key_revoked``."""
        self.finish(KeyRevoked("This API key was revoked; the stream ends here"))

    async def run(self, call: Awaitable[UpstreamResponse]) -> web.StreamResponse:
        task: asyncio.Future[UpstreamResponse] = asyncio.ensure_future(call)
        try:
            reason = await self._relay(task)
        except asyncio.CancelledError:  # the client left (aiohttp cancels its handler)
            self.info.outcome = self.info.outcome or "client_disconnect"
            self._release(task, clean=False)
            raise
        return await self._close(reason, task)

    async def _relay(self, task: asyncio.Future[UpstreamResponse]) -> BaseException | None:
        """Wait for the headers, then for the end; the reason the stream ends."""
        client = self.client
        try:
            upstream = self.upstream = await await_headers(
                task, self.ended, self.settings, client, self.headers, self.info)
            if not 200 <= upstream.status < 300:
                raise await error_answer(upstream, self.settings.keepalive_seconds,
                                         self.secrets.text)
            if self.spend is not None:
                self.spend.answered = True
            if not client.opened:
                # An answer already whole (a short one, in one read) goes out in one write
                # with the head and the end of the response.
                await open_response(client, self.headers, self.info, whole=upstream.complete)
            if self.ended.done():  # stopped while the headers were being written
                return self.ended.result()
            self.state = State.STREAMING
            self.watchdog = Watchdog(self, self.settings, self.info.started)
            upstream.stream(self._on_data, self._on_end)
            return await self.ended
        except (GatewayError, ClientGone) as e:
            return e
        except Exception as e:
            if not client.opened:
                self._release(task, clean=False)
                raise  # nothing sent yet: the errors middleware answers a plain 500
            return e

    # What the watchdog reads and calls (``Watched``, gateway/stream/watchdog.py).

    @property
    def running(self) -> bool:
        return self.state is State.STREAMING or self.state is State.PAUSED

    @property
    def paused(self) -> bool:
        return self.state is State.PAUSED

    @property
    def started(self) -> bool:
        return self.info.first_byte is not None

    def ping(self) -> None:
        self.client.write(KEEPALIVE)

    # Called from the upstream socket's read callback: they must not raise.

    def _on_data(self, chunk: bytes) -> None:
        if not self.running:
            return  # after the end: drained unread, so the connection can be reused
        assert self.watchdog is not None
        self.watchdog.last = time.monotonic()
        try:
            self._send(*self.renderer.feed(chunk))
        except Exception as e:  # noqa: BLE001 (a bug or a write to a client gone: the end)
            self.finish(e)

    def _on_end(self, error: BaseException | None) -> None:
        if not self.upstream_end.done():
            self.upstream_end.set_result(error)
        if not self.running:
            return
        if error is not None:
            self.finish(UpstreamProtocolError(
                f"The upstream connection broke mid-stream ({type(error).__name__})"))
            return
        try:
            self._send(*self.renderer.close())
        except Exception as e:  # noqa: BLE001
            self.finish(e)

    def _send(self, out: bytes, done: bool, failure: GatewayError | None) -> None:
        if out and self.info.first_byte is None:
            self.info.first_byte = time.monotonic()
        if self.spend is not None and self.spend.cut and failure is None and not done:
            failure = self.spend.over(self.renderer.usage, self.renderer.events)
        if failure is not None or done:
            self.last = out  # written with the end of the response, in one write (``_close``)
            self.finish(failure)
            return
        if out:
            self.client.write(out)
        if self.state is State.STREAMING and self.client.paused:
            self._pause()

    def _pause(self) -> None:
        assert self.upstream is not None and self.watchdog is not None
        self.state = State.PAUSED
        self.upstream.pause_reading()
        self.watchdog.pause()
        self.drainer = asyncio.get_running_loop().create_task(self._resume_when_drained())

    async def _resume_when_drained(self) -> None:
        try:
            await self.client.drain()
        except ClientGone as e:
            self.finish(e)
            return
        if self.state is State.PAUSED:
            assert self.upstream is not None and self.watchdog is not None
            self.state = State.STREAMING
            self.watchdog.resume()
            self.upstream.resume_reading()

    def finish(self, reason: BaseException | None) -> None:
        """Every way out comes here first: the end is decided, the task closes."""
        if self.ended.done():
            return
        if self.state is State.PAUSED and self.upstream is not None:
            self.upstream.resume_reading()  # what follows is drained, unread
        if self.state is not State.WAITING:
            self.state = State.FINISHING
        if self.watchdog is not None:
            self.watchdog.cancel()  # no keep-alive may follow the last event
        if isinstance(reason, (GatewayError, ClientGone)):
            # A value from here on, its trace of no use: the trace's frames hold the relay,
            # which holds the reason, a cycle only the garbage collector would free. (A bug
            # keeps its trace for the log.)
            reason = reason.with_traceback(None)
        self.ended.set_result(reason)

    async def _close(self, reason: BaseException | None, task: asyncio.Future[UpstreamResponse]
                     ) -> web.StreamResponse:
        """The last bytes for ``reason`` (``end_response``), then ``_release``."""
        self.state = State.FINISHING  # the watchdog's timer stops at its next tick
        try:
            if reason is None and self.spend is not None:
                self.last = await _settled(self.spend, self.renderer, self.info, self.last)
            # Given time to take the last bytes: a keep-alive interval.
            await end_response(self.client, self.renderer, self.info, self.last, reason,
                               self.settings.keepalive_seconds)
        finally:
            self._release(task, clean=reason is None)
        # A client that left before the headers: nothing can reach it (499, as nginx logs it).
        return self.client.response or web.Response(status=499)

    def _release(self, task: asyncio.Future[UpstreamResponse], clean: bool) -> None:
        """What every way out ends with, the client's leaving included: timers stopped, the
        stream's counts in the request's record, the upstream connection given back (after
        the terminal event, ``clean``, once the answer ends: the request is not held for it)."""
        if self.state is State.DONE:
            return
        self.state = State.DONE
        if self.watchdog is not None:
            self.watchdog.cancel()
            # It refers back to the relay: left in place, that cycle would hold the whole
            # stream (request, response, renderer, upstream answer) until the garbage
            # collector found it, and those collections are a share of a short stream's CPU
            # worth saving (measured: docs/performance.md).
            self.watchdog = None
        if self.drainer is not None:
            self.drainer.cancel()
        self.info.add_stream(self.renderer.events, self.renderer.bytes_out, self.renderer.usage)
        give_back(task, self.upstream, self.upstream_end if clean else None,
                  self.settings.keepalive_seconds)


async def _settled(spend: Spend, renderer: StreamRenderer, info: RequestInfo, last: bytes
                   ) -> bytes:
    """The key's charge settled from the stream's usage, and ``last`` with what that leaves
    told in a ``: usage`` comment: before ``[DONE]`` (chat), after ``response.completed``."""
    # Shielded: a client that leaves now cancels the task, and the charge must settle.
    after = await asyncio.shield(spend.settle(info, renderer.usage, renderer.events))
    at = len(last) - (0 if renderer.dialect.responses_api else renderer.tail)
    return last[:at] + spend.comment(info, after) + last[at:]
