"""What each worker keeps running beside its requests, for ``/readyz`` and ``/metrics``: the
upstream probe, the task that keeps this worker's limiter state in the metrics (so ``/metrics``
on any worker shows every worker's state, not only its own), and the one that measures how late
the worker's event loop runs. One cleanup context opens and stops them all."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from aiohttp import web

from .appkeys import LIMITER, METRICS, UPSTREAM_PROBE
from .readiness import UpstreamProbe
from .tasks import cancel_and_wait

LOOP_LAG_SECONDS = 0.25
"""How often the event loop's lateness is sampled (``gateway_event_loop_lag_seconds``)."""
LIMITER_STATE_SECONDS = 2.0
"""How often each worker publishes its limiter's state to the metrics."""


async def monitoring_ctx(app: web.Application) -> AsyncIterator[None]:
    probe = app[UPSTREAM_PROBE] = UpstreamProbe()
    tasks = [asyncio.create_task(_publish_limiter_state(app)),
             asyncio.create_task(_measure_loop_lag(app))]
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
