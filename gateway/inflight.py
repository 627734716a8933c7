"""Requests being relayed, tracked so that a graceful shutdown can let them finish or end them
cleanly.

Streams and plain requests alike register while they wait on the upstream. On shutdown
``drain`` waits for them up to the drain time, then tells each one to ``stop``: a stream then
ends with a ``gateway_restarting`` error frame, a plain request with a 503 of that code (see
``gateway.stream.relay`` and ``gateway.stream.answers``). A request that registers after that is
stopped at once. Stopping is a message to the request, never a cancellation of its task: a cancelled
handler means its client left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Protocol

log = logging.getLogger("gateway.inflight")


class Stoppable(Protocol):
    def stop(self) -> None:
        """End now, telling the client the gateway is restarting."""


class InFlight:
    """Every relayed request, so shutdown can wait for them and then stop the rest."""

    def __init__(self) -> None:
        self._open: set[Stoppable] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._hurry = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._open)

    @contextlib.contextmanager
    def track(self, request: Stoppable) -> Iterator[None]:
        self._open.add(request)
        self._idle.clear()
        if self._closed:
            request.stop()  # the drain time is over; this request was still on its way in
        try:
            yield
        finally:
            self._open.discard(request)
            if not self._open:
                self._idle.set()

    def stop_waiting(self) -> None:
        """End a drain in progress now (a second SIGTERM or Ctrl-C)."""
        self._hurry.set()

    async def drain(self, seconds: float) -> None:
        """Wait up to ``seconds`` for open requests to end, then stop the rest."""
        if self._open:
            log.info("draining %d open requests for up to %gs", len(self._open), seconds)
            idle = asyncio.ensure_future(self._idle.wait())
            hurry = asyncio.ensure_future(self._hurry.wait())
            try:
                await asyncio.wait((idle, hurry), timeout=seconds,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                idle.cancel()
                hurry.cancel()
        self._closed = True
        remaining = list(self._open)
        for request in remaining:
            request.stop()
        if remaining:
            log.warning("ended %d requests still open after the drain time", len(remaining))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._idle.wait()
