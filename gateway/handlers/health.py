"""Liveness, readiness and metrics: outside client-key auth (``middlewares.PUBLIC_PATHS``).

- ``GET /healthz``: the process answers (liveness; nothing else is checked).
- ``GET /readyz``: 200 when Redis (if configured) and the upstream are reachable, else 503; the
  body names each check's result, so an operator sees why. On a Redis Cluster with a primary
  down it is 200, its redis check saying ``degraded: 2 of 3 primaries answer ...`` (keys on
  those are served from Redis, the others' under the failure policy); 503 only when no primary
  answers.
- ``GET /metrics``: the Prometheus text format (``gateway.metrics``); with ``--workers`` any
  worker answers for all of them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from aiohttp import web

from ..appkeys import LIMITER, METRICS, SETTINGS, UPSTREAM, UPSTREAM_PROBE
from ..metrics import CONTENT_TYPE
from ..readiness import UpstreamProbe, limiter_state, redis_check
from ..tasks import cancel_and_wait

LOOP_LAG_SECONDS = 0.25
"""How often the event loop's lateness is sampled (``gateway_event_loop_lag_seconds``)."""
LIMITER_STATE_SECONDS = 2.0
"""How often each worker publishes its limiter's state to the metrics."""
_NO_STORE = {"Cache-Control": "no-store"}


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, headers=_NO_STORE)


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    checks: dict[str, str] = {}
    ready = True
    if app[SETTINGS].redis is None:
        checks["redis"] = "not configured"
    else:
        redis_ready, checks["redis"] = await redis_check(app[LIMITER])
        ready = ready and redis_ready
    problem = await app[UPSTREAM_PROBE].check(app[UPSTREAM])
    checks["upstream"] = problem or "ok"
    ready = ready and problem is None
    return web.json_response({"status": "ready" if ready else "not ready", "checks": checks},
                             status=200 if ready else 503, headers=_NO_STORE)


async def metrics(request: web.Request) -> web.Response:
    app = request.app
    m = app[METRICS]
    m.set_limiter_state(limiter_state(app[LIMITER]))
    # With several workers, rendering reads every worker's files: keep that off the loop.
    body = m.render() if m.multiprocess_dir is None else await asyncio.to_thread(m.render)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE, **_NO_STORE})


async def readiness_ctx(app: web.Application) -> AsyncIterator[None]:
    """The upstream probe, the task that keeps this worker's limiter state in the metrics (so
    /metrics on any worker shows every worker's state, not only its own), and the one that
    measures how late the worker's event loop runs."""
    probe = app[UPSTREAM_PROBE] = UpstreamProbe()
    tasks = [asyncio.create_task(_publish_limiter_state(app)),
             asyncio.create_task(_measure_loop_lag(app))]
    try:
        yield
    finally:
        await cancel_and_wait(*tasks)
        await probe.close()


async def _measure_loop_lag(app: web.Application) -> None:
    """Four samples a second of how late a timer runs: due at the loop's own clock (uvloop's is
    the time its turn began, so the turn so far counts as lag too), seen at ``time.monotonic``
    (the same clock, read now)."""
    loop = asyncio.get_running_loop()
    lag = app[METRICS].loop_lag
    while True:
        due = loop.time() + LOOP_LAG_SECONDS
        await asyncio.sleep(LOOP_LAG_SECONDS)
        lag.observe(max(time.monotonic() - due, 0.0))


async def _publish_limiter_state(app: web.Application) -> None:
    m = app[METRICS]
    while True:
        m.set_limiter_state(limiter_state(app[LIMITER]))
        await asyncio.sleep(LIMITER_STATE_SECONDS)
