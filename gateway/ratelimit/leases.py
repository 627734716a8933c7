"""The stream leases this process holds in Redis: renewed while their streams run, removed the
moment a stream ends, and, when Redis did not answer a removal, removed once it answers again.

A stream's lease (a member of its key's streams set, scored by when it expires) expires
``lease_seconds`` after it was last renewed. One background task per limiter renews every lease
this process holds every ``lease_seconds / 3``, through the batcher (one pipeline per primary on
a cluster: a shard that is down costs only its own renewals); ``release`` removes a lease the
moment its stream ends. A process that dies (``kill -9``) stops renewing, and its slots come
back within ``lease_seconds``.

A lease whose stream ended while Redis was unreachable is remembered and removed when Redis
answers again (unless it expired meanwhile), so that a blip does not hold a slot for a whole
lease.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from typing import cast

from ..redis.batcher import RedisBatcher
from ..redis.breaker import RedisBreaker
from ..redis.topology import REDIS_ERRORS
from ..tasks import cancel_and_wait
from .scripts import LimiterScripts

log = logging.getLogger("gateway.ratelimit")


class HeldLeases:
    """``new_id()``, ``hold``, ``release``; ``renew()`` runs by itself while any is held."""

    def __init__(self, batch: RedisBatcher, breaker: RedisBreaker, scripts: LimiterScripts,
                 lease_seconds: float) -> None:
        self._batch = batch
        self._breaker = breaker
        self._scripts = scripts
        self._lease_seconds = lease_seconds
        self.lease_ms = max(1, round(lease_seconds * 1000))
        """A lease's life in Redis, in the scripts' unit."""
        # Lease ids: unique across processes (random instance id) and within one (a counter).
        self._instance = secrets.token_hex(6)
        self._ids = itertools.count()
        self._held: dict[str, set[str]] = {}  # streams set -> the leases this process holds
        self._unreleased: dict[str, dict[str, float]] = {}  # streams set -> lease -> ended at
        self._renewer: asyncio.Task[None] | None = None

    @property
    def count(self) -> int:
        return sum(len(leases) for leases in self._held.values())

    def new_id(self) -> str:
        return f"{self._instance}:{next(self._ids)}"

    def hold(self, streams: str, lease: str) -> None:
        """Redis admitted ``lease`` into ``streams``: renew it until it is released."""
        self._held.setdefault(streams, set()).add(lease)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def release(self, streams: str, lease: str) -> bool:
        """Remove ``lease`` from Redis, or remember it for when Redis answers again; False when
        this process does not hold it (it was taken while Redis was down)."""
        held = self._held.get(streams)
        if held is None or lease not in held:
            return False
        held.discard(lease)
        if not held:
            del self._held[streams]
        if self._breaker.up_for(streams):
            try:
                await self._batch.execute("ZREM", streams, lease)
                return True
            except REDIS_ERRORS as exc:
                self._breaker.failed(exc, streams)
        self._unreleased.setdefault(streams, {})[lease] = time.monotonic()
        return True

    async def _renew_forever(self) -> None:
        interval = self._lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            if not (self._held or self._unreleased):
                continue
            lost = await self.renew()
            if lost:
                # Their streams still run but no longer count (Redis lost the set, e.g. it
                # restarted without persistence): the cap is loose until they end.
                log.warning("%d concurrency leases were gone from Redis at renewal", lost)

    async def renew(self) -> int:
        """Renew every held lease, and remove those released while Redis was down, each key's
        in one command, all through the batcher (one pipeline per primary). Keys whose primary
        is down are skipped, and each failure is reported to the breaker for its key only.
        Return how many held leases were gone from Redis: they are no longer renewed, and their
        release is then a no-op."""
        stale = time.monotonic() - self._lease_seconds
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
            asyncio.gather(*(self._scripts.renew(streams, self.lease_ms, leases)
                             for streams, leases in held), return_exceptions=True))
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
