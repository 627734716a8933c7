"""One upstream event stream relayed to one client, with explicit states and one way out.

The life of a stream::

    WAITING ──headers──> STREAMING <──drained── PAUSED
       │                    │  └──client buffer full──┘ │
       └──────── every way out: _finish(reason) ────────┴──> FINISHING ──_close──> DONE

- WAITING: the upstream call is in flight. Response headers wait for the upstream's, so an
  upstream error keeps its true status; only if it is silent for one keep-alive interval does
  the gateway commit ``200`` and write ``: keep-alive`` comments (from then on an error can only
  be an SSE frame).
- STREAMING: each upstream read is handed, inside the upstream socket's read callback
  (``http1.UpstreamResponse.stream``), to the renderer (``render.py``) and its bytes written to
  the client (``client_stream.py``) before the callback returns: no task switch per chunk.
- PAUSED: the client's send buffer is full; the upstream socket is not read until it drains,
  so a slow client slows the upstream and memory stays bounded.
- FINISHING: the end is decided. Every way out (the terminal event, an upstream error or end,
  a timeout from the watchdog, the client gone, shutdown by ``stop()``) calls ``_finish``
  with its reason; the handler's task, which only waits, then runs ``_close``, the one place
  that writes the last bytes and gives everything back.

Shutdown is a message (``stop``, from ``InFlight``), not a cancellation. A cancellation of the
task means the client left (aiohttp cancels the handler when its connection drops).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable

from aiohttp import web

from .client_stream import ClientGone, ClientStream
from .errors import (
    GatewayError,
    ShuttingDown,
    UpstreamFailure,
    UpstreamProtocolError,
    UpstreamTimeout,
    from_upstream,
)
from .http1 import InvalidHTTP, UpstreamResponse
from .render import StreamRenderer
from .request_info import RequestInfo
from .settings import StreamSettings
from .sse import KEEPALIVE

log = logging.getLogger("gateway.relay")

_MAX_ERROR_BODY = 64 * 1024


class State(enum.Enum):
    WAITING = "waiting for headers"
    STREAMING = "streaming"
    PAUSED = "paused"
    FINISHING = "finishing"
    DONE = "done"


_RUNNING = (State.STREAMING, State.PAUSED)


class StreamRelay:
    """One stream, built by ``Proxy.stream`` with everything it needs handed to it."""

    __slots__ = ("client", "renderer", "settings", "info", "headers", "secrets", "state",
                 "upstream", "ended", "upstream_end", "watchdog", "drainer")

    def __init__(self, client: ClientStream, renderer: StreamRenderer, settings: StreamSettings,
                 info: RequestInfo, headers: dict[str, str], secrets: tuple[str, ...]) -> None:
        self.client = client
        self.renderer = renderer
        self.settings = settings
        self.info = info
        self.headers = headers  # the client's response headers
        self.secrets = secrets
        self.state = State.WAITING
        self.upstream: UpstreamResponse | None = None
        loop = asyncio.get_running_loop()
        self.ended: asyncio.Future[BaseException | None] = loop.create_future()
        self.upstream_end: asyncio.Future[BaseException | None] = loop.create_future()
        self.watchdog: Watchdog | None = None
        self.drainer: asyncio.Task[None] | None = None

    def stop(self) -> None:
        """Shutdown, past the drain time: the stream ends with ``gateway_restarting``."""
        self._finish(ShuttingDown("The gateway is restarting; retry the request"))

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
        try:
            upstream = self.upstream = await self._await_headers(task)
            if not 200 <= upstream.status < 300:
                raise await error_answer(upstream, self.settings.keepalive_seconds,
                                         self.secrets)
            if not self.client.opened:
                await self._open()
            self.state = State.STREAMING
            self.watchdog = Watchdog(self)
            upstream.stream(self._on_data, self._on_end)
            return await self.ended
        except (GatewayError, ClientGone) as e:
            return e
        except Exception as e:
            if not self.client.opened:
                self._release(task, clean=False)
                raise  # nothing sent yet: the errors middleware answers a plain 500
            return e

    async def _await_headers(self, task: asyncio.Future[UpstreamResponse]
                             ) -> UpstreamResponse:
        """The upstream's answer once its headers are in; past each keep-alive interval,
        commit ``200`` and ping."""
        keepalive = self.settings.keepalive_seconds
        limit = self.settings.first_byte_timeout_seconds
        deadline = time.monotonic() + limit
        while True:
            wait = min(keepalive, deadline - time.monotonic())
            await asyncio.wait((task, self.ended), timeout=max(wait, 0),
                               return_when=asyncio.FIRST_COMPLETED)
            if self.ended.done():  # stopped while waiting
                raise self.ended.result() or ShuttingDown("The gateway is restarting")
            if task.done():
                return task.result()
            if time.monotonic() >= deadline:
                raise UpstreamTimeout(f"The upstream did not answer within {limit:g} seconds")
            if not self.client.opened:
                await self._open()
            self.client.write(KEEPALIVE)

    async def _open(self) -> None:
        await self.client.open(self.headers)
        self.info.status = 200

    # Called from the upstream socket's read callback: they must not raise.

    def _on_data(self, chunk: bytes) -> None:
        if self.state not in _RUNNING:
            return  # after the end: drained unread, so the connection can be reused
        assert self.watchdog is not None
        self.watchdog.last = time.monotonic()
        try:
            self._send(*self.renderer.feed(chunk))
        except Exception as e:  # noqa: BLE001 (a bug or a write to a client gone: the end)
            self._finish(e)

    def _on_end(self, error: BaseException | None) -> None:
        if not self.upstream_end.done():
            self.upstream_end.set_result(error)
        if self.state not in _RUNNING:
            return
        if error is not None:
            self._finish(UpstreamProtocolError(
                f"The upstream connection broke mid-stream ({type(error).__name__})"))
            return
        try:
            self._send(*self.renderer.close())
        except Exception as e:  # noqa: BLE001
            self._finish(e)

    def _send(self, out: bytes, done: bool, failure: UpstreamFailure | None) -> None:
        if out:
            if self.info.first_byte is None:
                self.info.first_byte = time.monotonic()
            self.client.write(out)
        if failure is not None or done:
            self._finish(failure)
        elif self.state is State.STREAMING and self.client.paused:
            self._pause()

    def _pause(self) -> None:
        assert self.upstream is not None
        self.state = State.PAUSED
        self.upstream.pause_reading()
        self.drainer = asyncio.get_running_loop().create_task(self._resume_when_drained())

    async def _resume_when_drained(self) -> None:
        try:
            await self.client.drain()
        except ClientGone as e:
            self._finish(e)
            return
        if self.state is State.PAUSED:
            assert self.upstream is not None
            self.state = State.STREAMING
            self.upstream.resume_reading()

    def _finish(self, reason: BaseException | None) -> None:
        """Every way out comes here first: the end is decided, the task closes."""
        if self.ended.done():
            return
        if self.state is State.PAUSED and self.upstream is not None:
            self.upstream.resume_reading()  # what follows is drained, unread
        if self.state is not State.WAITING:
            self.state = State.FINISHING
        if self.watchdog is not None:
            self.watchdog.cancel()  # no keep-alive may follow the last event
        self.ended.set_result(reason)

    async def _close(self, reason: BaseException | None, task: asyncio.Future[UpstreamResponse]
                     ) -> web.StreamResponse:
        """The one way out: the last bytes, then ``_release``."""
        self.state = State.FINISHING
        if self.watchdog is not None:
            self.watchdog.cancel()
        info = self.info
        clean = False
        try:
            if reason is None:  # the terminal event went out
                info.outcome = "completed"  # whatever happens while draining the rest
                await self.client.close()
                clean = await ended_cleanly(self.upstream_end, self.settings.keepalive_seconds)
            elif isinstance(reason, ClientGone):
                info.outcome = info.outcome or "client_disconnect"
            else:
                err = reason if isinstance(reason, GatewayError) else _bug(reason, info)
                if isinstance(err, UpstreamFailure):
                    log.warning("request %s: upstream %s: %s", info.request_id, err.kind,
                                err.message)
                if not self.client.opened:
                    raise err  # nothing sent yet: the errors middleware gives the true status
                info.note_error(err)
                try:
                    self.client.write(self.renderer.error_frame(err))
                except ClientGone:
                    info.outcome = "client_disconnect"
                await self.client.close()
        finally:
            self._release(task, clean)
        assert self.client.response is not None
        return self.client.response

    def _release(self, task: asyncio.Future[UpstreamResponse], clean: bool) -> None:
        """What every way out ends with: timers stopped, the upstream connection released
        (closed, so the upstream sees the end, unless clean; an answer still on its way is
        closed when it arrives), and the stream's counts in the request's record."""
        if self.state is State.DONE:
            return
        self.state = State.DONE
        if self.watchdog is not None:
            self.watchdog.cancel()
        if self.drainer is not None:
            self.drainer.cancel()
        info = self.info
        info.chunks += self.renderer.events
        info.bytes_out += self.renderer.bytes_out
        info.usage = self.renderer.usage or info.usage
        if not task.done():
            task.add_done_callback(_close_late_answer)
            task.cancel()
        elif self.upstream is None:
            _close_late_answer(task)  # it answered just as the relay gave up waiting
        if self.upstream is not None:
            if clean:
                self.upstream.release()
            else:
                self.upstream.close()


async def error_answer(upstream: UpstreamResponse, wait: float, secrets: tuple[str, ...]
                       ) -> UpstreamFailure:
    """An error status: its body follows its headers at once, or is not waited for."""
    try:
        async with asyncio.timeout(wait):
            body = await upstream.read(_MAX_ERROR_BODY)
    except (OSError, InvalidHTTP):  # TimeoutError is an OSError
        body = b""
    return from_upstream(upstream.status, body, upstream.headers, secrets)


async def ended_cleanly(upstream_end: asyncio.Future[BaseException | None], wait: float) -> bool:
    """After the terminal event: whether the upstream's answer ended cleanly (within ``wait``
    seconds), so that its connection can be reused."""
    if not upstream_end.done():
        try:
            async with asyncio.timeout(wait):
                await upstream_end
        except TimeoutError:
            return False
    return upstream_end.result() is None


def _bug(error: BaseException, info: RequestInfo) -> GatewayError:
    """An exception that is none of the ways a stream ends: a bug, logged with its trace for
    the operator; the client gets the generic error frame."""
    log.error("request %s: the relay failed", info.request_id, exc_info=error)
    return GatewayError("The gateway failed to handle this request")


def _close_late_answer(task: asyncio.Future[UpstreamResponse]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()


class Watchdog:
    """One timer per stream for upstream silence, instead of a timeout around every read.

    The read callback only stamps ``last``. When the upstream has been silent for a keep-alive
    interval, the timer writes a ``: keep-alive`` comment (each write is whole events, so a
    comment can only land between events); when the silence reaches the first-byte or idle
    limit, it ends the stream with ``UpstreamTimeout``. A stream paused for a slow client is
    not silent.
    """

    __slots__ = ("relay", "loop", "last", "handle", "interval")

    def __init__(self, relay: StreamRelay) -> None:
        self.relay = relay
        self.loop = asyncio.get_running_loop()
        self.interval = relay.settings.keepalive_seconds
        self.last = time.monotonic()
        self.handle: asyncio.TimerHandle | None = self.loop.call_later(self.interval, self._tick)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _tick(self) -> None:
        self.handle = None
        relay = self.relay
        if relay.state not in _RUNNING:
            return
        silent = time.monotonic() - self.last
        if relay.state is State.PAUSED or silent < self.interval:
            self.handle = self.loop.call_later(max(self.interval - silent, 0.001), self._tick)
            return
        settings = relay.settings
        limit = (settings.idle_timeout_seconds if relay.info.first_byte is not None
                 else settings.first_byte_timeout_seconds)
        if silent >= limit:
            relay._finish(UpstreamTimeout(f"The upstream sent nothing for {silent:.3g} seconds"))
            return
        try:
            relay.client.write(KEEPALIVE)
        except ClientGone as e:
            relay._finish(e)
            return
        self.handle = self.loop.call_later(min(self.interval, limit - silent), self._tick)
