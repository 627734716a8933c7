"""The app's Redis client, the circuit breaker that the rate limiter and key store share, and
the auto-pipelining that carries their commands (the client itself, per ``[redis] mode``, comes
from ``redis_topology``).

Redis sits on every request's path (a key lookup, a rate-limit check), so a slow or dead Redis
must cost little and never stall the event loop:

- Timeouts are short (``[redis] timeout_seconds`` for connecting, and for each reply, counted
  from its command's write).
- No command is sent twice. A reply lost on its way back (a reset connection, a timeout) may
  belong to a script that ran: the command fails, its caller applies the failure policy, and
  the breaker opens. Redis restarted (a stale pooled connection) costs the same, for one round
  trip: the breaker's probe pings at once.
- Once a call fails, the breaker opens: callers stop trying Redis and apply the failure policy
  immediately, while one background task pings Redis (at once, then every ``PROBE_SECONDS``) and
  closes the breaker when it answers. A dead or blackholed Redis so costs one timeout to the
  requests in flight when it went away, and nothing to the requests after them; a timeout that
  was only a hiccup closes the breaker again within a round trip.
- Hot-path commands are auto-pipelined (``RedisBatcher``): the commands that requests issue in
  the same moment travel together, in one write on one connection (per cluster primary), and
  go out while the batch before them is still in flight (``redis_pipe``). A burst of N
  concurrent checks so costs a few writes and one connection, not N connections opened at once:
  that would be a handshake storm which on a busy host outlasts the connect timeout, and past
  100 in flight redis-py's pool refuses outright ("Too many connections"); its blocking pool
  instead lets some waiters starve past any timeout.

On a cluster every command names keys of one hash tag (none spans slots); the batcher keeps one
queue and one sender per primary (a slow primary delays only its own keys), follows MOVED and
ASK itself, and the breaker opens for the failing primary's keys only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import AskError, ClusterError, MovedError, TryAgainError

from ..settings import RedisSettings
from ..tasks import cancel_and_wait
from .pipe import RedisPipe, fail, resolve
from .topology import (
    PROBE_SECONDS,
    REDIS_ERRORS,
    RedisClient,
    brief,
    close,
    connect,
    describe,
    follow_sentinel_primary,
    node_of,
    ping,
    primaries_answering,
)

log = logging.getLogger("gateway.redis")

MAX_BATCH = 512
"""Commands per pipeline at most; more wait for the next round trip."""

SLOT_BUSY: tuple[type[BaseException], ...] = (AskError, TryAgainError, ClusterError)
"""A slot being migrated, still so after ``REDIRECT_ATTEMPTS`` (``MovedError`` is an
``AskError``; ``ClusterError`` is redis-py's "TTL exhausted"): retry shortly. Not a node
failure: it applies the failure policy to the one command, and opens no breaker."""

REDIRECT_ATTEMPTS = 20
TRY_AGAIN_SECONDS = 0.05
"""A command redirected (MOVED, ASK) or told TRYAGAIN is sent again up to ``REDIRECT_ATTEMPTS``
times, after ``TRY_AGAIN_SECONDS`` when Redis said TRYAGAIN or it bounced more than once: a
multi-key script on a migrating slot gets TRYAGAIN until the slot's keys have all moved."""

_Item = tuple[tuple[Any, ...], asyncio.Future[Any]]


def first_key(command: tuple[Any, ...]) -> Any:
    """The key a command of the gateway's names first: ``EVALSHA sha numkeys key ...``,
    ``ZREM key ...``, ``HGET key ...``."""
    return command[3] if command[0] == "EVALSHA" else command[1]


class RedisBatcher:
    """Auto-pipelining: ``await batcher.execute(*command)`` queues the command; at the event
    loop's next turn one task (per cluster primary) sends whatever has queued as one pipeline
    (no transaction: each command, each script, stays atomic on its own), on one held
    connection (``redis_pipe.RedisPipe``), and each reply resolves its caller as it is read. A
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
        self._cluster = isinstance(client, RedisCluster)  # once: 1.5 us each (typing.Protocol)
        if not isinstance(client, RedisCluster):
            self._pipes[None] = RedisPipe(client.connection_pool)
        self._queues: dict[str | None, list[_Item]] = {}
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

    def _redirected(self, redirected: Sequence[tuple[_Item, BaseException]]) -> None:
        task = asyncio.get_running_loop().create_task(self._follow(redirected))
        self._redirects.add(task)
        task.add_done_callback(self._redirects.discard)

    async def _send_pipeline(self, batch: list[_Item]) -> None:
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
        return await pipe.execute(raise_on_error=False, allow_redirections=False)

    async def _follow(self, redirected: Sequence[tuple[_Item, BaseException]]) -> None:
        """Send redirected commands again until they get a true answer: after MOVED to the new
        owner (the slot map patched), after ASK as ``ASKING`` + the command on one connection
        to the node that imports the slot, after TRYAGAIN a moment later."""
        pending = list(redirected)
        try:
            await self._follow_rounds(pending)
        except asyncio.CancelledError as exc:
            fail([item for item, _ in pending], exc)
            raise

    async def _follow_rounds(self, pending: list[tuple[_Item, BaseException]]) -> None:
        """``_follow``'s rounds; ``pending`` holds what is still unanswered."""
        assert isinstance(self._client, RedisCluster)
        for attempt in range(REDIRECT_ATTEMPTS):
            if attempt > 1 or any(isinstance(r, TryAgainError) for _, r in pending):
                await asyncio.sleep(TRY_AGAIN_SECONDS)
            asks: dict[str, list[_Item]] = {}
            again: list[_Item] = []
            for item, reply in pending:
                if isinstance(reply, MovedError):
                    await self._client.nodes_manager.move_slot(reply)
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

    async def _asking(self, name: str, items: list[_Item]) -> list[Any]:
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
        await node.execute_pipeline(commands)
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
        connection = node.acquire_connection()
        self._lent[connection] = node
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        node = self._lent.pop(connection, None)
        if node is not None:
            node.release(connection)  # type: ignore[arg-type]


def _spread(replies: list[Any] | BaseException, count: int) -> list[Any]:
    return [replies] * count if isinstance(replies, BaseException) else replies


class RedisBreaker:
    """Whether Redis answers, as the hot path sees it.

    ``up_for(key)`` is read on every request and costs nothing while all is well. ``failed()``
    opens the breaker, logs the outage once at WARNING and counts it; recovery is noticed by
    the probe task alone, so no request ever waits on a Redis that is known to be down.

    On a cluster a failure for a key opens the breaker for that key's primary only: the keys
    on the other shards stay exact while a dead primary's replica is promoted. A slot being
    migrated (``SLOT_BUSY``) opens nothing.
    """

    def __init__(self, client: RedisClient, settings: RedisSettings,
                 probe_seconds: float = PROBE_SECONDS) -> None:
        self._client = client
        self._settings = settings
        self._probe_seconds = probe_seconds
        self._probe: asyncio.Task[None] | None = None
        self._down_since = 0.0
        self._down_nodes: set[str] | None = None
        """While down: the cluster primaries that failed, or None for all of Redis."""
        self.up = True
        """Nothing is known to be down (``backend_state`` reads it)."""
        self.outages = 0
        """Times Redis stopped answering since start-up (each outage counted once)."""

    def up_for(self, key: Any) -> bool:
        """Whether a command for ``key`` should go to Redis."""
        if self.up:
            return True
        return self._down_nodes is not None and node_of(self._client, key) not in \
            self._down_nodes

    @property
    def partly_up(self) -> bool:
        """On a cluster: some primaries are down, and the others serve their keys."""
        return not self.up and self._down_nodes is not None

    def failed(self, exc: BaseException, key: Any = None) -> None:
        """A call failed: for ``key`` (its cluster primary), or for Redis as a whole."""
        if isinstance(exc, SLOT_BUSY):
            log.debug("a slot is being migrated (%s: %s): retry shortly", type(exc).__name__, exc)
            return
        node = node_of(self._client, key)
        if not self.up:
            if node is not None and self._down_nodes is not None:
                self._down_nodes.add(node)
            return
        self.up = False
        self._down_nodes = None if node is None else {node}
        self.outages += 1
        self._down_since = time.monotonic()
        policy = ("rate limits fall back to per-process in-memory buckets, NOT shared across "
                  "processes (failure_policy = fail_open)"
                  if self._settings.failure_policy == "fail_open" else
                  "rate-limited requests are refused with 503 (failure_policy = fail_closed)")
        where = describe(self._settings) + (f", node {node}" if node else "")
        log.warning("Redis at %s is not answering (%s: %s); %s; keys added in Redis are served "
                    "from cache only. Retrying every %gs.", where,
                    type(exc).__name__, brief(exc), policy, self._probe_seconds)
        self._probe = asyncio.get_running_loop().create_task(self._probe_until_up())

    def failed_somewhere(self, exc: BaseException) -> None:
        """A call that names no one key failed (a readiness ping): Redis as a whole, except on
        a cluster, where it cannot say which shard failed; the requests find that out."""
        if self._settings.mode != "cluster":
            self.failed(exc)

    async def _probe_until_up(self) -> None:
        while True:
            try:
                await ping(self._client)
            except Exception:  # noqa: BLE001 (a probe that died would leave the breaker open)
                await asyncio.sleep(self._probe_seconds)
                continue
            self.up = True
            self._down_nodes = None
            self._probe = None
            log.warning("Redis at %s answers again after %.1fs; rate limits are shared again",
                        describe(self._settings), time.monotonic() - self._down_since)
            return

    async def close(self) -> None:
        await cancel_and_wait(self._probe)
        self._probe = None


async def redis_health(client: RedisClient) -> str | None:
    """None when every primary answers; on a cluster with some down, how many answer; raises
    when none does."""
    if not isinstance(client, RedisCluster):
        await ping(client)
        return None
    answering, primaries = await primaries_answering(client)
    if answering == 0:
        raise ClusterError(f"none of the cluster's {primaries} primaries answers")
    if answering < primaries:
        return (f"degraded: {answering} of {primaries} primaries answer (keys on them are "
                "served from Redis)")
    return None


@contextlib.asynccontextmanager
async def open_redis(settings: RedisSettings
                     ) -> AsyncIterator[tuple[RedisClient, RedisBreaker]]:
    """The app's Redis client and breaker, open for the app's whole life.

    A Redis that does not answer at start-up does not stop the gateway: the breaker opens and
    the failure policy applies until Redis answers.
    """
    client = connect(settings)
    breaker = RedisBreaker(client, settings)
    follower = asyncio.get_running_loop().create_task(follow_sentinel_primary(client, settings))
    try:
        try:
            await ping(client)
        except REDIS_ERRORS as exc:
            breaker.failed(exc)
        else:
            log.info("rate limits and keys shared through Redis at %s (prefix %r)",
                     describe(settings), settings.key_prefix)
        yield client, breaker
    finally:
        await cancel_and_wait(follower)
        await breaker.close()
        await close(client)
