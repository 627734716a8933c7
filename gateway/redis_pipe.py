"""Pipelining on one Redis connection (one per cluster primary): a batch of commands is
written as soon as it has queued while at most one batch is still in flight (``IN_FLIGHT``),
and each reply resolves its caller the moment it is read. On a cluster, the commands a node
redirects (MOVED, ASK, TRYAGAIN) go back to the batcher, which follows them.

Why two and not one: under a burst, the event loop is busy reading the rest of the requests
while the first batch's replies come back; with one batch in flight the second (most of the
burst) waited until the loop got round to reading those replies, and in a 200-stream burst a
check's p99 wait was 40 to 60 ms; with two it is about 10. Why not more: each further batch in
flight is one more write and read for fewer commands, more CPU on every request's path for no
shorter wait (a stream whose events come in one read cost 6 % more).

Through redis-py's connection API (``send_packed_command``, ``read_response``; the commands
packed here, for a third of ``pack_commands``' CPU): no pipeline object, pool checkout, retry
wrapper or timer per reply, which cost twice the CPU per command (on a cluster, where
redis-py's pipeline also resolves each command's slot and node, two and a half times). Each
command's reply must come within the connection's ``socket_timeout`` of its write; that
timeout is taken off the connection while it is held here (one deadline per batch stands in
for one timer per reply) and put back with it.

A failed write or read, or a late reply, fails every command in flight on the connection
(redis-py disconnects it), which is given back at once; the next batch takes a connection again
(in sentinel mode, to the primary the sentinels name). A connection the sentinel follower marked
after a failover takes no new batch: it is given back once its replies are in.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from typing import Any, Protocol

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import AskError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .tasks import cancel_and_wait

Item = tuple[tuple[Any, ...], asyncio.Future[Any]]
"""A command and its caller's future."""

Redirected = list[tuple[Item, BaseException]]
"""Commands a cluster node redirected (MOVED, ASK) or told to try again, with that reply."""


class Pool(Protocol):
    """Where a pipe takes its connection: redis-py's ``ConnectionPool``, or a cluster node."""

    async def get_connection(self) -> AbstractConnection: ...

    async def release(self, connection: AbstractConnection) -> None: ...


IN_FLIGHT = 2
"""Batches in flight at most: the next one waits for the oldest one's last reply."""


class RedisPipe:
    """``await pipe.send(batch)`` writes the batch; the futures resolve as replies arrive."""

    def __init__(self, pool: Pool, on_redirect: Callable[[Redirected], None] | None = None
                 ) -> None:
        self._pool = pool
        self._on_redirect = on_redirect
        """On a cluster: gets each batch's redirected commands (their callers still wait)."""
        self._link: _Link | None = None
        self._retired: set[_Link] = set()

    async def send(self, batch: list[Item]) -> None:
        """Write ``batch``; whatever happens, each of its callers gets a reply, an error or a
        cancellation (the batcher has already taken it off its queue)."""
        try:
            link = await self._link_for_next_batch()
        except BaseException as exc:  # cancelled (closing), or Redis is down
            fail(batch, exc)
            if not isinstance(exc, Exception):
                raise
            return
        await link.send(batch)

    async def _link_for_next_batch(self) -> _Link:
        link = self._link
        if link is not None and link.batches >= IN_FLIGHT:
            await link.slot_free()
        if link is not None and (link.dead or link.connection.should_reconnect()):
            self._link = None
            self._retired.add(link)
            await link.retire(self._retired.discard)
            link = None
        if link is None:
            connection = await self._pool.get_connection()
            link = self._link = _Link(self._pool, connection, self._on_redirect)
        return link

    async def close(self) -> None:
        links = [*self._retired, *([self._link] if self._link is not None else [])]
        self._link = None
        for link in links:
            await link.close()


class _Link:
    """One held connection and the commands in flight on it, oldest first."""

    def __init__(self, pool: Pool, connection: AbstractConnection,
                 on_redirect: Callable[[Redirected], None] | None) -> None:
        self.pool = pool
        self.connection = connection
        self.on_redirect = on_redirect
        self.timeout: float | None = connection.socket_timeout
        connection.socket_timeout = None
        # Each command and its future, its reply's deadline, whether it ends its batch.
        self.inflight: collections.deque[tuple[Item, float | None, bool]] = collections.deque()
        self.batches = 0  # batches in flight
        self._slot: asyncio.Future[None] | None = None  # the sender waits for a batch's end
        self.reader: asyncio.Task[None] | None = None
        self.dead = False
        self.error: BaseException | None = None  # what killed it
        self.writing = False  # a batch is being written: the connection is not ours to give
        self.on_given_back: Callable[[_Link], None] | None = None
        self._given_back = False

    async def send(self, batch: list[Item]) -> None:
        connection = self.connection
        loop = asyncio.get_running_loop()
        self.writing = True
        try:
            async with asyncio.timeout(self.timeout):
                await connection.send_packed_command(pack(batch), check_health=False)
        except BaseException as exc:  # cancelled (closing), or the connection broke or hung
            self.writing = False
            error = _timed_out(self.timeout) if isinstance(exc, TimeoutError) else exc
            fail(batch, error)
            await self._fail(error)
            if not isinstance(exc, Exception):
                raise
            return
        self.writing = False
        if self.dead:  # the reader failed while this batch was being written
            fail(batch, self.error or RedisConnectionError("the connection to Redis failed"))
            await self._give_back()
            return
        deadline = None if self.timeout is None else loop.time() + self.timeout
        last = len(batch) - 1
        self.inflight.extend((item, deadline, i == last) for i, item in enumerate(batch))
        self.batches += 1
        if self.reader is None:
            self.reader = loop.create_task(self._read())

    async def _read(self) -> None:
        inflight = self.inflight
        read = self.connection.read_response
        redirected: Redirected = []
        try:
            async with asyncio.timeout_at(inflight[0][1]) as timer:
                while inflight:
                    item, deadline, ends_batch = inflight[0]
                    if deadline != timer.when():
                        timer.reschedule(deadline)
                    try:
                        reply = await read()
                    except ResponseError as exc:  # that command's reply
                        reply = exc
                    inflight.popleft()
                    if self.on_redirect is not None and isinstance(reply, _REDIRECTS):
                        redirected.append((item, reply))
                    else:
                        resolve(item[1], reply)
                    if ends_batch:
                        self.batches -= 1
                        self._free_slot()
                        if redirected:  # followed apart: the next batch need not wait
                            self.on_redirect(redirected)  # type: ignore[misc]
                            redirected = []
        except asyncio.CancelledError:  # closing, or the write side failed (``_fail``)
            fail([*(item for item, _ in redirected), *(item for item, *_ in inflight)],
                 self.error or asyncio.CancelledError())
            inflight.clear()
            raise
        except Exception as exc:  # noqa: BLE001 (the connection broke, or a reply is late)
            self.reader = None
            error = _timed_out(self.timeout) if isinstance(exc, TimeoutError) else exc
            fail([item for item, _ in redirected], error)
            await self._fail(error)
            return
        self.reader = None
        if self.on_given_back is not None:  # retired: its last reply is in
            await self._give_back()

    async def retire(self, on_given_back: Callable[[_Link], None]) -> None:
        """Take no new batch; give the connection back once the replies in flight are in."""
        self.on_given_back = on_given_back
        if self.reader is None:
            await self._give_back()

    async def slot_free(self) -> None:
        """Until a batch's replies are all in (or the connection failed)."""
        self._slot = asyncio.get_running_loop().create_future()
        await self._slot

    def _free_slot(self) -> None:
        if self._slot is not None and not self._slot.done():
            self._slot.set_result(None)

    async def _fail(self, error: BaseException) -> None:
        """Fail what is in flight and give the (disconnected) connection back at once, or, if
        a batch is being written on it, once that write is over."""
        self.dead, self.error = True, error
        fail([item for item, *_ in self.inflight], error)
        self.inflight.clear()
        self.batches = 0
        self._free_slot()
        if self.reader is not None and self.reader is not asyncio.current_task():
            await cancel_and_wait(self.reader)
        self.reader = None
        if not self.writing:
            await self._give_back()

    async def close(self) -> None:
        await cancel_and_wait(self.reader)
        self.reader = None
        await self._give_back()

    async def _give_back(self) -> None:
        if not self._given_back:
            self._given_back = True
            self.connection.socket_timeout = self.timeout
            with contextlib.suppress(Exception):  # closing it failed: it is gone either way
                await self.pool.release(self.connection)
        if self.on_given_back is not None:  # retired: the pipe forgets it
            self.on_given_back(self)


def pack(batch: list[Item]) -> bytes:
    """The batch's commands in Redis' protocol (RESP), as redis-py's ``pack_commands`` writes
    them for the arguments the gateway sends (str, int, bytes): in a third of its time, which
    was a tenth of a stream's Redis cost."""
    out: list[bytes] = []
    for command, _ in batch:
        out.append(b"*%d\r\n" % len(command))
        for arg in command:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


_REDIRECTS = (AskError, TryAgainError)  # MovedError is an AskError


def _timed_out(seconds: float | None) -> RedisTimeoutError:
    return RedisTimeoutError(f"no reply from Redis within {seconds}s")


def fail(batch: list[tuple[Any, asyncio.Future[Any]]], error: BaseException) -> None:
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
