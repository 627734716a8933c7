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
  the same moment travel together, on one connection, each without waiting for the replies in
  flight. A burst of N concurrent checks so costs one round trip and one connection, not N
  connections opened at once: that would be a handshake storm which on a busy host outlasts the
  connect timeout, and past 100 in flight redis-py's pool refuses outright ("Too many
  connections"); its blocking pool instead lets some waiters starve past any timeout.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from .settings import RedisSettings

log = logging.getLogger("gateway.redis")

PROBE_SECONDS = 1.0
"""How often an open breaker pings Redis to find out whether it answers again."""

MAX_BATCH = 512
"""Commands per pipeline at most; more wait for the next round trip."""

REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError)
"""What a Redis call raises when Redis is down, slow or refusing (``TimeoutError`` is an
``OSError``)."""


def connect(settings: RedisSettings, *, timeout: float | None = None) -> aioredis.Redis:
    """A client with short timeouts and no retries; nothing is sent until it is first used."""
    seconds = settings.timeout_seconds if timeout is None else timeout
    return aioredis.Redis.from_url(
        settings.url,
        socket_timeout=seconds,
        socket_connect_timeout=seconds,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        client_name="gateway",
    )


class RedisBatcher:
    """Auto-pipelining on one connection of its own: ``await batcher.execute(*command)``.

    The commands that requests issue in the same moment leave together, in one write; and a
    command leaves as soon as the write before it has, without waiting for that batch's
    replies. Redis answers in order, so one reader matches each reply to the next waiting
    caller. A command so waits for one round trip, however busy the connection; a burst of N
    checks costs one connection and a few writes. (redis-py's ``Pipeline`` waited for each
    batch's replies before sending the next: two round trips under load, and its machinery
    cost more than the command.) The connection is redis-py's own, used through its public
    ``pack_commands``, ``send_packed_command`` and ``read_response``: its handshake (AUTH,
    SELECT, TLS), its parser (hiredis) and its per-read timeout are the client's.

    Replies are Redis's own (``b"OK"``, a script's list), without redis-py's per-command
    conversions. Each command, each script, is atomic on its own (as in ``transaction=False``).
    When the
    connection breaks or a read times out, every caller waiting on it gets the error, and the
    next command opens a new connection. A caller that is cancelled leaves its command in place
    (it may already be on the wire); its reply is dropped.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self._pool = client.connection_pool
        self._conn: Any = None  # redis.asyncio.Connection, opened on first use
        self._outbox: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._writer: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._reader_conn: Any = None

    async def execute(self, *command: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._outbox.append((command, future))
        if self._writer is None:
            self._writer = loop.create_task(self._write_all())
        return await future

    async def _write_all(self) -> None:
        batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        try:
            while self._outbox:
                batch, self._outbox = self._outbox[:MAX_BATCH], self._outbox[MAX_BATCH:]
                batch = [(command, future) for command, future in batch if not future.done()]
                if not batch:
                    continue
                conn = self._conn or await self._connect()
                packed = conn.pack_commands([command for command, _ in batch])
                self._waiting.extend(future for _, future in batch)
                batch = []  # the reader answers them now
                if self._reader is None or self._reader_conn is not conn:
                    self._reader_conn = conn  # a reader of a broken connection ends by itself
                    self._reader = asyncio.get_running_loop().create_task(self._read_all(conn))
                await conn.send_packed_command(packed, check_health=False)
        except asyncio.CancelledError:
            self._fail(batch + self._outbox, None)
            self._outbox = []
            raise
        except Exception as exc:  # Redis down or slow: every caller decides what that means
            self._fail(batch + self._outbox, exc)
            self._outbox = []
        finally:
            self._writer = None

    async def _read_all(self, conn: Any) -> None:
        try:
            while self._waiting and conn is self._conn:
                try:
                    reply = await conn.read_response()
                except ResponseError as error:  # an error reply to one command: its caller's
                    reply = error
                if conn is not self._conn:
                    return  # replaced meanwhile: the waiting callers are the new one's
                future = self._waiting.popleft()
                if future.done():
                    continue  # its caller is gone
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the connection broke, or Redis did not answer in time
            if conn is self._conn:
                self._fail([], exc)
        finally:
            if self._reader is asyncio.current_task():
                self._reader = None

    async def _connect(self) -> Any:
        conn = self._pool.make_connection()
        await conn.connect()
        self._conn = conn
        return conn

    def _fail(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]],
              exc: BaseException | None) -> None:
        """The connection is no longer usable: every caller waiting on it, and those of
        ``batch`` (not sent), get ``exc`` (are cancelled when None); the next command opens a
        new connection."""
        futures = [future for _, future in batch] + list(self._waiting)
        self._waiting.clear()
        for future in futures:
            if not future.done():
                if exc is None:
                    future.cancel()
                else:
                    future.set_exception(exc)
        conn, self._conn = self._conn, None
        if conn is not None:
            asyncio.get_running_loop().create_task(conn.disconnect(nowait=True))

    async def close(self) -> None:
        for task in (self._writer, self._reader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for _, future in self._outbox:
            future.cancel()
        self._outbox.clear()
        for future in self._waiting:
            future.cancel()
        self._waiting.clear()
        if self._conn is not None:
            await self._conn.disconnect()
            self._conn = None


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

    ``up`` is read on every request and costs nothing. ``failed()`` opens the breaker, logs the
    outage once at WARNING and counts it; recovery is noticed by the probe task alone, so no
    request ever waits on a Redis that is known to be down.
    """

    def __init__(self, client: aioredis.Redis, settings: RedisSettings,
                 probe_seconds: float = PROBE_SECONDS) -> None:
        self._client = client
        self._settings = settings
        self._probe_seconds = probe_seconds
        self._probe: asyncio.Task[None] | None = None
        self._down_since = 0.0
        self.up = True
        self.outages = 0
        """Times Redis stopped answering since start-up (each outage counted once)."""

    def failed(self, exc: BaseException) -> None:
        if not self.up:
            return
        self.up = False
        self.outages += 1
        self._down_since = time.monotonic()
        policy = ("rate limits fall back to per-process in-memory buckets, NOT shared across "
                  "processes (failure_policy = fail_open)"
                  if self._settings.failure_policy == "fail_open" else
                  "rate-limited requests are refused with 503 (failure_policy = fail_closed)")
        log.warning("Redis at %s is not answering (%s: %s); %s; keys added in Redis are served "
                    "from cache only. Retrying every %gs.", safe_url(self._settings.url),
                    type(exc).__name__, exc, policy, self._probe_seconds)
        self._probe = asyncio.get_running_loop().create_task(self._probe_until_up())

    async def _probe_until_up(self) -> None:
        while True:
            try:
                await self._client.ping()
            except REDIS_ERRORS:
                await asyncio.sleep(self._probe_seconds)
                continue
            self.up = True
            self._probe = None
            log.warning("Redis at %s answers again after %.1fs; rate limits are shared again",
                        safe_url(self._settings.url), time.monotonic() - self._down_since)
            return

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None


@contextlib.asynccontextmanager
async def open_redis(settings: RedisSettings
                     ) -> AsyncIterator[tuple[aioredis.Redis, RedisBreaker]]:
    """The app's Redis client and breaker, open for the app's whole life.

    A Redis that does not answer at start-up does not stop the gateway: the breaker opens and
    the failure policy applies until Redis answers.
    """
    client = connect(settings)
    breaker = RedisBreaker(client, settings)
    try:
        try:
            await client.ping()
        except REDIS_ERRORS as exc:
            breaker.failed(exc)
        else:
            log.info("rate limits and keys shared through Redis at %s (prefix %r)",
                     safe_url(settings.url), settings.key_prefix)
        yield client, breaker
    finally:
        await breaker.close()
        await client.aclose()
