"""Liveness, readiness and metrics: outside client-key auth (``PUBLIC_PATHS`` in
``gateway/middleware/auth.py``).

- ``GET /healthz``: the process answers (liveness; nothing else is checked).
- ``GET /readyz``: 200 when Redis (if configured) and the upstream are reachable, else 503; the
  body names each check's result, so an operator sees why. With several upstreams it is ready
  while one of them is available and reachable, and ``upstreams`` gives each one's state by
  name (``ok``, ``resting``, ``ejected``, ``trial``, ``full``, or why its probe failed); never
  a URL. On a Redis Cluster with a primary
  down it is 200, its redis check saying ``degraded: 2 of 3 primaries answer ...`` (keys on
  those are served from Redis, the others' under the failure policy); 503 only when no primary
  answers.
- ``GET /metrics``: the Prometheus text format (``gateway.metrics``), for the addresses in
  ``[server] metrics_allow`` only (403 for others); with ``--workers`` any worker answers for
  all of them.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from ..addresses import allowed, networks
from ..appkeys import LIMITER, METRICS, SETTINGS, UPSTREAM_PROBE, UPSTREAMS
from ..errors import PermissionDenied
from ..metrics import CONTENT_TYPE
from ..readiness import redis_check
from ..request_info import REQUEST_INFO

_NO_STORE = {"Cache-Control": "no-store"}
_SERVING = {"ok", "trial", "full"}  # the states in which an upstream takes requests


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
    upstreams, probe = app[UPSTREAMS], app[UPSTREAM_PROBE]
    body: dict[str, object] = {"checks": checks}
    if upstreams.only is not None:
        problem = await probe.check(upstreams.only)
    else:
        problems = await asyncio.gather(*(probe.check(m.client) for m in upstreams.members))
        states = {name: state if problem is None else problem
                  for (name, state), problem in zip(upstreams.states().items(), problems,
                                                    strict=True)}
        problem = None if _SERVING & set(states.values()) else "none available"
        # The upstreams' names are the operator's: only for [server] metrics_allow.
        if allowed(request[REQUEST_INFO].client_ip,
                   networks(app[SETTINGS].server.metrics_allow)):
            body["upstreams"] = states
    checks["upstream"] = problem or "ok"
    ready = ready and problem is None
    return web.json_response({"status": "ready" if ready else "not ready", **body},
                             status=200 if ready else 503, headers=_NO_STORE)


async def metrics(request: web.Request) -> web.Response:
    """Key names and per-key usage: only for ``[server] metrics_allow`` (by default this host
    alone), judged by the address ``X-Forwarded-For`` gives when a trusted proxy sends it."""
    app = request.app
    if not allowed(request[REQUEST_INFO].client_ip, networks(app[SETTINGS].server.metrics_allow)):
        raise PermissionDenied("/metrics is served only to the addresses in [server] "
                               "metrics_allow", code="metrics_not_allowed")
    m = app[METRICS]
    m.set_limiter_state(app[LIMITER].backend_state)
    # With several workers, rendering reads every worker's files: keep that off the loop.
    body = m.render() if m.multiprocess_dir is None else await asyncio.to_thread(m.render)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE, **_NO_STORE})
