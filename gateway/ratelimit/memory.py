"""The in-process limiter: the embedded default, and the fallback when Redis is unreachable.

Same semantics as the Redis backend, with ``time.monotonic`` as the clock.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from ..context import ClientKey
from . import Decision


class MemoryLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)
        self._streams: dict[str, set[str]] = {}
        self._ids = itertools.count()

    async def acquire(self, key: ClientKey, *, stream: bool) -> Decision:
        now = self._clock()
        rate = key.requests_per_minute / 60.0
        capacity = float(key.burst)
        tokens, at = self._buckets.get(key.name, (capacity, now))
        tokens = min(capacity, tokens + max(0.0, now - at) * rate)
        open_streams = self._streams.get(key.name, set())
        base = dict(limit=key.burst, requests_per_minute=key.requests_per_minute)
        if stream and len(open_streams) >= key.max_concurrent_streams:
            self._buckets[key.name] = (tokens, now)
            return Decision(False, remaining=int(tokens), reset_seconds=(capacity - tokens) / rate,
                            retry_after=1.0, refused_by="concurrency", **base)
        if tokens < 1.0:
            self._buckets[key.name] = (tokens, now)
            return Decision(False, remaining=0, reset_seconds=(capacity - tokens) / rate,
                            retry_after=(1.0 - tokens) / rate, refused_by="requests", **base)
        tokens -= 1.0
        self._buckets[key.name] = (tokens, now)
        lease = None
        if stream:
            lease = f"m{next(self._ids)}"
            self._streams.setdefault(key.name, set()).add(lease)
        return Decision(True, remaining=int(tokens), reset_seconds=(capacity - tokens) / rate,
                        lease=lease, **base)

    async def release(self, key: ClientKey, lease: str) -> None:
        leases = self._streams.get(key.name)
        if leases is not None:
            leases.discard(lease)
            if not leases:
                del self._streams[key.name]

    async def close(self) -> None:
        self._buckets.clear()
        self._streams.clear()
