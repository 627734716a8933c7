"""Background tasks (probes, renewers, senders, followers), stopped one way."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel each task and wait until it has unwound, so that nothing it holds (a connection,
    a timer) outlives what closes it. None stands for a task never started."""
    for task in tasks:
        if task is None:
            continue
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
