"""The app's Redis client, the circuit breaker that the rate limiter and key store share, and
the auto-pipelining that carries their commands.

Redis sits on every request's path (a key lookup, a rate-limit check), so a slow or dead Redis
must cost little and never stall the event loop:

- Timeouts are short (``[redis] timeout_seconds`` for connecting and for each reply).
- No retries after a timeout. redis-py 8 retries a failed command ten times with backoff by
  default, which would turn one timeout into many. Only a connection error is retried, once and
  at once: after a Redis restart, a pooled connection fails on first use and a fresh one works.
- Once a call fails, the breaker opens: callers stop trying Redis and apply the failure policy
  immediately, while one background task pings Redis (at once, then every ``PROBE_SECONDS``) and
  closes the breaker when it answers. A dead or blackholed Redis so costs one timeout to the
  requests in flight when it went away, and nothing to the requests after them; a timeout that
  was only a hiccup closes the breaker again within a round trip.
- Hot-path commands are auto-pipelined (``RedisBatcher``): the commands that requests issue in
  the same moment travel together, in one pipeline on one connection. A burst of N concurrent
  checks so costs one or two round trips and one connection, not N connections opened at once:
  that would be a handshake storm which on a busy host outlasts the connect timeout, and past
  100 in flight redis-py's pool refuses outright ("Too many connections"); its blocking pool
  instead lets some waiters starve past any timeout.

Three deployments, one client type per ``[redis] mode`` (``connect``), all behind the same
commands: ``single`` (``Redis``), ``cluster`` (redis-py's ``RedisCluster``: it routes each command
by its key's slot, follows MOVED and ASK, and finds a promoted replica by reloading the slot map
after a connection error, which the breaker's probe meets) and ``sentinel`` (a ``Redis`` whose
pool asks the sentinels for the primary on every new connection; ``follow_sentinel_primary``
makes it notice a failover at once). Every command the gateway sends names keys of one hash
tag, so none spans slots; on a cluster the batcher sends one pipeline per primary, and the
breaker opens for the failing primary's keys only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from .settings import RedisSettings

log = logging.getLogger("gateway.redis")

PROBE_SECONDS = 1.0
"""How often an open breaker pings Redis to find out whether it answers again."""

MAX_BATCH = 512
"""Commands per pipeline at most; more wait for the next round trip."""

REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError)
"""What a Redis call raises when Redis is down, slow or refusing (``TimeoutError`` is an
``OSError``; a cluster none of whose nodes answers raises ``RedisClusterException``)."""


RedisClient = aioredis.Redis | RedisCluster
"""What ``connect`` returns: the commands the gateway uses are the same on both."""


def connect(settings: RedisSettings, *, timeout: float | None = None) -> RedisClient:
    """A client for ``[redis] mode`` with short timeouts and no retries beyond one after a
    connection error; nothing is sent until it is first used. ``rediss://`` verifies the server
    against the system CAs, or ``ca_file``."""
    seconds = settings.timeout_seconds if timeout is None else timeout
    options: dict[str, Any] = {
        "socket_timeout": seconds, "socket_connect_timeout": seconds, "client_name": "gateway",
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    }
    if settings.ca_file:
        options["ssl_ca_certs"] = settings.ca_file
    if settings.mode == "cluster":
        # No retries: a cluster pipeline retries a connection error by closing every
        # connection to every node, failing the pipelines in flight to the healthy ones. A dead
        # node is the breaker's to handle (its probe reloads the slot map; MOVED and ASK are
        # still followed, being no errors).
        options["retry"] = Retry(NoBackoff(), 0)
        # A slot map with a hole (a shard with no primary yet) still serves the other slots.
        return RedisCluster.from_url(settings.url, require_full_coverage=False, **options)
    if settings.mode == "sentinel":
        sentinels = [(host, int(port)) for host, _, port in
                     (address.rpartition(":") for address in settings.sentinels)]
        sentinel = Sentinel(sentinels, sentinel_kwargs={
            "socket_timeout": seconds, "socket_connect_timeout": seconds,
            "password": settings.sentinel_password or None})
        return sentinel.master_for(settings.service_name, username=settings.username or None,
                                   password=settings.password or None, **options)
    return aioredis.Redis.from_url(settings.url, **options)


async def ping(client: RedisClient) -> None:
    """Every primary answers: a cluster with a primary down is not up, whichever node is the
    client's default (where a plain PING goes)."""
    if isinstance(client, RedisCluster):
        await client.ping(target_nodes=RedisCluster.PRIMARIES)
    else:
        await client.ping()


def node_of(client: RedisClient, key: Any) -> str | None:
    """The name (``host:port``) of the cluster primary that serves ``key`` as the client last
    saw the slots; None outside cluster mode, or when no node serves it."""
    if not isinstance(client, RedisCluster) or key is None:
        return None
    try:
        node = client.get_node_from_key(key)
    except REDIS_ERRORS:
        return None
    return None if node is None else node.name


def first_key(command: tuple[Any, ...]) -> Any:
    """The key a command of the gateway's names first: ``EVALSHA sha numkeys key ...``,
    ``ZREM key ...``, ``HGET key ...``; None for ``PING``."""
    if command[0] in ("EVALSHA", "EVAL"):
        return command[3] if int(command[2]) > 0 else None
    return command[1] if len(command) > 1 else None


async def close(client: RedisClient) -> None:
    """Close the client, and in sentinel mode its connections to the sentinels too."""
    await client.aclose()
    pool = getattr(client, "connection_pool", None)
    if isinstance(pool, SentinelConnectionPool):
        for sentinel in pool.sentinel_manager.sentinels:
            await sentinel.aclose()


async def follow_sentinel_primary(client: RedisClient, seconds: float = PROBE_SECONDS) -> None:
    """Sentinel mode: ask the sentinels for the primary every ``seconds``; when it changed, the
    pool drops its connections to the old one (idle ones at once, busy ones when released).

    redis-py asks only when it opens a connection, and after ``SENTINEL FAILOVER`` the old
    primary keeps accepting writes until the sentinels demote it (about 8 s later): pooled
    connections would go on counting there, apart from every other gateway.
    """
    pool = getattr(client, "connection_pool", None)
    if not isinstance(pool, SentinelConnectionPool):
        return
    known = None
    while True:
        try:
            primary = await pool.get_master_address()  # closes the idle connections if it moved
            if known is not None and primary != known:
                # The busy ones: closed when released (redis-py >= 7), or at once (older).
                mark = getattr(pool, "update_active_connections_for_reconnect", None)
                await (mark() if mark is not None else pool.disconnect(inuse_connections=True))
            known = primary
        except Exception as exc:  # no sentinel answers, or none names a primary: ask again
            log.debug("sentinels: %s: %s", type(exc).__name__, exc)
        await asyncio.sleep(seconds)


def describe(settings: RedisSettings) -> str:
    """Where Redis is, for log lines and messages: never a password."""
    if settings.mode == "sentinel":
        return (f"sentinel service {settings.service_name!r} "
                f"(sentinels {', '.join(settings.sentinels)})")
    where = safe_url(settings.url)
    return f"{where} (cluster)" if settings.mode == "cluster" else where


class RedisBatcher:
    """Auto-pipelining: ``await batcher.execute(*command)`` queues the command; one task sends
    whatever has queued as one pipeline (``transaction=False``: each command, each script, stays
    atomic on its own), waits for the replies, then sends what queued meanwhile. A command
    waits at most for the batch in flight plus its own: two round trips.

    A caller that is cancelled leaves its command in the batch (it may already be on the wire);
    its reply is dropped.
    """

    def __init__(self, client: RedisClient) -> None:
        self._client = client
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def execute(self, *command: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((command, future))
        if self._sender is None:
            self._sender = loop.create_task(self._send_all())
        return await future

    async def _send_all(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                await self._send(batch)
        finally:
            self._sender = None

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        """On a cluster, one pipeline per primary, all at once: a dead node fails only the
        commands for its slots."""
        if not isinstance(self._client, RedisCluster):
            return await self._send_pipeline(batch)
        by_node: dict[str | None, list[tuple[tuple[Any, ...], asyncio.Future[Any]]]] = {}
        for item in batch:
            by_node.setdefault(node_of(self._client, first_key(item[0])), []).append(item)
        await asyncio.gather(*(self._send_pipeline(items) for items in by_node.values()))

    async def _send_pipeline(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]
                             ) -> None:
        try:
            replies = await self._execute([command for command, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # Redis down or slow: every caller decides what that means
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue  # its caller is gone
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """One pipeline. On a cluster a connection error is retried once, at once, here (the
        client itself has no retries, see ``connect``): a slot map refresh recycles the
        connections to every node, and one may close under a pipeline."""
        retries = 1 if isinstance(self._client, RedisCluster) else 0
        while True:
            pipe = self._client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            try:
                return await pipe.execute(raise_on_error=False)
            except RedisConnectionError:
                if not retries:
                    raise
                retries -= 1

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        for _, future in self._queue:
            future.cancel()
        self._queue.clear()


def safe_url(url: str) -> str:
    """The URL without its password, for log lines."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=f"{user}{host}{port}").geturl()


class RedisBreaker:
    """Whether Redis answers, as the hot path sees it.

    ``up_for(key)`` is read on every request and costs nothing while all is well. ``failed()``
    opens the breaker, logs the outage once at WARNING and counts it; recovery is noticed by
    the probe task alone, so no request ever waits on a Redis that is known to be down.

    On a cluster a failure for a key opens the breaker for that key's primary only: the keys
    on the other shards stay exact while a dead primary's replica is promoted.
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

    def failed(self, exc: BaseException, key: Any = None) -> None:
        """A call failed: for ``key`` (its cluster primary), or for Redis as a whole."""
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
                    type(exc).__name__, exc, policy, self._probe_seconds)
        self._probe = asyncio.get_running_loop().create_task(self._probe_until_up())

    async def _probe_until_up(self) -> None:
        while True:
            try:
                await ping(self._client)
            except REDIS_ERRORS:
                await asyncio.sleep(self._probe_seconds)
                continue
            self.up = True
            self._down_nodes = None
            self._probe = None
            log.warning("Redis at %s answers again after %.1fs; rate limits are shared again",
                        describe(self._settings), time.monotonic() - self._down_since)
            return

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None


@contextlib.asynccontextmanager
async def open_redis(settings: RedisSettings
                     ) -> AsyncIterator[tuple[RedisClient, RedisBreaker]]:
    """The app's Redis client and breaker, open for the app's whole life.

    A Redis that does not answer at start-up does not stop the gateway: the breaker opens and
    the failure policy applies until Redis answers.
    """
    client = connect(settings)
    breaker = RedisBreaker(client, settings)
    follower = asyncio.get_running_loop().create_task(follow_sentinel_primary(client))
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
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        await breaker.close()
        await close(client)
