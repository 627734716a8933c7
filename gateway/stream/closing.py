"""How a stream ends, once its end is decided (``StreamRelay.finish``,
``gateway/stream/relay.py``): the last write to the client (``end_response``, run by the relay's
``_close``) and the upstream connection given back (``give_back``, run by its ``_release``).

A failure after the response has started can only be an SSE frame: the gateway's error frame,
in the stream's dialect, after the events that came before it. A failure before it started
goes to the errors middleware, which answers with its true status. The upstream connection
goes back to the pool only when its answer ends cleanly; every other way, it is closed, so that
the upstream sees the request end.
"""

from __future__ import annotations

import asyncio
import logging

from ..errors import GatewayError, UpstreamFailure
from ..request_info import RequestInfo
from ..upstream.http1 import UpstreamResponse
from .client_stream import ClientGone, ClientStream
from .render import StreamRenderer

log = logging.getLogger("gateway.relay")


async def end_response(client: ClientStream, renderer: StreamRenderer, info: RequestInfo,
                       last: bytes, reason: BaseException | None, wait: float) -> None:
    """The stream's last events (``last``), the gateway's error frame after them for a
    failure, and the end of the response, in one write; or the connection dropped for a
    client that is gone. ``wait``: the time the client is given to take the last bytes."""
    if isinstance(reason, ClientGone):
        info.outcome = info.outcome or "client_disconnect"
        client.abort()  # gone, or reading nothing: the connection ends here
        return
    if reason is None:  # the terminal event is in ``last``
        info.outcome = "completed"  # whatever happens while draining the rest
    else:
        err = reason if isinstance(reason, GatewayError) else _bug(reason, info)
        if isinstance(err, UpstreamFailure):
            log.warning("request %s: upstream %s: %s", info.request_id, err.kind, err.message)
        if not client.opened:
            raise err  # nothing sent yet: the errors middleware gives the true status
        info.note_error(err)
        last += renderer.error_frame(err)
    try:
        await client.close(wait, last)
    except ClientGone:
        info.outcome = "client_disconnect"


def _bug(error: BaseException, info: RequestInfo) -> GatewayError:
    """An exception that is none of the ways a stream ends: a bug, logged with its trace for
    the operator; the client gets the generic error frame."""
    log.error("request %s: the relay failed", info.request_id, exc_info=error)
    return GatewayError("The gateway failed to handle this request")


def give_back(task: asyncio.Future[UpstreamResponse], upstream: UpstreamResponse | None,
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


def _close_late_answer(task: asyncio.Future[UpstreamResponse]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()
