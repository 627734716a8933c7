"""The Redis limiter: each key's limits hold exactly across every process sharing one Redis.

One check is one call of ``token_bucket.lua`` (one round trip, atomic, Redis ``TIME`` as the
clock; on a cluster, on the primary that holds the key's slot): it checks the key's concurrency
cap, then takes a token, and for a stream adds a lease to the key's streams set. Checks issued
at the same moment share their round trip (see ``RedisBatcher``). The scripts are package data
registered with ``register_script`` and run by SHA; after ``NOSCRIPT`` (a ``SCRIPT FLUSH``, a
Redis restart, a promoted replica) they are loaded again, at the cost of one extra round trip,
once.

Leases: a stream's lease expires ``lease_seconds`` after it was last renewed. One background task
per limiter renews every lease this process holds, in one pipeline, every ``lease_seconds / 3``;
``release`` removes a lease the moment its stream ends. A process that dies (``kill -9``) stops
renewing, and its slots come back within ``lease_seconds``.

When Redis does not answer (see ``gateway.redisclient``), ``failure_policy`` decides:
``fail_open`` limits with a per-process ``MemoryLimiter`` until Redis is back, ``fail_closed``
refuses with 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from importlib.resources import files
from typing import Any, cast

from redis.exceptions import NoScriptError

from ..errors import ServiceUnavailable
from ..redisclient import REDIS_ERRORS, RedisBatcher, RedisBreaker, RedisClient, ping
from ..request_info import ClientKey
from ..settings import RedisSettings
from . import Decision
from .memory import MemoryLimiter

log = logging.getLogger("gateway.ratelimit")

_REFUSED_BY = ("", "requests", "concurrency")


def _script(name: str) -> str:
    return files(__package__).joinpath(name).read_text(encoding="utf-8")


def key_names(prefix: str, name: str) -> tuple[str, str]:
    """A client key's bucket and streams set.

    The key name is their hash tag, so both sit in one Redis Cluster slot (a script may touch
    only one); the prefix stays a true prefix, so ``SCAN gw:*`` and ACL patterns like ``~gw:*``
    cover everything the gateway writes.
    """
    return f"{prefix}:{{{name}}}:bucket", f"{prefix}:{{{name}}}:streams"


class RedisLimiter:
    def __init__(self, client: RedisClient, settings: RedisSettings,
                 breaker: RedisBreaker | None = None) -> None:
        self._client = client
        self._settings = settings
        self._own_breaker = breaker is None
        self._breaker = breaker if breaker is not None else RedisBreaker(client, settings)
        self._batch = RedisBatcher(client)
        self._take = client.register_script(_script("token_bucket.lua"))
        self._renew = client.register_script(_script("renew_leases.lua"))
        self._lease_ms = max(1, round(settings.lease_seconds * 1000))
        self._fallback = MemoryLimiter()
        # Lease ids: unique across processes (random instance id) and within one (a counter).
        self._instance = secrets.token_hex(6)
        self._ids = itertools.count()
        self._held: dict[str, set[str]] = {}  # streams set -> the leases this process holds
        # Leases whose stream ended while Redis was unreachable: removed when it answers again
        # (unless they expired meanwhile), so a blip does not hold slots for a whole lease.
        self._unreleased: dict[str, dict[str, float]] = {}  # streams set -> lease -> ended at
        self._renewer: asyncio.Task[None] | None = None
        self._reloading: asyncio.Future[Any] | None = None
        self.fallback_decisions = 0
        """Checks decided by the in-memory fallback (fail_open) while Redis was down."""
        self.refused_unavailable = 0
        """Requests refused with 503 (fail_closed) while Redis was down."""

    @property
    def backend_state(self) -> str:
        """``redis``; while Redis is down ``fallback`` (fail_open) or ``unavailable``
        (fail_closed)."""
        if self._breaker.up:
            return "redis"
        return "fallback" if self._settings.failure_policy == "fail_open" else "unavailable"

    @property
    def held_leases(self) -> int:
        return sum(len(leases) for leases in self._held.values())

    @property
    def outages(self) -> int:
        """Times Redis stopped answering since start-up."""
        return self._breaker.outages

    async def ping(self) -> None:
        """Ask Redis directly (readiness checks; a cluster's every primary). A failure opens the
        breaker like any other, but on a cluster, where it cannot say which shard failed: the
        requests find that out themselves."""
        try:
            await ping(self._client)
        except REDIS_ERRORS as exc:
            if self._settings.mode != "cluster":
                self._breaker.failed(exc)
            raise

    async def acquire(self, key: ClientKey, *, stream: bool) -> Decision:
        bucket, streams = key_names(self._settings.key_prefix, key.name)
        if self._breaker.up_for(bucket):
            lease = f"{self._instance}:{next(self._ids)}" if stream else ""
            try:
                # Cancelled on its way (the client left), a lease taken stays untracked and
                # unrenewed: it expires within lease_seconds.
                reply = await self._take_token(bucket, streams,
                                               repr(key.requests_per_minute / 60.0), key.burst,
                                               int(stream), key.max_concurrent_streams,
                                               self._lease_ms, lease)
            except REDIS_ERRORS as exc:
                self._breaker.failed(exc, bucket)
            else:
                allowed, remaining, reset_us, retry_us, refused_by = (int(v) for v in reply)
                if allowed and stream:
                    self._held.setdefault(streams, set()).add(lease)
                    self._start_renewing()
                return Decision(bool(allowed), limit=key.burst, remaining=remaining,
                                reset_seconds=reset_us / 1e6, retry_after=retry_us / 1e6,
                                refused_by=_REFUSED_BY[refused_by],
                                lease=lease if allowed and stream else None,
                                requests_per_minute=key.requests_per_minute)
        if self._settings.failure_policy == "fail_closed":
            self.refused_unavailable += 1
            raise ServiceUnavailable("Rate limiting is unavailable because the gateway cannot "
                                     "reach Redis (failure_policy = fail_closed); retry shortly",
                                     headers={"Retry-After": "1"})
        self.fallback_decisions += 1
        return await self._fallback.acquire(key, stream=stream)

    async def release(self, key: ClientKey, lease: str) -> None:
        streams = key_names(self._settings.key_prefix, key.name)[1]
        held = self._held.get(streams)
        if held is None or lease not in held:
            await self._fallback.release(key, lease)  # taken while Redis was down
            return
        held.discard(lease)
        if not held:
            del self._held[streams]
        if self._breaker.up_for(streams):
            try:
                await self._batch.execute("ZREM", streams, lease)
                return
            except REDIS_ERRORS as exc:
                self._breaker.failed(exc, streams)
        self._unreleased.setdefault(streams, {})[lease] = time.monotonic()

    async def _take_token(self, *keys_then_args: Any) -> Any:
        """token_bucket.lua through the batcher, loaded again once after NOSCRIPT."""
        try:
            return await self._batch.execute("EVALSHA", self._take.sha, 2, *keys_then_args)
        except NoScriptError:
            await self._reload_take()
            return await self._batch.execute("EVALSHA", self._take.sha, 2, *keys_then_args)

    async def _reload_take(self) -> None:
        """One SCRIPT LOAD, however many checks met NOSCRIPT together: a burst after a SCRIPT
        FLUSH must not cost a load (and a connection) per check. Not through the batcher: on a
        cluster it goes to every primary (a promoted replica has no scripts), which a pipeline
        cannot do."""
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.ensure_future(self._client.script_load(self._take.script))
        sha = await asyncio.shield(self._reloading)
        self._take.sha = sha.decode() if isinstance(sha, bytes) else sha

    def _start_renewing(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        interval = self._settings.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            if not (self._held or self._unreleased) or not self._breaker.up:
                continue
            try:
                lost = await self.renew_leases()
            except REDIS_ERRORS as exc:
                # On a cluster the renewals of all shards travel together: which one failed is
                # for the requests to find out (leases outlast a failover; the next round
                # retries).
                if self._settings.mode != "cluster":
                    self._breaker.failed(exc)
                continue
            if lost:
                # Their streams still run but no longer count (Redis lost the set, e.g. it
                # restarted without persistence): the cap is loose until they end.
                log.warning("%d concurrency leases were gone from Redis at renewal", lost)

    async def renew_leases(self) -> int:
        """Renew every held lease, and remove those released while Redis was down, in one
        pipeline (one round trip). Return how many held leases were gone from Redis: they are
        no longer renewed, and their release is then a no-op."""
        stale = time.monotonic() - self._settings.lease_seconds
        unreleased = [(streams, [lease for lease, ended in leases.items() if ended > stale])
                      for streams, leases in self._unreleased.items()]
        unreleased = [(streams, leases) for streams, leases in unreleased if leases]
        held = [(streams, sorted(leases)) for streams, leases in self._held.items() if leases]
        self._unreleased.clear()  # sent now or expired; put back below if Redis fails
        try:
            results = await self._renew_pipeline(unreleased, held)
            if any(isinstance(r, NoScriptError) for r in results):
                # SCRIPT FLUSH or a restart: load the script again and redo it (idempotent).
                self._renew.sha = await self._client.script_load(self._renew.script)
                results = await self._renew_pipeline(unreleased, held)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        except BaseException:
            now = time.monotonic()
            for streams, leases in unreleased:
                self._unreleased.setdefault(streams, {}).update(dict.fromkeys(leases, now))
            raise
        lost = 0
        for (streams, _), gone in zip(held, results[len(unreleased):], strict=True):
            still_held = self._held.get(streams)
            if still_held is None:
                continue
            for raw in cast(list[bytes], gone):
                lease = raw.decode()
                if lease in still_held:  # not just released while this call was on its way
                    still_held.discard(lease)
                    lost += 1
            if not still_held:
                del self._held[streams]
        return lost

    async def _renew_pipeline(self, unreleased: list[tuple[str, list[str]]],
                              held: list[tuple[str, list[str]]]) -> list[object]:
        pipe = self._client.pipeline(transaction=False)
        for streams, leases in unreleased:
            pipe.zrem(streams, *leases)
        for streams, leases in held:
            # Not pipe.evalsha: redis-py refuses that method in a cluster pipeline, but routes
            # the command by its key like any other.
            pipe.execute_command("EVALSHA", self._renew.sha, 1, streams, self._lease_ms, *leases)
        return await pipe.execute(raise_on_error=False)  # type: ignore[no-any-return]

    async def close(self) -> None:
        """Stop renewing and give back any lease still held (normally none: streams drained)."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        if self._held and self._breaker.up:
            pipe = self._client.pipeline(transaction=False)
            for streams, leases in self._held.items():
                pipe.zrem(streams, *leases)
            with contextlib.suppress(*REDIS_ERRORS):
                await pipe.execute()
        self._held.clear()
        self._unreleased.clear()
        await self._batch.close()
        if self._own_breaker:
            await self._breaker.close()
        await self._fallback.close()
