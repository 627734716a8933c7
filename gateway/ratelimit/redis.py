"""The Redis limiter: each key's limits hold exactly across every process sharing one Redis.

One check is one call of ``token_bucket.lua`` (one round trip, atomic, Redis ``TIME`` as the
clock; on a cluster, on the primary that holds the key's slot): it checks the key's concurrency
cap, then takes a token, and for a stream adds a lease to the key's streams set. Checks issued
at the same moment share their round trip (see ``RedisBatcher``). The scripts, and their reload
after ``NOSCRIPT``: ``scripts``; the leases, renewed while their streams run: ``leases``.

No check is sent twice by redis-py (see ``gateway.redis.topology.connect``): a plain check whose
reply was lost counts as failed (the failure policy; its token may be spent). A stream's check
is sent once more after a lost connection: it names its lease, and ``token_bucket.lua`` admits
a lease already in the set without taking a second token.

When Redis does not answer (see ``gateway.redis.breaker``), ``failure_policy`` decides:
``fail_open`` limits with a per-process ``MemoryLimiter`` until Redis is back, ``fail_closed``
refuses with 503.
"""

from __future__ import annotations

from redis.exceptions import ConnectionError as RedisConnectionError

from ..errors import ServiceUnavailable
from ..redis.batcher import RedisBatcher
from ..redis.breaker import RedisBreaker
from ..redis.lifecycle import redis_health
from ..redis.topology import REDIS_ERRORS, RedisClient
from ..request_info import ClientKey
from ..settings import RedisSettings
from . import Decision
from .budget import Allowance, day_and_month, ticks, usd
from .leases import HeldLeases
from .memory import MemoryLimiter
from .scripts import LimiterScripts

_REFUSED_BY = ("", "requests", "concurrency")


def key_names(prefix: str, name: str) -> tuple[str, str]:
    """A client key's bucket and streams set.

    The key name is their hash tag, so both sit in one Redis Cluster slot (a script may touch
    only one); the prefix stays a true prefix, so ``SCAN gw:*`` and ACL patterns like ``~gw:*``
    cover everything the gateway writes.
    """
    return f"{prefix}:{{{name}}}:bucket", f"{prefix}:{{{name}}}:streams"


def budget_key(prefix: str, name: str) -> str:
    """A client key's token and spend counts (``budget.lua``), in the slot of its bucket."""
    return f"{prefix}:{{{name}}}:budget"


async def spend_of(client: RedisClient, prefix: str, names: list[str]
                   ) -> list[tuple[float, float]]:
    """Each key's spend today and this month (UTC days of Redis time), in USD: ``keys list``."""
    seconds, _ = await client.time()
    day, month, _, _ = day_and_month(seconds)
    spent = []
    for name in names:
        at_day, today, at_month, this_month = await client.hmget(
            budget_key(prefix, name), "day", "day_usd", "mon", "mon_usd")
        spent.append((usd(int(float(today or 0))) if at_day and int(at_day) == day else 0.0,
                      usd(int(float(this_month or 0))) if at_month and int(at_month) == month
                      else 0.0))
    return spent


class RedisLimiter:
    def __init__(self, client: RedisClient, settings: RedisSettings,
                 breaker: RedisBreaker | None = None) -> None:
        self._client = client
        self._settings = settings
        self._own_breaker = breaker is None
        self._breaker = breaker if breaker is not None else RedisBreaker(client, settings)
        self._batch = RedisBatcher(client)
        self._scripts = LimiterScripts(client, self._batch)
        self._leases = HeldLeases(self._batch, self._breaker, self._scripts,
                                  settings.lease_seconds)
        self._fallback = MemoryLimiter()
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
        return self._leases.count

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
            lease = self._leases.new_id() if stream else ""
            try:
                # Cancelled on its way (the client left), a lease taken stays untracked and
                # unrenewed: it expires within lease_seconds.
                args = (repr(key.requests_per_minute / 60.0), key.burst, int(stream),
                        key.max_concurrent_streams, self._leases.lease_ms, lease)
                try:
                    reply = await self._scripts.take_token(bucket, streams, *args)
                except RedisConnectionError:
                    if not stream:
                        raise  # it may have run: never sent twice
                    # The lease id makes a stream's check idempotent: sent again, it is
                    # admitted on its own lease if the first one ran (a reply lost).
                    reply = await self._scripts.take_token(bucket, streams, *args)
            except REDIS_ERRORS as exc:
                self._breaker.failed(exc, bucket)
            else:
                allowed, remaining, reset_us, retry_us, refused_by = (int(v) for v in reply)
                if allowed and stream:
                    self._leases.hold(streams, lease)
                return Decision(bool(allowed), limit=key.burst, remaining=remaining,
                                reset_seconds=reset_us / 1e6, retry_after=retry_us / 1e6,
                                refused_by=_REFUSED_BY[refused_by],
                                lease=lease if allowed and stream else None,
                                requests_per_minute=key.requests_per_minute)
        self._without_redis("Rate limiting is")
        return await self._fallback.acquire(key, stream=stream)

    async def reserve(self, key: ClientKey, tokens: int, ticks_: int) -> Allowance:
        return await self._budget(key, "reserve", tokens, ticks_, None)

    async def settle(self, key: ClientKey, taken: Allowance, tokens: int, ticks_: int
                     ) -> Allowance:
        return await self._budget(key, "settle", tokens, ticks_, taken)

    async def _budget(self, key: ClientKey, mode: str, tokens: int, ticks_: int,
                      taken: Allowance | None) -> Allowance:
        """One budget.lua call, never sent twice (a reservation whose reply was lost may have
        been taken); while Redis is down, the failure policy decides a reservation, as for a
        token. A reservation is settled where it was taken: one the fallback took, there;
        one Redis took, in Redis or not at all (its worst case stands)."""
        budget = key.budget
        assert budget is not None
        if taken is not None and taken.local:  # taken while Redis was down: settled here
            return await self._fallback.settle(key, taken, tokens, ticks_)
        name = budget_key(self._settings.key_prefix, key.name)
        if self._breaker.up_for(name):
            try:
                reply = await self._scripts.budget(
                    name, mode, budget.tokens_per_minute, budget.tokens_per_day,
                    ticks(budget.usd_per_day), ticks(budget.usd_per_month), tokens, ticks_,
                    -1 if taken is None else taken.day, -1 if taken is None else taken.month)
            except REDIS_ERRORS as exc:
                self._breaker.failed(exc, name)
            else:
                return Allowance.from_reply(reply)
        if taken is not None:  # taken in Redis: a settlement anywhere else would be wrong
            raise ServiceUnavailable("Redis does not answer: the reservation stands")
        self._without_redis("Token limits are")
        return await self._fallback.reserve(key, tokens, ticks_)

    def _without_redis(self, what: str) -> None:
        """Redis does not answer: ``fail_closed`` refuses (503), ``fail_open`` goes on with
        the in-process fallback, counted."""
        if self._settings.failure_policy == "fail_closed":
            self.refused_unavailable += 1
            raise ServiceUnavailable(f"{what} unavailable because the gateway cannot reach "
                                     "Redis (failure_policy = fail_closed); retry shortly",
                                     headers={"Retry-After": "1"})
        self.fallback_decisions += 1

    async def release(self, key: ClientKey, lease: str) -> None:
        streams = key_names(self._settings.key_prefix, key.name)[1]
        if not await self._leases.release(streams, lease):
            await self._fallback.release(key, lease)  # taken while Redis was down

    async def renew_leases(self) -> int:
        """Renew every held lease now (``HeldLeases.renew``); how many were gone from Redis."""
        return await self._leases.renew()

    async def close(self) -> None:
        """Stop renewing and give back any lease still held (normally none: streams drained)."""
        await self._leases.close()
        await self._batch.close()
        if self._own_breaker:
            await self._breaker.close()
        await self._fallback.close()
