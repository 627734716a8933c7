"""Is the gateway ready to serve? The checks behind ``/readyz`` and the limiter-state metric:
the upstream probe and the limiter's view of Redis. No aiohttp application state here (the
handlers in ``gateway/handlers/health.py`` and ``gateway/monitoring.py`` hold that), so
``appkeys`` can name these types without an import cycle.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from .errors import GatewayError
from .ratelimit import Limiter
from .tasks import cancel_and_wait
from .upstream.client import UpstreamClient
from .upstream.http1 import InvalidHTTP

log = logging.getLogger("gateway.health")

PROBE_TTL_SECONDS = 5.0
"""How long one upstream probe's answer is reused by /readyz."""
PROBE_TIMEOUT_SECONDS = 2.0
_MAX_PROBE_ANSWER = 1024 * 1024


async def redis_check(limiter: Limiter) -> tuple[bool, str]:
    """(whether Redis lets the gateway serve, what the readiness check says about it).

    The limiter's state is how the hot path sees Redis: its circuit breaker opens on the first
    failed call and closes when a ping succeeds. Redis is asked directly as well. On a cluster
    with some primaries down the gateway is ready, and degraded: keys on the primaries that
    answer are served from Redis, the others under the failure policy (``ping()`` names how
    many answer); it is not ready when none answers.
    """
    state = limiter.backend_state
    if state not in ("redis", "fallback", "unavailable"):
        return False, f"not in use (rate limits: {state})"
    if state != "redis" and not limiter.partly_up:
        return False, f"unreachable (rate limits: {state})"
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
            note = await limiter.ping()
    except Exception as e:  # any failure means "not ready"; the kind is the reason
        return False, f"unreachable ({type(e).__name__})"
    return True, note or "ok"


class UpstreamProbe:
    """Is an upstream reachable? One cheap ``GET models``, its answer reused for ``ttl``
    seconds, and shared by every /readyz request that arrives while it runs; one of each per
    upstream client."""

    def __init__(self, ttl: float = PROBE_TTL_SECONDS, timeout: float = PROBE_TIMEOUT_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._timeout = timeout
        self._clock = clock
        # By client: (when, problem) of the last probe, and the probe running now.
        self._answers: dict[UpstreamClient, tuple[float, str | None]] = {}
        self._running: dict[UpstreamClient, asyncio.Task[str | None]] = {}

    async def check(self, client: UpstreamClient) -> str | None:
        """None when the upstream answered the last probe, else what went wrong."""
        answer = self._answers.get(client)
        if answer is not None and self._clock() - answer[0] < self._ttl:
            return answer[1]
        running = self._running.get(client)
        if running is None:
            running = self._running[client] = asyncio.create_task(self._probe(client))
        # Shielded: a /readyz client that leaves does not cancel the probe the others share.
        return await asyncio.shield(running)

    async def _probe(self, client: UpstreamClient) -> str | None:
        problem: str | None
        try:
            async with asyncio.timeout(self._timeout):
                response = await client.request("GET", "models")
                try:
                    # Read (so the connection goes back to the pool), but only so much: a
                    # bigger list is cut off and its connection closed.
                    await response.read(_MAX_PROBE_ANSWER)
                finally:
                    response.release()
            problem = None if response.status < 400 else f"HTTP {response.status}"
        except TimeoutError:
            problem = f"no answer within {self._timeout:g}s"
        except GatewayError as e:
            problem = e.code
        except (OSError, InvalidHTTP) as e:
            problem = f"unreachable ({type(e).__name__})"
        self._answers[client] = (self._clock(), problem)
        self._running.pop(client, None)
        if problem is not None:
            log.warning("readiness: upstream %s", problem)
        return problem

    async def close(self) -> None:
        await cancel_and_wait(*self._running.values())
        self._running.clear()
