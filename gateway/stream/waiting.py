"""The relay's WAITING state (``gateway/stream/relay.py``): the upstream call is in flight, and
nothing is decided for the client yet.

Response headers wait for the upstream's, so an upstream error keeps its true status: its body
follows its headers at once or is not waited for (``error_answer``), and it is made safe to show
by ``from_upstream`` (``gateway/upstream/errors.py``). Only if the upstream is silent for one
keep-alive interval does the gateway commit ``200`` (``open_response``) and write
``: keep-alive`` comments; from then on an error can only be an SSE frame. A shutdown or a
revocation (the relay's ``ended``) ends the wait, as does the first-byte timeout or the stream's
maximum duration, whichever comes first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from ..errors import GatewayError, ShuttingDown, StreamTooLong, UpstreamFailure, UpstreamTimeout
from ..request_info import RequestInfo
from ..settings import StreamSettings
from ..upstream.errors import from_upstream
from ..upstream.http1 import InvalidHTTP, UpstreamResponse
from .client_stream import ClientStream
from .sse import KEEPALIVE

_MAX_ERROR_BODY = 64 * 1024


async def await_headers(task: asyncio.Future[UpstreamResponse],
                        ended: asyncio.Future[BaseException | None], settings: StreamSettings,
                        client: ClientStream, headers: Mapping[str, str], info: RequestInfo
                        ) -> UpstreamResponse:
    """The upstream's answer once its headers are in, the client's line kept awake past each
    keep-alive interval (the response opened with ``headers`` first); ``ended`` (a shutdown)
    ends the wait. (One future woken by either and a timer: ``asyncio.wait`` costs several
    times as much, on every request.)"""
    limit = settings.first_byte_timeout_seconds
    deadline = min(time.monotonic() + limit, info.started + settings.max_duration_seconds)
    while True:
        if not task.done() and not ended.done():
            await _first_of(task, ended, min(settings.keepalive_seconds,
                                             max(deadline - time.monotonic(), 0)))
        if ended.done():
            raise ended.result() or ShuttingDown("The gateway is restarting")
        if task.done():
            return task.result()
        if time.monotonic() >= deadline:
            raise _timeout(settings, info)
        if not client.opened:  # the upstream is slow to answer: commit 200
            await open_response(client, headers, info)
        client.write(KEEPALIVE)


def _timeout(settings: StreamSettings, info: RequestInfo) -> GatewayError:
    """The first-byte timeout, or the maximum duration where that came first."""
    limit = settings.first_byte_timeout_seconds
    if time.monotonic() - info.started < settings.max_duration_seconds:
        return UpstreamTimeout(f"The upstream did not answer within {limit:g} seconds")
    return StreamTooLong(f"The stream reached its maximum duration of "
                         f"{settings.max_duration_seconds:g} seconds before the upstream "
                         f"answered")


async def open_response(client: ClientStream, headers: Mapping[str, str], info: RequestInfo,
                        whole: bool = False) -> None:
    """Send ``200`` and the client's response headers: from here on the status cannot change.
    ``whole``: the answer is already here, and goes out in one write with the head."""
    await client.open(headers, whole=whole)
    info.status = 200


async def error_answer(upstream: UpstreamResponse, wait: float, secrets: tuple[str, ...]
                       ) -> UpstreamFailure:
    """An error status: its body follows its headers at once, or is not waited for."""
    try:
        async with asyncio.timeout(wait):
            body = await upstream.read(_MAX_ERROR_BODY)
    except (OSError, InvalidHTTP):  # TimeoutError is an OSError
        body = b""
    return from_upstream(upstream.status, body, upstream.headers, secrets)


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
