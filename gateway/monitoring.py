"""What each worker keeps running beside its requests: the upstream probe for ``/readyz``; the
task that keeps this worker's limiter state in the metrics (so ``/metrics`` on any worker shows
every worker's state, not only its own); the one that measures how late the worker's event loop
runs; and, with keys in Redis, the one that ends the open streams of revoked keys. One cleanup
context opens and stops them all."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from .appkeys import IN_FLIGHT, KEYSTORE, LIMITER, METRICS, SETTINGS, UPSTREAM_PROBE
from .readiness import UpstreamProbe
from .tasks import cancel_and_wait

log = logging.getLogger("gateway")

LOOP_LAG_SECONDS = 0.25
"""How often the event loop's lateness is sampled (``gateway_event_loop_lag_seconds``)."""
LIMITER_STATE_SECONDS = 2.0
"""How often each worker publishes its limiter's state to the metrics."""
MIN_REVOCATION_SECONDS = 0.1
"""The shortest period between two revocation checks, for ``key_cache_seconds = 0`` (no cache):
a check asks Redis one ``HMGET`` while streams are open, and must not ask it without pause."""


async def monitoring_ctx(app: web.Application) -> AsyncIterator[None]:
    probe = app[UPSTREAM_PROBE] = UpstreamProbe()
    tasks = [asyncio.create_task(_publish_limiter_state(app)),
             asyncio.create_task(_measure_loop_lag(app))]
    redis = app[SETTINGS].redis
    if redis is not None:  # keys in the config file cannot be revoked at run time
        period = max(redis.key_cache_seconds, MIN_REVOCATION_SECONDS)
        tasks.append(asyncio.create_task(_end_revoked_streams(app, period)))
    try:
        yield
    finally:
        await cancel_and_wait(*tasks)
        await probe.close()


async def _measure_loop_lag(app: web.Application) -> None:
    """Samples of how late a timer runs: due at the loop's own clock (uvloop's is the time its
    turn began, so the turn so far counts as lag too), seen at ``time.monotonic`` (the same
    clock, read now)."""
    loop = asyncio.get_running_loop()
    lag = app[METRICS].loop_lag
    while True:
        due = loop.time() + LOOP_LAG_SECONDS
        await asyncio.sleep(LOOP_LAG_SECONDS)
        lag.observe(max(time.monotonic() - due, 0.0))


async def _publish_limiter_state(app: web.Application) -> None:
    m = app[METRICS]
    while True:
        m.set_limiter_state(app[LIMITER].backend_state)
        await asyncio.sleep(LIMITER_STATE_SECONDS)


async def _end_revoked_streams(app: web.Application, period: float) -> None:
    """Every ``period`` (the key cache's, so a revoked key's streams end within the time its
    new requests take to be refused): the open streams of revoked keys end
    (``InFlight.end_revoked``)."""
    in_flight = app[IN_FLIGHT]
    while True:
        await asyncio.sleep(period)
        try:
            await in_flight.end_revoked(app[KEYSTORE])
        except Exception:  # a bug: logged, and the next turn tries again
            log.exception("checking the open streams' keys for revocation failed")
