"""The circuit breaker that the rate limiter and the key store share: whether Redis answers, as
the hot path sees it.

Redis sits on every request's path (a key lookup, a rate-limit check), so a slow or dead Redis
must cost little and never stall the event loop:

- Timeouts are short (``[redis] timeout_seconds`` for connecting, and for each reply, counted
  from its command's write: ``pipe``).
- No command is sent twice (``topology.connect``). A reply lost on its way back (a reset
  connection, a timeout) may belong to a script that ran: the command fails, its caller
  applies the failure policy, and the breaker opens. Redis restarted (a stale pooled
  connection) costs the same, for one round trip: the breaker's probe pings at once.
- Once a call fails, the breaker opens: callers stop trying Redis and apply the failure policy
  immediately, while one background task pings Redis (at once, then every ``PROBE_SECONDS``)
  and closes the breaker when it answers. A dead or blackholed Redis so costs one timeout to
  the requests in flight when it went away, and nothing to the requests after them; a timeout
  that was only a hiccup closes the breaker again within a round trip.

On a cluster every command names keys of one hash tag (none spans slots), so a failure belongs
to one primary: the breaker opens for that primary's keys only, and the other shards stay exact
while a dead primary's replica is promoted. A slot being migrated is no failure at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis.exceptions import AskError, ClusterError, TryAgainError

from ..settings import RedisSettings
from ..tasks import cancel_and_wait
from .topology import PROBE_SECONDS, RedisClient, brief, describe, node_of, ping

log = logging.getLogger("gateway.redis")

SLOT_BUSY: tuple[type[BaseException], ...] = (AskError, TryAgainError, ClusterError)
"""A slot being migrated, still so after the batcher's ``REDIRECT_ATTEMPTS`` (``MovedError``
is an ``AskError``; ``ClusterError`` is redis-py's "TTL exhausted"): retry shortly. Not a node
failure: it applies the failure policy to the one command, and opens no breaker."""


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
