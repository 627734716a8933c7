"""One upstream event stream relayed to one client, with explicit states and one way out.

The life of a stream::

    WAITING ──headers──> STREAMING <──drained── PAUSED
       │                    │  └──client buffer full──┘ │
       └──────── every way out: finish(reason) ─────────┴──> FINISHING ──_close──> DONE

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
  a timeout or a stalled client from the watchdog (``watchdog.py``), a write that found the
  client gone, shutdown by ``stop()``) calls ``finish`` with its reason; the handler's task,
  which only waits, then runs ``_close``, which writes the last bytes: the read that ended the
  stream, held back by ``_send``, and the error frame if any, with the end of the response.
- DONE: ``_release`` has stopped the timers, counted the stream into the request's record and
  given the upstream connection back. Every stream ends there, also one whose client left:
  aiohttp then cancels the handler's task, and the cancellation goes straight to ``_release``
  (there is no one left to write to).

Shutdown is a message (``stop``, from ``InFlight``), not a cancellation. A cancellation of the
task means the client left (aiohttp cancels the handler when its connection drops).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..errors import (
    GatewayError,
    ShuttingDown,
    UpstreamFailure,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from ..request_info import RequestInfo
from ..settings import StreamSettings
from ..upstream.errors import from_upstream
from ..upstream.http1 import InvalidHTTP, UpstreamResponse
from .client_stream import ClientGone, ClientStream
from .render import StreamRenderer
from .sse import KEEPALIVE
from .watchdog import Watchdog

log = logging.getLogger("gateway.relay")

_MAX_ERROR_BODY = 64 * 1024


class State(enum.Enum):
    WAITING = "waiting for headers"
    STREAMING = "streaming"
    PAUSED = "paused"
    FINISHING = "finishing"
    DONE = "done"


class StreamRelay:
    """One stream, built by ``Proxy.stream`` with everything it needs handed to it."""

    __slots__ = ("client", "renderer", "settings", "info", "headers", "secrets", "state",
                 "upstream", "ended", "upstream_end", "watchdog", "drainer", "last")

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
        self.ended: asyncio.Future[BaseException | None] = asyncio.Future()
        self.upstream_end: asyncio.Future[BaseException | None] = asyncio.Future()
        self.watchdog: Watchdog | None = None
        self.drainer: asyncio.Task[None] | None = None
        self.last = b""  # the stream's last events, held to go out with its end

    def stop(self) -> None:
        """Shutdown, past the drain time: the stream ends with ``gateway_restarting``."""
        self.finish(ShuttingDown("The gateway is restarting; retry the request"))

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
            upstream = self.upstream = await await_headers(task, self.ended, self.settings,
                                                           self._ping_waiting)
            if not 200 <= upstream.status < 300:
                raise await error_answer(upstream, self.settings.keepalive_seconds,
                                         self.secrets)
            if not self.client.opened:
                # An answer already whole (a short one, in one read) goes out in one write
                # with the head and the end of the response.
                await self._open(whole=upstream.complete)
            if self.ended.done():  # stopped while the headers were being written
                return self.ended.result()
            self.state = State.STREAMING
            self.watchdog = Watchdog(self, self.settings)
            upstream.stream(self._on_data, self._on_end)
            return await self.ended
        except (GatewayError, ClientGone) as e:
            return e
        except Exception as e:
            if not self.client.opened:
                self._release(task, clean=False)
                raise  # nothing sent yet: the errors middleware answers a plain 500
            return e

    async def _ping_waiting(self) -> None:
        """The upstream is slow to answer: commit ``200`` and keep the client's line awake."""
        if not self.client.opened:
            await self._open()
        self.client.write(KEEPALIVE)

    async def _open(self, whole: bool = False) -> None:
        await self.client.open(self.headers, whole=whole)
        self.info.status = 200

    # What the watchdog reads and calls (``watchdog.Watched``).

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

    def _send(self, out: bytes, done: bool, failure: UpstreamFailure | None) -> None:
        if out and self.info.first_byte is None:
            self.info.first_byte = time.monotonic()
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
        """The last bytes for ``reason`` (``_end``), then ``_release``."""
        self.state = State.FINISHING  # the watchdog's timer stops at its next tick
        try:
            await self._end(reason)
        finally:
            self._release(task, clean=reason is None)
        # A client that left before the headers: nothing can reach it (499, as nginx logs it).
        return self.client.response or web.Response(status=499)

    async def _end(self, reason: BaseException | None) -> None:
        """The stream's last events (``last``), the gateway's error frame after them for a
        failure, and the end of the response, in one write; or the connection dropped for a
        client that is gone."""
        info = self.info
        if isinstance(reason, ClientGone):
            info.outcome = info.outcome or "client_disconnect"
            self.client.abort()  # gone, or reading nothing: the connection ends here
            return
        last = self.last
        if reason is None:  # the terminal event is in ``last``
            info.outcome = "completed"  # whatever happens while draining the rest
        else:
            err = reason if isinstance(reason, GatewayError) else _bug(reason, info)
            if isinstance(err, UpstreamFailure):
                log.warning("request %s: upstream %s: %s", info.request_id, err.kind,
                            err.message)
            if not self.client.opened:
                raise err  # nothing sent yet: the errors middleware gives the true status
            info.note_error(err)
            last += self.renderer.error_frame(err)
        try:
            # Given time to take the last bytes: a keep-alive interval.
            await self.client.close(self.settings.keepalive_seconds, last)
        except ClientGone:
            info.outcome = "client_disconnect"

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
            # collector found it, some 20 objects a stream and about 5 % of a short one's CPU.
            self.watchdog = None
        if self.drainer is not None:
            self.drainer.cancel()
        self.info.add_stream(self.renderer.events, self.renderer.bytes_out, self.renderer.usage)
        _give_back(task, self.upstream, self.upstream_end if clean else None,
                   self.settings.keepalive_seconds)


async def await_headers(task: asyncio.Future[UpstreamResponse],
                        ended: asyncio.Future[BaseException | None], settings: StreamSettings,
                        ping: Callable[[], Awaitable[None]]) -> UpstreamResponse:
    """The upstream's answer once its headers are in, calling ``ping`` past each keep-alive
    interval; ``ended`` (a shutdown) ends the wait. (One future woken by either and a timer:
    ``asyncio.wait`` costs several times as much, on every request.)"""
    limit = settings.first_byte_timeout_seconds
    deadline = time.monotonic() + limit
    while True:
        if not task.done() and not ended.done():
            await _first_of(task, ended, min(settings.keepalive_seconds,
                                             max(deadline - time.monotonic(), 0)))
        if ended.done():
            raise ended.result() or ShuttingDown("The gateway is restarting")
        if task.done():
            return task.result()
        if time.monotonic() >= deadline:
            raise UpstreamTimeout(f"The upstream did not answer within {limit:g} seconds")
        await ping()


async def _first_of(a: asyncio.Future[Any], b: asyncio.Future[Any], seconds: float) -> None:
    """Until ``a`` or ``b`` is done, or ``seconds`` have passed."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    timer = loop.call_later(seconds, wake)
    a.add_done_callback(wake)
    b.add_done_callback(wake)
    try:
        await waiter
    finally:
        timer.cancel()
        a.remove_done_callback(wake)
        b.remove_done_callback(wake)


async def error_answer(upstream: UpstreamResponse, wait: float, secrets: tuple[str, ...]
                       ) -> UpstreamFailure:
    """An error status: its body follows its headers at once, or is not waited for."""
    try:
        async with asyncio.timeout(wait):
            body = await upstream.read(_MAX_ERROR_BODY)
    except (OSError, InvalidHTTP):  # TimeoutError is an OSError
        body = b""
    return from_upstream(upstream.status, body, upstream.headers, secrets)


def _give_back(task: asyncio.Future[UpstreamResponse], upstream: UpstreamResponse | None,
               upstream_end: asyncio.Future[BaseException | None] | None, wait: float) -> None:
    """The upstream connection, back to the pool once its answer ends (``upstream_end`` given:
    the stream ended cleanly) or closed; an answer still on its way is closed on arrival."""
    if not task.done():
        task.add_done_callback(_close_late_answer)
        task.cancel()
    elif upstream is None:
        _close_late_answer(task)  # it answered just as the relay gave up waiting
    if upstream is not None:
        if upstream_end is not None:
            _release_when_ended(upstream, upstream_end, wait)
        else:
            upstream.close()


def _release_when_ended(upstream: UpstreamResponse,
                        upstream_end: asyncio.Future[BaseException | None], wait: float) -> None:
    """Back to the pool if the answer ends cleanly within ``wait`` seconds, else closed."""
    def settle(end: asyncio.Future[BaseException | None]) -> None:
        if timer is not None:
            timer.cancel()
        if end.cancelled() or end.result() is not None:
            upstream.close()
        else:
            upstream.release()

    timer = None
    if upstream_end.done():  # the usual case: the answer's end came with its last event
        settle(upstream_end)
        return
    timer = asyncio.get_running_loop().call_later(wait, upstream.close)
    upstream_end.add_done_callback(settle)


def _bug(error: BaseException, info: RequestInfo) -> GatewayError:
    """An exception that is none of the ways a stream ends: a bug, logged with its trace for
    the operator; the client gets the generic error frame."""
    log.error("request %s: the relay failed", info.request_id, exc_info=error)
    return GatewayError("The gateway failed to handle this request")


def _close_late_answer(task: asyncio.Future[UpstreamResponse]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()
