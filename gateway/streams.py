"""Open streams, tracked so that a graceful shutdown can let them finish or end them cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Protocol

log = logging.getLogger("gateway.streams")


class Stoppable(Protocol):
    shutdown: bool


class StreamRegistry:
    """Every open stream's task, so shutdown can wait for them and then stop the rest."""

    def __init__(self) -> None:
        self._open: dict[asyncio.Task[object], Stoppable] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self._open)

    @contextlib.contextmanager
    def track(self, stream: Stoppable) -> Iterator[None]:
        task = asyncio.current_task()
        assert task is not None
        self._open[task] = stream
        self._idle.clear()
        try:
            yield
        finally:
            self._open.pop(task, None)
            if not self._open:
                self._idle.set()

    async def drain(self, seconds: float) -> None:
        """Wait up to ``seconds`` for open streams to end, then stop the rest with a frame."""
        if self._open:
            log.info("draining %d open streams for up to %gs", len(self._open), seconds)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._idle.wait()
        remaining = list(self._open.items())
        for task, stream in remaining:
            stream.shutdown = True
            task.cancel()
        if remaining:
            log.warning("ended %d streams still open after the drain time", len(remaining))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._idle.wait()
