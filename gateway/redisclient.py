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
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

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
    """Auto-pipelining: ``await batcher.execute(*command)`` queues the command; one task sends
    whatever has queued as one pipeline (``transaction=False``: each command, each script, stays
    atomic on its own), waits for the replies, then sends what queued meanwhile. A command
    waits at most for the batch in flight plus its own: two round trips.

    A caller that is cancelled leaves its command in the batch (it may already be on the wire);
    its reply is dropped.
    """

    def __init__(self, client: aioredis.Redis) -> None:
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
        pipe = self._client.pipeline(transaction=False)
        for command, _ in batch:
            pipe.execute_command(*command)
        try:
            replies = await pipe.execute(raise_on_error=False)
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
