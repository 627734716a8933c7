"""The in-process limiter: the embedded default, and the fallback when Redis is unreachable.

Same semantics as the Redis backend, with ``time.monotonic`` as the clock. Leases need no
expiry here: they live and die with the process, and the middleware releases each one in a
shielded ``finally``. Idle buckets are dropped once they would be full again, as Redis expires
them, so memory follows the keys in use rather than every key ever seen.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from ..request_info import ClientKey
from . import Decision
from .budget import Allowance, BudgetBook

_SWEEP_EVERY = 4096
"""Checks between two sweeps for idle buckets."""


class MemoryLimiter:
    backend_state = "memory"
    partly_up = False

    async def ping(self) -> None:
        """Nothing to reach: the buckets are this process's own."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._wall_clock = wall_clock  # token and spend limits count UTC days and months
        self._budgets = BudgetBook()
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)
        self._full_at: dict[str, float] = {}  # name -> when its bucket is full again
        self._streams: dict[str, set[str]] = {}
        self._ids = itertools.count()
        self._checks = 0

    async def acquire(self, key: ClientKey, *, stream: bool) -> Decision:
        now = self._clock()
        self._checks += 1
        if self._checks % _SWEEP_EVERY == 0:
            self._sweep(now)
        rate = key.requests_per_minute / 60.0
        capacity = float(key.burst)
        tokens, at = self._buckets.get(key.name, (capacity, now))
        tokens = min(capacity, tokens + max(0.0, now - at) * rate)
        open_streams = self._streams.get(key.name, set())
        # Refusals leave the state alone: refilling is a function of time alone.
        if stream and len(open_streams) >= key.max_concurrent_streams:
            return Decision(False, key.burst, int(tokens), (capacity - tokens) / rate,
                            retry_after=1.0, refused_by="concurrency",
                            requests_per_minute=key.requests_per_minute)
        if tokens < 1.0:
            return Decision(False, key.burst, 0, (capacity - tokens) / rate,
                            retry_after=(1.0 - tokens) / rate, refused_by="requests",
                            requests_per_minute=key.requests_per_minute)
        tokens -= 1.0
        self._buckets[key.name] = (tokens, now)
        self._full_at[key.name] = now + (capacity - tokens) / rate
        lease = None
        if stream:
            lease = f"m{next(self._ids)}"
            self._streams.setdefault(key.name, set()).add(lease)
        return Decision(True, key.burst, int(tokens), (capacity - tokens) / rate, lease=lease,
                        requests_per_minute=key.requests_per_minute)

    async def release(self, key: ClientKey, lease: str) -> None:
        leases = self._streams.get(key.name)
        if leases is not None:
            leases.discard(lease)
            if not leases:
                del self._streams[key.name]

    async def reserve(self, key: ClientKey, tokens: int, ticks: int) -> Allowance:
        assert key.budget is not None
        return self._budgets.reserve(key.name, key.budget, tokens, ticks, self._wall_clock())

    async def settle(self, key: ClientKey, taken: Allowance, tokens: int, ticks: int
                     ) -> Allowance:
        assert key.budget is not None
        return self._budgets.settle(key.name, key.budget, tokens, ticks, self._wall_clock(),
                                    taken)

    def _sweep(self, now: float) -> None:
        """Forget buckets that are full again: a missing bucket is a full one."""
        for name in [n for n, full_at in self._full_at.items() if full_at <= now]:
            del self._full_at[name]
            self._buckets.pop(name, None)

    async def close(self) -> None:
        self._buckets.clear()
        self._full_at.clear()
        self._streams.clear()
        self._budgets.clear()
