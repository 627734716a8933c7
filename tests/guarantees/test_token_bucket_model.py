"""Both limiter backends against one simple reference model of the token bucket (hypothesis
state machines).

The model (``BucketModel``) is the specification in a few lines of exact arithmetic: a bucket
starts full at ``burst`` tokens and refills at ``requests_per_minute / 60`` a second up to
``burst``; a request takes one token or is refused when less than one is left, and a refusal
changes nothing; a stream also takes one of ``max_concurrent_streams`` slots, checked first, and
gives it back when released (releasing twice is harmless). Every decision is compared with it:
admitted or not, by which limit, the whole tokens left, and the retry and reset times.

- ``MemoryLimiter`` runs on a clock the machine moves, in steps of 1/8 s with rates of whole or
  half tokens a second, so every float the backend computes is exact and the comparison is too.
- ``RedisLimiter`` takes its time from Redis ``TIME``, which no test can move: its machine uses
  a refill so slow (one token a day) that the few seconds of a run add far less than a token,
  which makes admissions, refusals, the tokens left and the leases exact. Its refill is then
  checked on its own, in real time: each admitted request's bucket in Redis says when Redis
  took the token, and the model, moved to that moment, must agree; a refused one must lie
  between the model at Redis ``TIME`` just before and just after.

Each machine uses Redis keys under the test's own prefix; nothing else is touched.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from fractions import Fraction
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from gateway.ratelimit import Decision
from gateway.ratelimit.memory import MemoryLimiter
from gateway.ratelimit.redis import RedisLimiter, key_names
from gateway.redis.topology import connect
from gateway.request_info import ClientKey
from gateway.settings import RedisSettings


class BucketModel:
    """One key's bucket and stream slots, in exact arithmetic."""

    def __init__(self, key: ClientKey) -> None:
        self.rate = Fraction(key.requests_per_minute) / 60
        self.burst = key.burst
        self.max_streams = key.max_concurrent_streams
        self.tokens = Fraction(key.burst)
        self.at: Fraction | None = None
        self.leases: set[str] = set()

    def tokens_at(self, now: Fraction) -> Fraction:
        if self.at is None:
            return Fraction(self.burst)
        return min(Fraction(self.burst), self.tokens + max(Fraction(0), now - self.at) * self.rate)

    def acquire(self, now: Fraction, stream: bool) -> Decision:
        """The decision the specification asks for (no lease id: the backend makes those)."""
        tokens = self.tokens_at(now)
        reset = float((self.burst - tokens) / self.rate)
        if stream and len(self.leases) >= self.max_streams:
            return Decision(False, self.burst, math.floor(tokens), reset, retry_after=1.0,
                            refused_by="concurrency")
        if tokens < 1:
            return Decision(False, self.burst, 0, reset,
                            retry_after=float((1 - tokens) / self.rate), refused_by="requests")
        self.tokens, self.at = tokens - 1, now
        return Decision(True, self.burst, math.floor(tokens - 1),
                        float((self.burst - tokens + 1) / self.rate))


def assert_agrees(got: Decision, want: Decision, stream: bool, rel: float = 1e-9) -> None:
    assert (got.allowed, got.refused_by, got.remaining, got.limit) == \
        (want.allowed, want.refused_by, want.remaining, want.limit), (got, want)
    assert got.reset_seconds == pytest.approx(want.reset_seconds, rel=rel, abs=1e-6)
    assert got.retry_after == pytest.approx(want.retry_after, rel=rel, abs=1e-6)
    assert (got.lease is not None) == (got.allowed and stream)


KEYS = st.builds(
    lambda rpm, burst, streams: (rpm, burst, streams),
    st.sampled_from([30.0, 60.0, 120.0, 600.0]),  # 0.5, 1, 2, 10 tokens a second: exact
    st.integers(1, 6), st.integers(1, 3))


class LimiterMachine(RuleBasedStateMachine):
    """Rules shared by both backends: acquire, release, release again."""

    limiter: Any  # MemoryLimiter or RedisLimiter

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[ClientKey] = []
        self.models: list[BucketModel] = []
        self.held: list[tuple[int, str]] = []  # (key index, lease)
        self.released: list[tuple[int, str]] = []

    def now(self) -> Fraction:
        raise NotImplementedError

    def limiter_call(self, call: Any) -> Any:
        raise NotImplementedError

    def add_keys(self, specs: list[tuple[float, int, int]], tag: str) -> None:
        for i, (rpm, burst, streams) in enumerate(specs):
            key = ClientKey(name=f"{tag}-{i}", requests_per_minute=rpm, burst=burst,
                            max_concurrent_streams=streams)
            self.keys.append(key)
            self.models.append(BucketModel(key))

    @rule(which=st.integers(0, 1), stream=st.booleans())
    def acquire(self, which: int, stream: bool) -> None:
        key, model = self.keys[which], self.models[which]
        got = self.limiter_call(self.limiter.acquire(key, stream=stream))
        want = model.acquire(self.now(), stream)
        self.check(got, want, stream)
        if got.lease is not None:
            model.leases.add(got.lease)
            self.held.append((which, got.lease))

    def check(self, got: Decision, want: Decision, stream: bool) -> None:
        assert_agrees(got, want, stream)

    @precondition(lambda self: self.held)
    @rule(pick=st.integers(0, 1000))
    def release(self, pick: int) -> None:
        which, lease = self.held.pop(pick % len(self.held))
        self.limiter_call(self.limiter.release(self.keys[which], lease))
        self.models[which].leases.discard(lease)
        self.released.append((which, lease))

    @precondition(lambda self: self.released)
    @rule(pick=st.integers(0, 1000))
    def release_again(self, pick: int) -> None:
        which, lease = self.released[pick % len(self.released)]
        self.limiter_call(self.limiter.release(self.keys[which], lease))

    @invariant()
    def slots_within_the_cap(self) -> None:
        for model in self.models:
            assert len(model.leases) <= model.max_streams


class MemoryLimiterMachine(LimiterMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Fraction(1000)
        self.limiter = MemoryLimiter(clock=lambda: float(self.clock))

    def now(self) -> Fraction:
        return self.clock

    def limiter_call(self, call: Any) -> Any:
        # MemoryLimiter never awaits anything: drive the coroutine by hand, no loop needed.
        try:
            call.send(None)
        except StopIteration as done:
            return done.value
        raise AssertionError("MemoryLimiter suspended")

    @initialize(specs=st.lists(KEYS, min_size=2, max_size=2))
    def two_keys(self, specs: list[tuple[float, int, int]]) -> None:
        self.add_keys(specs, "memory")

    @rule(eighths=st.integers(0, 40))
    def time_passes(self, eighths: int) -> None:
        self.clock += Fraction(eighths, 8)


def test_the_memory_bucket_follows_the_model() -> None:
    run_state_machine_as_test(MemoryLimiterMachine, settings=settings(
        max_examples=150, stateful_step_count=40, deadline=None))


SLOW_RPM = 1 / 1440  # one token a day: a run's few seconds refill < 0.001 of a token
_machines = itertools.count()


class RedisLimiterMachine(LimiterMachine):
    """The Redis backend on the machine's Redis, keys under the test's prefix."""

    url = ""
    prefix = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.settings = RedisSettings(url=self.url, key_prefix=f"{self.prefix}:m{next(_machines)}",
                                      timeout_seconds=2.0, lease_seconds=30)
        self.client = self.loop.run_until_complete(self._connect())
        self.limiter = RedisLimiter(self.client, self.settings)
        self.raw = aioredis.Redis.from_url(self.url)

    async def _connect(self) -> aioredis.Redis:
        return connect(self.settings)

    def now(self) -> Fraction:
        return Fraction(0)  # refill is negligible at SLOW_RPM: time does not matter

    def limiter_call(self, call: Any) -> Any:
        return self.loop.run_until_complete(call)

    def check(self, got: Decision, want: Decision, stream: bool) -> None:
        # Exact but for the retry and reset times, which the refill of a few seconds moves by
        # far less than this tolerance.
        assert_agrees(got, want, stream, rel=1e-4)

    @initialize(bursts=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 3)),
                                min_size=2, max_size=2))
    def two_keys(self, bursts: list[tuple[int, int]]) -> None:
        self.add_keys([(SLOW_RPM, burst, streams) for burst, streams in bursts], "redis")

    @invariant()
    def redis_holds_exactly_the_open_leases(self) -> None:
        for key, model in zip(self.keys, self.models, strict=True):
            _, streams = key_names(self.settings.key_prefix, key.name)
            held: Any = self.loop.run_until_complete(self.raw.zrange(streams, 0, -1))
            assert {lease.decode() for lease in held} == model.leases

    def teardown(self) -> None:
        async def close() -> None:
            await self.limiter.close()
            await self.client.aclose()
            await self.raw.aclose()
        self.loop.run_until_complete(close())
        self.loop.close()


def test_the_redis_bucket_follows_the_model(redis_url: str, redis_prefix: str) -> None:
    RedisLimiterMachine.url, RedisLimiterMachine.prefix = redis_url, redis_prefix
    run_state_machine_as_test(RedisLimiterMachine, settings=settings(
        max_examples=40, stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))


async def test_the_redis_bucket_refills_as_the_model_says_in_real_time(
        redis_url: str, redis_prefix: str) -> None:
    """A random walk of requests and short sleeps at 20 tokens a second, burst 3."""
    settings_ = RedisSettings(url=redis_url, key_prefix=redis_prefix, timeout_seconds=2.0)
    client = connect(settings_)
    limiter = RedisLimiter(client, settings_)
    raw = aioredis.Redis.from_url(redis_url)
    key = ClientKey(name="refill", requests_per_minute=1200, burst=3, max_concurrent_streams=1)
    bucket, _ = key_names(redis_prefix, key.name)
    model = BucketModel(key)
    rng = random.Random(3)

    async def redis_now() -> Fraction:
        seconds, micros = await raw.time()
        return Fraction(seconds) + Fraction(micros, 1_000_000)

    try:
        admitted = refused = 0
        deadline = time.monotonic() + 10
        for _ in range(60):
            assert time.monotonic() < deadline
            await asyncio.sleep(rng.choice([0, 0, 0.01, 0.03, 0.06]))
            before = await redis_now()
            got = await limiter.acquire(key, stream=False)
            after = await redis_now()
            if got.allowed:
                admitted += 1
                state: Any = await raw.hmget(bucket, ["tokens", "at"])
                tokens, at = state
                taken_at = Fraction(float(at)) / 1_000_000  # when Redis took it
                assert before <= taken_at <= after
                want = model.acquire(taken_at, stream=False)
                assert want.allowed and got.remaining == want.remaining, (got, want)
                assert float(tokens) == pytest.approx(float(model.tokens), abs=1e-9)
            else:
                refused += 1  # Redis decided at some moment between before and after
                assert model.tokens_at(before) < 1, "refused though a token was there"
                assert got.remaining == 0 and got.refused_by == "requests"
                low, high = ((1 - model.tokens_at(t)) / model.rate for t in (after, before))
                assert float(low) - 1e-6 <= got.retry_after <= float(high) + 1e-6
        assert admitted and refused  # the walk saw both sides of the bucket
    finally:
        await limiter.close()
        await client.aclose()
        await raw.aclose()
