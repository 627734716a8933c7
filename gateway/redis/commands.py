"""A command and its caller, as the batcher queues it and the pipe writes it: the one
definition of what travels between them (``Item``), how each caller gets its answer (``resolve``,
``fail``), and the bytes a batch goes out as (``pack``).

Why apart from both: the batcher queues items and answers those it cannot send or must follow
elsewhere (a redirect, a slot no node serves); the pipe writes them and answers them from its
connection's read callback. Each caller is answered exactly once, by whichever of the two holds
its item, and a caller gone (cancelled) is skipped, never an error.
"""

from __future__ import annotations

import asyncio
from typing import Any

Item = tuple[tuple[Any, ...], asyncio.Future[Any]]
"""A command and its caller's future."""

Redirected = list[tuple[Item, BaseException]]
"""Commands a cluster node redirected (MOVED, ASK) or told to try again, with that reply."""


def pack(batch: list[Item]) -> bytes:
    """The batch's commands in Redis' protocol (RESP), as redis-py's ``pack_commands`` writes
    them for the arguments the gateway sends (str, int, bytes), in a fraction of its time: its
    share of a stream's Redis cost was worth it (``docs/performance.md``)."""
    out: list[bytes] = []
    for command, _ in batch:
        out.append(b"*%d\r\n" % len(command))
        for arg in command:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


def fail(batch: list[Item], error: BaseException) -> None:
    """Each caller gets ``error`` (cancelled, for ``CancelledError``)."""
    for _, future in batch:
        if isinstance(error, asyncio.CancelledError):
            future.cancel()
        else:
            resolve(future, error)


def resolve(future: asyncio.Future[Any], reply: Any) -> None:
    """Hand ``reply`` (a value, or the error to raise) to the caller waiting on ``future``."""
    if future.done():
        return  # its caller is gone
    if isinstance(reply, BaseException):
        future.set_exception(reply)
    else:
        future.set_result(reply)
