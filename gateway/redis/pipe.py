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

On a connection redis-py opened (its handshake, AUTH, TLS, the sentinels' choice of primary),
at a lower level than its connection API: the commands are packed here (a third of
``pack_commands``' CPU) and written to the transport at once, and while the pipe holds the
connection the transport's protocol is ``_Replies``, which feeds each read to a hiredis reader
set up as redis-py sets up its own (its error classes, MOVED and ASK included) and resolves
each caller from the read callback itself. redis-py's ``read_response`` cost a coroutine chain
and a wake-up of a reader task per reply, and its send a coroutine, a drain and a timeout per
batch: a check cost 46 us of CPU with one in flight and 18 us with four, against 40 and 13 now
(and a stream's check and lease, 32 us against 24 with four). No pipeline object, pool
checkout, retry wrapper or timer per reply either. Each command's reply must come within the
connection's ``socket_timeout`` of its write: that timeout is taken off the connection while it
is held here (one timer, for the oldest batch's deadline, stands in for one per reply) and put
back with it, with redis-py's own protocol.

What this relies on in redis-py, which every Redis test exercises (``tests/test_redis_pipe.py``
holds replies back at a proxy): a connected ``Connection``'s ``_writer`` is an asyncio
``StreamWriter`` whose transport's protocol can be swapped and put back
(``BaseTransport.set_protocol``), and ``BaseParser.parse_error`` maps an error reply to
redis-py's exception classes.

redis-py speaks RESP3, whose push messages (an invalidation, a cluster's maintenance notice)
are no command's reply: they are dropped. A broken connection, a reply that is not RESP or one
nobody asked for, an error reply that is a connection error (``LOADING``), or a late reply
fails every command in flight on the connection, which is closed and given back at once; the
next batch takes a connection again (in sentinel mode, to the primary the sentinels name). A
connection the sentinel follower marked after a failover takes no new batch: it is given back
once its replies are in.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from typing import Any, Protocol, cast

import hiredis
from redis._parsers import BaseParser
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import AskError, InvalidResponse, RedisError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

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
        link.send(batch)

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
            try:
                await _ready(connection)
                link = self._link = _Link(self._pool, connection, self._on_redirect)
            except BaseException as exc:
                await self._pool.release(connection)
                if isinstance(exc, TimeoutError):
                    raise RedisTimeoutError(f"no connection to Redis within "
                                            f"{connection.socket_timeout}s") from None
                raise
        return link

    async def close(self) -> None:
        links = [*self._retired, *([self._link] if self._link is not None else [])]
        self._link = None
        for link in links:
            await link.close()


async def _ready(connection: AbstractConnection) -> None:
    """Connected, with nothing unread: what redis-py's own pool checks, which a cluster node's
    connections skip. A connection Redis closed while it sat in the pool (its idle timeout, a
    restart) would otherwise look open to the pipe's protocol, which never hears of its end,
    until a reply's deadline."""
    async with asyncio.timeout(connection.socket_timeout):
        if connection.is_connected:
            try:  # bytes nobody asked for, or Redis closed it: either way, not to be written to
                stale = await connection.can_read()
            except RedisConnectionError:  # closed: redis-py 8.2 raises and leaves it connected
                stale = True  # (8.0 and 8.1 disconnected it themselves, or said True)
            if stale:
                await connection.disconnect()
        if not connection.is_connected:
            await connection.connect()


class _Link:
    """One held connection and the commands in flight on it, oldest first. Its replies are
    read by ``_Replies``, the transport's protocol while the link holds the connection."""

    def __init__(self, pool: Pool, connection: AbstractConnection,
                 on_redirect: Callable[[Redirected], None] | None) -> None:
        self.pool = pool
        self.connection = connection
        self.on_redirect = on_redirect
        self.timeout: float | None = connection.socket_timeout
        connection.socket_timeout = None
        self.loop = asyncio.get_running_loop()
        # Each command and its future, its reply's deadline, whether it ends its batch.
        self.inflight: collections.deque[tuple[Item, float | None, bool]] = collections.deque()
        self.batches = 0  # batches in flight
        self.redirected: Redirected = []  # the batch being read: what a node sent elsewhere
        self._slot: asyncio.Future[None] | None = None  # the sender waits for a batch's end
        self._timer: asyncio.TimerHandle | None = None  # the oldest batch's deadline
        self.dead = False
        self.error: BaseException | None = None  # what killed it
        self.on_given_back: Callable[[_Link], None] | None = None
        self._given_back = False
        self._ending: set[asyncio.Task[None]] = set()  # giving back, from a callback
        encoder = connection.encoder
        self.reader = hiredis.Reader(
            protocolError=InvalidResponse, replyError=BaseParser.parse_error,
            notEnoughData=_NOT_ENOUGH_DATA,
            **({"encoding": encoder.encoding, "errors": encoder.encoding_errors}
               if encoder.decode_responses else {}))
        writer = connection._writer  # connected (``RedisPipe`` saw to it)
        assert writer is not None
        self.transport = cast(asyncio.Transport, writer.transport)
        self.protocol = self.transport.get_protocol()  # redis-py's, put back with it
        self.transport.set_protocol(_Replies(self))

    def send(self, batch: list[Item]) -> None:
        """Write ``batch`` now; each caller gets its reply, or the error that ended the link."""
        if self.dead or self.transport.is_closing():  # closed since ``RedisPipe`` looked
            self._end(RedisConnectionError("the connection to Redis failed"))
            fail(batch, cast(BaseException, self.error))
            return
        try:
            self.transport.write(pack(batch))
        except Exception as exc:  # noqa: BLE001 (an argument that cannot be sent, a bug)
            fail(batch, exc)
            self._end(exc if isinstance(exc, RedisError) else RedisConnectionError(
                f"a batch could not be written to Redis ({type(exc).__name__})"))
            return
        deadline = None if self.timeout is None else self.loop.time() + self.timeout
        last = len(batch) - 1
        self.inflight.extend((item, deadline, i == last) for i, item in enumerate(batch))
        self.batches += 1
        if self._timer is None and deadline is not None:
            self._timer = self.loop.call_at(deadline, self._late)

    def received(self, data: bytes) -> None:
        """Redis' replies, each handed to its caller as soon as it is read."""
        reader, inflight = self.reader, self.inflight
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not _NOT_ENOUGH_DATA:
                if isinstance(reply, _PUSH):
                    continue  # a server's notice (RESP3), no command's reply
                if not inflight:
                    raise InvalidResponse("Redis sent a reply nothing was waiting for")
                if isinstance(reply, RedisConnectionError):  # LOADING: ready for none of them
                    self._end(reply)
                    return
                item, _, ends_batch = inflight.popleft()
                if self.on_redirect is not None and isinstance(reply, _REDIRECTS):
                    self.redirected.append((item, reply))
                else:
                    resolve(item[1], reply)
                if ends_batch:
                    self._batch_ended()
        except Exception as exc:  # noqa: BLE001 (not RESP, a reply nothing waits for, an
            # error reply redis-py cannot parse): nothing after it can be trusted
            self._end(exc if isinstance(exc, RedisError) else InvalidResponse(
                f"Redis' reply could not be read ({type(exc).__name__})"))

    def _batch_ended(self) -> None:
        self.batches -= 1
        self._free_slot()
        if self.redirected:  # followed apart: the next batch need not wait for it
            redirected, self.redirected = self.redirected, []
            self.on_redirect(redirected)  # type: ignore[misc]
        self._stop_timer()
        if self.inflight:
            deadline = self.inflight[0][1]
            if deadline is not None:
                self._timer = self.loop.call_at(deadline, self._late)
        elif self.on_given_back is not None:  # retired: its last reply is in
            self._give_back_soon()

    def _late(self) -> None:
        self._timer = None
        if self.inflight:
            self._end(_timed_out(self.timeout))

    def lost(self, exc: BaseException | None) -> None:
        self._end(RedisConnectionError("Connection closed by server.") if exc is None else
                  RedisConnectionError(f"Error while reading from Redis: {exc}"))

    def _end(self, error: BaseException) -> None:
        """The link is dead: fail what is in flight and give the connection back, closed."""
        if self.dead:
            return
        self.dead, self.error = True, error
        fail([*(item for item, _ in self.redirected), *(item for item, *_ in self.inflight)],
             error)
        self.redirected = []
        self.inflight.clear()
        self.batches = 0
        self._free_slot()
        self._stop_timer()
        self._give_back_soon()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _give_back_soon(self) -> None:
        task = self.loop.create_task(self._give_back())
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def retire(self, on_given_back: Callable[[_Link], None]) -> None:
        """Take no new batch; give the connection back once the replies in flight are in."""
        self.on_given_back = on_given_back
        if not self.inflight:
            await self._give_back()

    async def slot_free(self) -> None:
        """Until a batch's replies are all in (or the connection failed)."""
        self._slot = self.loop.create_future()
        await self._slot

    def _free_slot(self) -> None:
        if self._slot is not None and not self._slot.done():
            self._slot.set_result(None)

    async def close(self) -> None:
        if self.inflight or self.redirected:  # their callers are cancelled; the connection,
            self._end(asyncio.CancelledError())  # closed: their replies belong to nobody
        await self._give_back()
        await asyncio.gather(*self._ending)

    async def _give_back(self) -> None:
        """redis-py's protocol back on the transport, the connection back in its pool (closed
        first if the link died: replies it still holds belong to nobody)."""
        if not self._given_back:
            self._given_back = True
            self.transport.set_protocol(self.protocol)
            self.connection.socket_timeout = self.timeout
            with contextlib.suppress(Exception):  # closing it failed: it is gone either way
                if self.dead:
                    await self.connection.disconnect(nowait=True)
                await self.pool.release(self.connection)
        if self.on_given_back is not None:  # retired: the pipe forgets it
            self.on_given_back(self)


class _Replies(asyncio.Protocol):
    """The transport's protocol while a link holds the connection: each read goes straight to
    the link (no stream reader, task or coroutine per reply). The connection's end is passed
    on to redis-py's own protocol too, which then knows it is closed."""

    def __init__(self, link: _Link) -> None:
        self.link = link

    def data_received(self, data: bytes) -> None:
        self.link.received(data)

    def eof_received(self) -> bool:
        return False  # close: Redis has gone

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.link.lost(exc)
        finally:
            self.link.protocol.connection_lost(exc)


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
_NOT_ENOUGH_DATA: Any = object()  # what the reader returns until a whole reply is in
_PUSH: Any = getattr(hiredis, "PushNotification", ())  # RESP3's unasked-for messages


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
