"""Pipelining on one Redis connection (one per cluster primary): a batch of commands is
written as soon as it has queued while at most one batch is still in flight (``IN_FLIGHT``),
and each reply resolves its caller the moment it is read. On a cluster, the commands a node
redirects (MOVED, ASK, TRYAGAIN) go back to the batcher, which follows them.

Why two and not one: under a burst, the event loop is busy reading the rest of the requests
while the first batch's replies come back; with one batch in flight the second (most of the
burst) waited until the loop got round to reading those replies, and a check's tail wait grew
several-fold. Why not more: each further batch in flight is one more write and read for fewer
commands, more CPU on every request's path for no shorter wait. (The figures, and how they
were measured: ``docs/performance.md``.)

On a connection redis-py opened (its handshake, AUTH, TLS, the sentinels' choice of primary),
at a lower level than its connection API: the commands are packed by ``commands.pack`` (for
a fraction of ``pack_commands``' CPU) and written to the transport at once, and while the pipe
holds the connection the transport's protocol is ``_Replies``, which feeds each read to a
hiredis reader set up as redis-py sets up its own (its error classes, MOVED and ASK included)
and resolves each caller from the read callback itself. redis-py's ``read_response`` costs a
coroutine chain and a wake-up of a reader task per reply, and its send a coroutine, a drain and
a timeout per batch; here there is no pipeline object, pool checkout, retry wrapper or timer
per reply either (the CPU a check costs either way: ``docs/performance.md``). Each command's
reply must come within the connection's ``socket_timeout`` of its write: that timeout is taken
off the connection while it is held here (one timer, for the oldest batch's deadline, stands in
for one per reply) and put back with it, with redis-py's own protocol.

What this relies on in redis-py (and hiredis) beyond their documented API, each pinned by
``tests/test_redis_internals.py``, which ``scripts/test`` runs on the floor of ``setup.cfg``'s
range as well as on the installed version; every Redis test exercises them too
(``tests/test_redis_pipe.py`` holds replies back at a proxy; ``tests/guarantees/`` has the
sentinel, TLS and cluster tests):

1. A connected ``AbstractConnection``'s ``_writer`` is an asyncio ``StreamWriter`` whose
   transport's protocol (redis-py's) can be swapped for another with ``set_protocol`` and put
   back, after which redis-py reads and writes on the connection as before; a
   ``connection_lost`` passed on to redis-py's protocol while it is out tells redis-py that
   the connection ended. (On asyncio's loop and on uvloop's, whose transports are its own.)
2. ``redis._parsers.BaseParser.parse_error``, given an error reply's text, returns (does not
   raise) redis-py's exception for it, as redis-py's own hiredis reader gets it for
   ``replyError``: MOVED and ASK give ``MovedError`` and ``AskError`` (with ``host``, ``port``
   and ``slot_id``; a ``MovedError`` is an ``AskError``), TRYAGAIN ``TryAgainError``, NOSCRIPT
   ``NoScriptError``, LOADING ``BusyLoadingError`` (a redis-py ``ConnectionError``), and any
   other a ``ResponseError``.
3. ``connection.encoder`` has ``encoding``, ``encoding_errors`` and ``decode_responses``: how
   redis-py decodes replies on that connection, so the reader here decodes the same.
4. ``connection.socket_timeout`` is a plain attribute that redis-py reads at each read: None
   while the pipe holds the connection; once it is put back, redis-py's reads time out by it.
5. ``await connection.can_read()`` on a connected connection is False when nothing waits
   unread, True when bytes do, and True or a redis-py ``ConnectionError`` when Redis closed it
   (8.2 raises and leaves it connected; 8.0 and 8.1 say True or disconnect it), never False;
   ``disconnect()`` and ``connect()`` then make it usable again (``_ready``).
6. ``connection.should_reconnect()`` is True once its pool's
   ``update_active_connections_for_reconnect()`` marked it while it was lent (the sentinel
   follower, ``topology.follow_sentinel_primary``, after a failover), and the pool's
   ``release`` closes a connection so marked.
7. hiredis: a ``Reader``'s ``replyError`` may be any callable (its README says a class), whose
   result ``gets()`` returns for an error reply; ``gets()`` returns ``notEnoughData`` until a
   whole reply is in; a RESP3 push message comes out as a ``hiredis.PushNotification``.

The pool is redis-py's ``ConnectionPool`` (``get_connection()``, ``release``: its documented
API) or, on a cluster, a node's connections (``batcher._NodePool``, with the batcher's list).

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

from .commands import Item, Redirected, fail, pack, resolve


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
        if link is not None and (link.dead or link.connection.should_reconnect()):  # item 6
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
    until a reply's deadline. What ``can_read`` says: item 5."""
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
        connection.socket_timeout = None  # put back with the connection (item 4)
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
        encoder = connection.encoder  # items 2, 3 and 7: the reader redis-py would set up
        self.reader = hiredis.Reader(
            protocolError=InvalidResponse, replyError=BaseParser.parse_error,
            notEnoughData=_NOT_ENOUGH_DATA,
            **({"encoding": encoder.encoding, "errors": encoder.encoding_errors}
               if encoder.decode_responses else {}))
        writer = connection._writer  # connected (``RedisPipe`` saw to it); item 1
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


_REDIRECTS = (AskError, TryAgainError)  # MovedError is an AskError
_NOT_ENOUGH_DATA: Any = object()  # what the reader returns until a whole reply is in
_PUSH = hiredis.PushNotification  # RESP3's unasked-for messages (item 7)


def _timed_out(seconds: float | None) -> RedisTimeoutError:
    return RedisTimeoutError(f"no reply from Redis within {seconds}s")
