"""Auto-pipelining for the hot path's Redis commands (a rate-limit check, a lease's renewal or
release, a key lookup): the commands that requests issue in the same moment travel together, in
one write on one connection (per cluster primary), and go out while the batch before them is
still in flight (``pipe``).

Why: a burst of N concurrent checks so costs a few writes and one connection, not N connections
opened at once. That would be a handshake storm, which on a busy host outlasts the connect
timeout; past its connection cap (``max_connections``) redis-py's pool refuses outright ("Too
many connections"), and its blocking pool instead lets some waiters starve past any timeout.

On a cluster every command names keys of one hash tag (none spans slots). The batcher keeps one
queue and one sender per primary, so a slow primary delays only its own keys, and follows MOVED
and ASK itself, with ``ASKING`` and the command on one connection (``RedisBatcher._pipeline``
says why).

What the cluster part relies on in redis-py beyond its documented API, each pinned by
``tests/test_redis_internals.py`` for the range ``setup.cfg`` names (where only a cluster shows
the behaviour, the test pins the signature and names the test in
``tests/guarantees/test_redis_cluster.py`` that exercises it); the connection itself, once lent,
is ``pipe``'s, with its own list:

1. ``ClusterNode.acquire_connection()`` lends a connection (a free one, else a new one not yet
   connected) without the checks redis-py's ``ConnectionPool`` makes on a checkout (so
   ``pipe`` checks it), and ``ClusterNode.release(connection)`` takes it back for the next
   borrower; both are plain calls, not coroutines.
2. ``ClusterNode.execute_pipeline(commands)`` writes ``PipelineCommand(position, *args)``s on
   one connection, in order, and puts each reply in the command's ``result`` (an error reply
   as its exception, none raised): ``ASKING`` and the command it lets in stay together.
3. ``RedisCluster.nodes_manager.move_slot(error)``, a coroutine, points the slot of a
   ``MovedError`` at the node it names in the client's slot map (adding the node if it is new).
4. ``ClusterPipeline.execute(raise_on_error=False, allow_redirections=False)`` leaves MOVED,
   ASK and TRYAGAIN in its replies, as exceptions, instead of following them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import AskError, ClusterError, MovedError, TryAgainError

from ..tasks import cancel_and_wait
from .commands import Item, Redirected, fail, resolve
from .pipe import RedisPipe
from .topology import RedisClient, node_of

MAX_BATCH = 512
"""Commands per pipeline at most; more wait for the next round trip."""

REDIRECT_ATTEMPTS = 20
TRY_AGAIN_SECONDS = 0.05
"""A command redirected (MOVED, ASK) or told TRYAGAIN is sent again up to ``REDIRECT_ATTEMPTS``
times, after ``TRY_AGAIN_SECONDS`` when Redis said TRYAGAIN or it bounced more than once: a
multi-key script on a migrating slot gets TRYAGAIN until the slot's keys have all moved."""


def first_key(command: tuple[Any, ...]) -> Any:
    """The key a command of the gateway's names first: ``EVALSHA sha numkeys key ...``,
    ``ZREM key ...``, ``HGET key ...``."""
    return command[3] if command[0] == "EVALSHA" else command[1]


class RedisBatcher:
    """Auto-pipelining: ``await batcher.execute(*command)`` queues the command; at the event
    loop's next turn one task (per cluster primary) sends whatever has queued as one pipeline
    (no transaction: each command, each script, stays atomic on its own), on one held
    connection (``pipe.RedisPipe``), and each reply resolves its caller as it is read. A
    reply is what Redis sent, without redis-py's response callbacks (``SET`` gives ``b"OK"``);
    the commands the gateway sends read the same either way. A redirected command waits for
    its redirect to be followed too.

    A caller that is cancelled leaves its command in the batch (it may already be on the wire);
    its reply is dropped.
    """

    def __init__(self, client: RedisClient) -> None:
        self._client = client
        self._pipes: dict[str | None, RedisPipe] = {}
        """Outside cluster mode one; on a cluster one per primary that served a batch."""
        # Asked once, not per command: redis-py's client classes have typing Protocols among
        # their bases, which make isinstance slow (docs/performance.md).
        self._cluster = isinstance(client, RedisCluster)
        if not isinstance(client, RedisCluster):
            self._pipes[None] = RedisPipe(client.connection_pool)
        self._queues: dict[str | None, list[Item]] = {}
        self._senders: dict[str | None, asyncio.Task[None]] = {}
        self._redirects: set[asyncio.Task[None]] = set()

    async def execute(self, *command: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        node = node_of(self._client, first_key(command)) if self._cluster else None
        self._queues.setdefault(node, []).append((command, future))
        if node not in self._senders:
            self._senders[node] = loop.create_task(self._send_all(node))
        return await future

    async def _send_all(self, node: str | None) -> None:
        queue = self._queues[node]
        try:
            while queue:
                batch = queue[:MAX_BATCH]
                del queue[:MAX_BATCH]
                pipe = self._pipe_to(node)
                if pipe is not None:
                    await pipe.send(batch)  # the replies resolve the callers
                else:  # a slot no node serves: redis-py's pipeline routes and reports it
                    await self._send_pipeline(batch)
        finally:
            # No await between the empty queue and here: a command queued later starts a
            # sender of its own.
            del self._senders[node]
            if not queue:
                del self._queues[node]

    def _pipe_to(self, node: str | None) -> RedisPipe | None:
        pipe = self._pipes.get(node)
        if pipe is None and node is not None:
            assert isinstance(self._client, RedisCluster)
            pipe = self._pipes[node] = RedisPipe(_NodePool(self._client, node),
                                                 self._redirected)
        return pipe

    def _redirected(self, redirected: Sequence[tuple[Item, BaseException]]) -> None:
        task = asyncio.get_running_loop().create_task(self._follow(redirected))
        self._redirects.add(task)
        task.add_done_callback(self._redirects.discard)

    async def _send_pipeline(self, batch: list[Item]) -> None:
        try:
            replies = await self._pipeline([command for command, _ in batch])
        except asyncio.CancelledError as exc:
            fail(batch, exc)
            raise
        except Exception as exc:  # Redis down or slow: every caller decides what that means
            replies = [exc] * len(batch)
        redirected = [(item, reply) for item, reply in zip(batch, replies, strict=True)
                      if isinstance(reply, (AskError, TryAgainError))]
        if redirected:  # followed apart: this primary's next batch need not wait for it
            self._redirected(redirected)
        for (_, future), reply in zip(batch, replies, strict=True):
            if not isinstance(reply, (AskError, TryAgainError)):
                resolve(future, reply)

    async def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """One pipeline on a cluster, redirects left in the replies. redis-py would follow an
        ASK with ASKING on one pooled connection and the command on another, where it gets
        MOVED back: "TTL exhausted" for a whole migration. _follow sends the two on one
        connection."""
        assert isinstance(self._client, RedisCluster)
        pipe = self._client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return await pipe.execute(raise_on_error=False, allow_redirections=False)  # item 4

    async def _follow(self, redirected: Sequence[tuple[Item, BaseException]]) -> None:
        """Send redirected commands again until they get a true answer: after MOVED to the new
        owner (the slot map patched), after ASK as ``ASKING`` + the command on one connection
        to the node that imports the slot, after TRYAGAIN a moment later."""
        pending = list(redirected)
        try:
            await self._follow_rounds(pending)
        except asyncio.CancelledError as exc:
            fail([item for item, _ in pending], exc)
            raise

    async def _follow_rounds(self, pending: Redirected) -> None:
        """``_follow``'s rounds; ``pending`` holds what is still unanswered."""
        assert isinstance(self._client, RedisCluster)
        for attempt in range(REDIRECT_ATTEMPTS):
            if attempt > 1 or any(isinstance(r, TryAgainError) for _, r in pending):
                await asyncio.sleep(TRY_AGAIN_SECONDS)
            asks: dict[str, list[Item]] = {}
            again: list[Item] = []
            for item, reply in pending:
                if isinstance(reply, MovedError):
                    await self._client.nodes_manager.move_slot(reply)  # item 3
                    again.append(item)
                elif isinstance(reply, AskError):
                    asks.setdefault(f"{reply.host}:{reply.port}", []).append(item)
                else:
                    again.append(item)
            groups = [*asks.values(), again] if again else list(asks.values())
            answers = await asyncio.gather(
                *(self._asking(name, items) for name, items in asks.items()),
                *([self._pipeline([command for command, _ in again])] if again else []),
                return_exceptions=True)
            pending.clear()
            for items, replies in zip(groups, answers, strict=True):
                for item, reply in zip(items, _spread(replies, len(items)), strict=True):
                    if isinstance(reply, (AskError, TryAgainError)):
                        pending.append((item, reply))
                    else:
                        resolve(item[1], reply)
            if not pending:
                return
        for (_, future), reply in pending:
            resolve(future, reply)

    async def _asking(self, name: str, items: list[Item]) -> list[Any]:
        """``ASKING`` and each command, in one pipeline on one connection to node ``name``:
        ASKING lets the next command on its connection in, and only that one."""
        assert isinstance(self._client, RedisCluster)
        node: ClusterNode | None = self._client.get_node(node_name=name)
        if node is None:
            raise ClusterError(f"ASK to {name}, a node the slot map does not know yet")
        commands: list[PipelineCommand] = []
        for command, _ in items:
            commands += [PipelineCommand(len(commands), "ASKING"),
                         PipelineCommand(len(commands) + 1, *command)]
        await node.execute_pipeline(commands)  # one connection (item 2)
        return [command.result for command in commands[1::2]]

    async def close(self) -> None:
        await cancel_and_wait(*self._senders.values(), *self._redirects)
        for queue in self._queues.values():
            fail(queue, asyncio.CancelledError())
        self._queues.clear()
        for pipe in self._pipes.values():
            await pipe.close()


class _NodePool:
    """A cluster primary's connections, as ``RedisPipe`` takes them: from the node the slot map
    names now (a node that left and came back is a new ``ClusterNode``), each given back to the
    node it came from."""

    def __init__(self, client: RedisCluster, name: str) -> None:
        self._client = client
        self._name = name
        self._lent: dict[AbstractConnection, ClusterNode] = {}

    async def get_connection(self) -> AbstractConnection:
        node = self._client.get_node(node_name=self._name)
        if node is None:
            raise ClusterError(f"{self._name} is no longer in the cluster's slot map")
        connection = node.acquire_connection()  # item 1
        self._lent[connection] = node
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        node = self._lent.pop(connection, None)
        if node is not None:
            node.release(connection)  # type: ignore[arg-type]


def _spread(replies: list[Any] | BaseException, count: int) -> list[Any]:
    return [replies] * count if isinstance(replies, BaseException) else replies
