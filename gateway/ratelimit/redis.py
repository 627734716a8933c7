"""The Redis limiter: each key's limits hold exactly across every process sharing one Redis.

One check is one call of ``token_bucket.lua`` (one round trip, atomic, Redis ``TIME`` as the
clock; on a cluster, on the primary that holds the key's slot): it checks the key's concurrency
cap, then takes a token, and for a stream adds a lease to the key's streams set. Checks issued
at the same moment share their round trip (see ``RedisBatcher``). The scripts are package data
registered with ``register_script`` and run by SHA; after ``NOSCRIPT`` (a ``SCRIPT FLUSH``, a
Redis restart, a promoted replica) they are loaded again, at the cost of one extra round trip,
once.

Leases: a stream's lease expires ``lease_seconds`` after it was last renewed. One background task
per limiter renews every lease this process holds every ``lease_seconds / 3``, through the
batcher (one pipeline per primary on a cluster: a shard that is down costs only its own
renewals); ``release`` removes a lease the moment its stream ends. A process that dies
(``kill -9``) stops renewing, and its slots come back within ``lease_seconds``.

No check is sent twice by redis-py (see ``gateway.redis.topology.connect``): a plain check whose
reply was lost counts as failed (the failure policy; its token may be spent). A stream's check
is sent once more after a lost connection: it names its lease, and ``token_bucket.lua`` admits
a lease already in the set without taking a second token.

When Redis does not answer (see ``gateway.redis.batcher``), ``failure_policy`` decides:
``fail_open`` limits with a per-process ``MemoryLimiter`` until Redis is back, ``fail_closed``
refuses with 503.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from importlib.resources import files
from typing import Any, cast

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from ..errors import ServiceUnavailable
from ..redis.batcher import RedisBatcher, RedisBreaker, redis_health
from ..redis.topology import REDIS_ERRORS, RedisClient, node_of
from ..request_info import ClientKey
from ..settings import RedisSettings
from ..tasks import cancel_and_wait
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
        # (script, cluster primary) -> its latest SCRIPT LOAD: (its number, the load)
        self._reloading: dict[tuple[str, str | None], tuple[int, asyncio.Future[Any]]] = {}
        self._loads = 0  # SCRIPT LOADs started: a command notes it when it is sent
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

    @property
    def partly_up(self) -> bool:
        """On a cluster: some primaries are down, the others serve their keys."""
        return self._breaker.partly_up

    async def ping(self) -> str | None:
        """Ask Redis directly (readiness checks): None when every primary answers; on a cluster
        with some down, a note saying how many answer; raises when none does. A failure opens
        the breaker (``RedisBreaker.failed_somewhere``)."""
        try:
            return await redis_health(self._client)
        except REDIS_ERRORS as exc:
            self._breaker.failed_somewhere(exc)
            raise

    async def acquire(self, key: ClientKey, *, stream: bool) -> Decision:
        bucket, streams = key_names(self._settings.key_prefix, key.name)
        if self._breaker.up_for(bucket):
            lease = f"{self._instance}:{next(self._ids)}" if stream else ""
            try:
                # Cancelled on its way (the client left), a lease taken stays untracked and
                # unrenewed: it expires within lease_seconds.
                args = (bucket, streams, repr(key.requests_per_minute / 60.0), key.burst,
                        int(stream), key.max_concurrent_streams, self._lease_ms, lease)
                try:
                    reply = await self._take_token(*args)
                except RedisConnectionError:
                    if not stream:
                        raise  # it may have run: never sent twice
                    # The lease id makes a stream's check idempotent: sent again, it is
                    # admitted on its own lease if the first one ran (a reply lost).
                    reply = await self._take_token(*args)
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
        sent = self._loads
        try:
            return await self._batch.execute("EVALSHA", self._take.sha, 2, *keys_then_args)
        except NoScriptError:
            await self._reload(self._take, keys_then_args[0], sent)
            return await self._batch.execute("EVALSHA", self._take.sha, 2, *keys_then_args)

    async def _reload(self, script: Any, key: str, sent: int) -> None:
        """One SCRIPT LOAD per script (and cluster primary), however many commands met NOSCRIPT
        together: a burst after a SCRIPT FLUSH must not cost a load (and a connection) per
        check. A command sent when ``_loads`` was ``sent`` is served by a load still running
        or one started after it was sent: a batch that was on the wire while the load ran
        meets NOSCRIPT, its replies perhaps read only after the load has finished, and must
        not load again. Not through the batcher; on a cluster, on the primary of ``key`` only
        (a promoted replica has no scripts; another primary may be down)."""
        node = node_of(self._client, key)
        number, loading = self._reloading.get((script.script, node), (0, None))
        if loading is None or (loading.done() and number <= sent):
            self._loads += 1
            loading = asyncio.ensure_future(self._load(script.script, node))
            self._reloading[(script.script, node)] = (self._loads, loading)
        sha = await asyncio.shield(loading)
        script.sha = sha.decode() if isinstance(sha, bytes) else sha

    async def _load(self, script: str, node: str | None) -> Any:
        if node is None or not isinstance(self._client, RedisCluster):
            return await self._client.script_load(script)
        return await self._client.execute_command(
            "SCRIPT LOAD", script, target_nodes=self._client.get_node(node_name=node))

    def _start_renewing(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        interval = self._settings.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            if not (self._held or self._unreleased):
                continue
            lost = await self.renew_leases()
            if lost:
                # Their streams still run but no longer count (Redis lost the set, e.g. it
                # restarted without persistence): the cap is loose until they end.
                log.warning("%d concurrency leases were gone from Redis at renewal", lost)

    async def renew_leases(self) -> int:
        """Renew every held lease, and remove those released while Redis was down, each key's
        in one command, all through the batcher (one pipeline per primary). Keys whose primary
        is down are skipped, and each failure is reported to the breaker for its key only.
        Return how many held leases were gone from Redis: they are no longer renewed, and their
        release is then a no-op."""
        stale = time.monotonic() - self._settings.lease_seconds
        unreleased = {streams: {lease: ended for lease, ended in leases.items() if ended > stale}
                      for streams, leases in self._unreleased.items()}
        self._unreleased = {streams: leases for streams, leases in unreleased.items()
                            if leases and not self._breaker.up_for(streams)}
        to_remove = [(streams, leases) for streams, leases in unreleased.items()
                     if leases and streams not in self._unreleased]
        held = [(streams, sorted(leases)) for streams, leases in self._held.items()
                if leases and self._breaker.up_for(streams)]
        removed, renewed = await asyncio.gather(
            asyncio.gather(*(self._batch.execute("ZREM", streams, *leases)
                             for streams, leases in to_remove), return_exceptions=True),
            asyncio.gather(*(self._renew_one(streams, leases) for streams, leases in held),
                           return_exceptions=True))
        for (streams, leases), result in zip(to_remove, removed, strict=True):
            if isinstance(result, BaseException):
                self._failed(result, streams)
                self._unreleased.setdefault(streams, {}).update(leases)
        lost = 0
        for (streams, _), gone in zip(held, renewed, strict=True):
            if isinstance(gone, BaseException):
                self._failed(gone, streams)  # the next round retries; leases outlast it
                continue
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

    def _failed(self, exc: BaseException, key: str) -> None:
        if not isinstance(exc, REDIS_ERRORS):
            raise exc
        self._breaker.failed(exc, key)

    async def _renew_one(self, streams: str, leases: list[str]) -> Any:
        """renew_leases.lua for one key, loaded again once after NOSCRIPT (it is idempotent).
        EVALSHA as a plain command: redis-py refuses pipe.evalsha in a cluster pipeline."""
        command = ("EVALSHA", self._renew.sha, 1, streams, self._lease_ms, *leases)
        sent = self._loads
        try:
            return await self._batch.execute(*command)
        except NoScriptError:
            await self._reload(self._renew, streams, sent)
            return await self._batch.execute("EVALSHA", self._renew.sha, *command[2:])

    async def close(self) -> None:
        """Stop renewing and give back any lease still held (normally none: streams drained)."""
        await cancel_and_wait(self._renewer)
        self._renewer = None
        held = [(streams, leases) for streams, leases in self._held.items()
                if leases and self._breaker.up_for(streams)]
        await asyncio.gather(*(self._batch.execute("ZREM", streams, *leases)
                               for streams, leases in held), return_exceptions=True)
        self._held.clear()
        self._unreleased.clear()
        await self._batch.close()
        if self._own_breaker:
            await self._breaker.close()
        await self._fallback.close()
