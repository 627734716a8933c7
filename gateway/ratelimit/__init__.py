"""Rate limiting: a token bucket per key (one token per request; a whole stream is one request)
and a cap on each key's simultaneous streams, held as leases.

Backends share this interface and one behavioural test suite: ``MemoryLimiter`` (one process,
the embedded default and the fail-open fallback) and ``RedisLimiter`` (exact across processes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from ..errors import RateLimited
from ..request_info import ClientKey
from .budget import Allowance, openai_duration


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int  # the bucket's capacity (burst)
    remaining: int  # whole tokens left after this request
    reset_seconds: float  # until the bucket is full again
    retry_after: float = 0.0  # when refused: seconds until a retry can succeed
    refused_by: str = ""  # "requests" | "concurrency" when refused
    lease: str | None = None  # the concurrency lease a stream holds, to release at its end
    requests_per_minute: float = 0.0

    def refusal(self, key: ClientKey) -> RateLimited:
        """The 429 of a refused check, saying which limit and when to retry (its headers: the
        caller's, ``headers``)."""
        retry = max(1, math.ceil(self.retry_after))
        if self.refused_by == "concurrency":
            return RateLimited(f"Concurrency limit reached: this key may hold "
                               f"{_count(key.max_concurrent_streams, 'open stream')} at a "
                               f"time; retry in {retry}s or when one ends",
                               code="concurrency_limit_exceeded")
        return RateLimited(f"Rate limit reached: this key may send "
                           f"{_count(key.burst, 'request')} in a row, then "
                           f"{_rate(key.requests_per_minute)} a minute; retry in {retry}s")

    def headers(self) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers and the IETF ``RateLimit`` fields."""
        window = max(1, round(self.limit / self.requests_per_minute * 60)) \
            if self.requests_per_minute else 60
        reset = max(0, math.ceil(self.reset_seconds))
        headers = {
            "x-ratelimit-limit-requests": str(self.limit),
            "x-ratelimit-remaining-requests": str(self.remaining),
            "x-ratelimit-reset-requests": openai_duration(self.reset_seconds),
            "RateLimit-Policy": f'"requests";q={self.limit};w={window}',
            "RateLimit": f'"requests";r={self.remaining};t={reset}',
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
            headers["retry-after-ms"] = str(max(1, math.ceil(self.retry_after * 1000)))
        return headers


def _rate(per_minute: float) -> str:
    """1000000 as "1,000,000", 0.5 as "0.5": never "1e+06"."""
    return f"{per_minute:,.0f}" if per_minute == int(per_minute) else f"{per_minute:,.6g}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class Limiter(Protocol):
    @property
    def backend_state(self) -> str:
        """``memory``; or ``redis``, and while Redis is unreachable ``fallback`` (fail_open,
        per-process buckets) or ``unavailable`` (fail_closed). For metrics and readiness."""

    @property
    def partly_up(self) -> bool:
        """On a Redis Cluster: some primaries are down, the others serve their keys."""

    async def ping(self) -> str | None:
        """Ask the backend directly (readiness): None when all of it answers, a note when only
        part of it does; raises when none does."""

    async def acquire(self, key: ClientKey, *, stream: bool) -> Decision:
        """Take one token (and, for a stream, a concurrency lease) or refuse."""

    async def release(self, key: ClientKey, lease: str) -> None:
        """Give back a stream's lease: the stream ended, failed or its client left."""

    async def reserve(self, key: ClientKey, tokens: int, ticks: int) -> Allowance:
        """Take a request's worst case from the key's token and spend limits (``key.budget``),
        all of it or none (``gateway/ratelimit/budget.py``)."""

    async def settle(self, key: ClientKey, taken: Allowance, tokens: int, ticks: int
                     ) -> Allowance:
        """Add the truth minus the reservation (negative: a refund) to what ``taken`` took."""

    async def close(self) -> None:
        """Release connections and background tasks."""
