"""Where Redis is and how the gateway reaches it: one client type per ``[redis] mode``.

- ``single``: redis-py's ``Redis``.
- ``cluster``: redis-py's ``RedisCluster``. It routes each command by its key's slot; the
  batcher (``batcher.RedisBatcher``) follows MOVED and ASK itself, and a promoted replica is
  found by reloading the slot map after a connection error, which the breaker's probe meets.
- ``sentinel``: a ``Redis`` whose pool asks the sentinels for the primary on every new
  connection; ``follow_sentinel_primary`` makes it notice a failover at once.

No client retries a command by itself: a command whose reply was lost may have run, and sending
it again would take a second token (see ``connect``). Only the CLI's client, whose commands are
an operator's and idempotent or guarded by WATCH, retries a connection error once.

Nothing here holds state beyond the client: the batcher, the breaker and the app's client
(``lifecycle``) are built on top of it.

What the sentinel follower relies on in redis-py beyond its documented API, each pinned by
``tests/test_redis_internals.py`` (signatures, where only sentinels show the behaviour; then
exercised by ``tests/guarantees/test_redis_sentinel.py``) for the range ``setup.cfg`` names:

1. ``SentinelConnectionPool.get_master_address()``, a coroutine, asks the sentinels for the
   primary's ``(host, port)`` and, when it moved, closes the pool's idle connections.
2. A pool's ``update_active_connections_for_reconnect()`` marks the connections lent out, which
   its ``release`` then closes (``pipe``'s item 6: the pipe gives such a connection back).
3. ``SentinelConnectionPool.sentinel_manager.sentinels`` holds a ``Redis`` client per
   sentinel, for ``close`` to close: closing the client it serves does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from ..errors import bounded
from ..settings import RedisSettings

log = logging.getLogger("gateway.redis")

PROBE_SECONDS = 1.0
"""How often an open breaker pings Redis, and how often the sentinels are asked for the
primary."""

REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError)
"""What a Redis call raises when Redis is down, slow or refusing (``TimeoutError`` is an
``OSError``; a cluster none of whose nodes answers raises ``RedisClusterException``)."""

RedisClient = aioredis.Redis | RedisCluster
"""What ``connect`` returns: the commands the gateway uses are the same on both."""


def connect(settings: RedisSettings, *, timeout: float | None = None,
            retries: int = 0) -> RedisClient:
    """A client for ``[redis] mode`` with short timeouts; nothing is sent until it is first
    used. ``rediss://`` verifies the server against the system CAs, or ``ca_file``.

    ``retries`` (connection errors only, at once): 0 for the gateway. A reply lost on its way
    back (a reset connection) looks like any connection error, and resending a pipeline whose
    scripts already ran would spend tokens twice; a stale pooled connection is the breaker's
    to handle (its probe answers within a round trip). On a cluster a retry would also close
    every connection to every node, failing the healthy shards' pipelines in flight.
    """
    seconds = settings.timeout_seconds if timeout is None else timeout
    options: dict[str, Any] = {
        "socket_timeout": seconds, "socket_connect_timeout": seconds, "client_name": "gateway",
        "retry": Retry(NoBackoff(), retries, supported_errors=(RedisConnectionError,)),
    }
    if settings.ca_file:
        options["ssl_ca_certs"] = settings.ca_file
    if settings.mode == "cluster":
        # A slot map with a hole (a shard with no primary yet) still serves the other slots.
        # reinitialize_steps=0: a MOVED patches the one slot (move_slot); by default every
        # fifth MOVED reloads the whole map by closing every node's connections, in-flight
        # pipelines' included.
        return RedisCluster.from_url(settings.url, require_full_coverage=False,
                                     reinitialize_steps=0, **options)
    if settings.mode == "sentinel":
        # Each sentinel asked once (redis-py's default retries with backoff for seconds):
        # another sentinel, or the next poll, is the retry.
        sentinel = Sentinel(sentinel_addresses(settings), sentinel_kwargs={
            "socket_timeout": seconds, "socket_connect_timeout": seconds,
            "password": settings.sentinel_password or None, "retry": Retry(NoBackoff(), 0)})
        return sentinel.master_for(settings.service_name, username=settings.username or None,
                                   password=settings.password or None, **options)
    return aioredis.Redis.from_url(settings.url, **options)


def sentinel_addresses(settings: RedisSettings) -> list[tuple[str, int]]:
    return [(host, int(port)) for host, _, port in
            (address.rpartition(":") for address in settings.sentinels)]


async def ping(client: RedisClient) -> None:
    """Every primary answers: a cluster with a primary down is not up, whichever node is the
    client's default (where a plain PING goes)."""
    if isinstance(client, RedisCluster):
        await client.ping(target_nodes=RedisCluster.PRIMARIES)
    else:
        await client.ping()


async def primaries_answering(client: RedisCluster) -> tuple[int, int]:
    """(how many cluster primaries answer a PING, how many there are), each asked apart."""
    await client.initialize()
    primaries = client.get_primaries()
    answers = await asyncio.gather(*(client.ping(target_nodes=node) for node in primaries),
                                   return_exceptions=True)
    return sum(not isinstance(a, BaseException) for a in answers), len(primaries)


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


async def close(client: RedisClient) -> None:
    """Close the client, and in sentinel mode its connections to the sentinels too."""
    await client.aclose()
    pool = getattr(client, "connection_pool", None)
    if isinstance(pool, SentinelConnectionPool):
        for sentinel in pool.sentinel_manager.sentinels:
            await sentinel.aclose()


async def follow_sentinel_primary(client: RedisClient, settings: RedisSettings,
                                  seconds: float = PROBE_SECONDS) -> None:
    """Sentinel mode: notice a failover at once. The sentinels announce it (``+switch-master``
    on their pub/sub, heard here from each sentinel); asking them for the primary every
    ``seconds`` is the fallback for a missed message. When the primary changed, the pool drops
    its connections to the old one (idle ones at once, busy ones when released).

    redis-py asks only when it opens a connection, and after ``SENTINEL FAILOVER`` the old
    primary keeps accepting writes until the sentinels demote it, seconds later
    (``docs/performance.md``): pooled connections would go on counting there, apart from every
    other gateway.
    """
    pool = getattr(client, "connection_pool", None)
    if not isinstance(pool, SentinelConnectionPool):
        return
    switched = asyncio.Event()
    listeners = [asyncio.ensure_future(_listen_for_switch(address, settings, switched))
                 for address in sentinel_addresses(settings)]
    known = None
    failing = False
    try:
        while True:
            try:
                primary = await pool.get_master_address()  # closes idle connections if moved
                if known is not None and primary != known:
                    # The busy ones: closed when released (item 2).
                    await pool.update_active_connections_for_reconnect()
                known = primary
                if failing:
                    log.warning("sentinels answer again: the primary is %s:%s", *primary)
                failing = False
            except Exception as exc:  # no sentinel answers, or none names a primary
                log.log(logging.DEBUG if failing else logging.WARNING,
                        "sentinels: cannot find the primary of %r (%s: %s); asking again "
                        "every %gs", settings.service_name, type(exc).__name__, brief(exc),
                        seconds)
                failing = True
            switched.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await switched.wait()
    finally:
        for listener in listeners:
            listener.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)


async def _listen_for_switch(address: tuple[str, int], settings: RedisSettings,
                             switched: asyncio.Event) -> None:
    """Set ``switched`` on each ``+switch-master`` of ``settings.service_name`` that one
    sentinel publishes; reconnect (every ``PROBE_SECONDS``) when it goes away."""
    while True:
        sentinel = aioredis.Redis(host=address[0], port=address[1],
                                  password=settings.sentinel_password or None,
                                  socket_connect_timeout=settings.timeout_seconds,
                                  retry=Retry(NoBackoff(), 0))
        try:
            async with sentinel.pubsub() as pubsub:
                await pubsub.subscribe("+switch-master")
                async for message in pubsub.listen():
                    data = message.get("data")
                    if isinstance(data, bytes) and data.split(b" ", 1)[0] == \
                            settings.service_name.encode():
                        switched.set()
        except REDIS_ERRORS as exc:
            log.debug("sentinel %s:%s pub/sub: %s: %s", *address, type(exc).__name__, exc)
        finally:
            await sentinel.aclose()
        await asyncio.sleep(PROBE_SECONDS)


MAX_ERROR_CHARS = 300
"""Of a Redis error in a log line: redis-py's text for "no sentinel answers" describes every
sentinel connection (kilobytes a line)."""


def brief(exc: BaseException) -> str:
    return bounded(str(exc), MAX_ERROR_CHARS)


def describe(settings: RedisSettings) -> str:
    """Where Redis is, for log lines and messages: never a password."""
    if settings.mode == "sentinel":
        return (f"sentinel service {settings.service_name!r} "
                f"(sentinels {', '.join(safe_address(a) for a in settings.sentinels)})")
    where = safe_url(settings.url)
    return f"{where} (cluster)" if settings.mode == "cluster" else where


_SECRET_PARAMETERS = frozenset({"password", "pass", "pwd", "auth", "secret", "token"})


def safe_url(url: str) -> str:
    """The URL without its secrets, for log lines: a password in the userinfo or in the query
    string (``?password=``) becomes ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hostport}" if ":" in userinfo else f"***@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k.lower() in _SECRET_PARAMETERS else v)
                           for k, v in pairs], safe="*")
    return parts._replace(netloc=netloc, query=query).geturl()


def safe_address(address: str) -> str:
    """A ``host:port`` entry as written, with any ``user:password@`` hidden."""
    return f"***@{address.rpartition('@')[2]}" if "@" in address else address
