"""Liveness, readiness and metrics: outside client-key auth (``middlewares.PUBLIC_PATHS``).

- ``GET /healthz``: the process answers (liveness; nothing else is checked).
- ``GET /readyz``: 200 when Redis (if configured) and the upstream are reachable, else 503; the
  body names each check's result, so an operator sees why.
- ``GET /metrics``: the Prometheus text format (``gateway.metrics``); with ``--workers`` any
  worker answers for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from ..appkeys import LIMITER, METRICS, SETTINGS, UPSTREAM, UPSTREAM_PROBE
from ..errors import GatewayError
from ..http1 import InvalidHTTP
from ..metrics import CONTENT_TYPE
from ..upstream import UpstreamClient

log = logging.getLogger("gateway.health")

PROBE_TTL_SECONDS = 5.0
"""How long one upstream probe's answer is reused by /readyz."""
PROBE_TIMEOUT_SECONDS = 2.0
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
        problem = await _redis_problem(app[LIMITER])
        checks["redis"] = problem or "ok"
        ready = ready and problem is None
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


def limiter_state(limiter: Any) -> str:
    """``Limiter.backend_state``: redis, fallback, unavailable or memory."""
    state = getattr(limiter, "backend_state", None)
    return state if isinstance(state, str) else "memory"


async def _redis_problem(limiter: Any) -> str | None:
    """Why Redis counts as unreachable, or None.

    The limiter's state is how the hot path sees Redis: its circuit breaker opens on the first
    failed call and closes when a ping succeeds. If the limiter also offers ``ping()``, Redis
    is asked directly as well.
    """
    state = limiter_state(limiter)
    if state in ("fallback", "unavailable"):
        return f"unreachable (rate limits: {state})"
    if state != "redis":
        return f"not in use (rate limits: {state})"
    ping = getattr(limiter, "ping", None)
    if callable(ping):
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
                await ping()
        except Exception as e:  # any failure means "not ready"; the kind is the reason
            return f"unreachable ({type(e).__name__})"
    return None


class UpstreamProbe:
    """Is the upstream reachable? One cheap ``GET models``, its answer reused for ``ttl``
    seconds, and shared by every /readyz request that arrives while it runs."""

    def __init__(self, ttl: float = PROBE_TTL_SECONDS, timeout: float = PROBE_TIMEOUT_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._timeout = timeout
        self._clock = clock
        self._answer: tuple[float, str | None] | None = None  # (when, problem)
        self._running: asyncio.Task[str | None] | None = None

    async def check(self, client: UpstreamClient) -> str | None:
        """None when the upstream answered the last probe, else what went wrong."""
        if self._answer is not None and self._clock() - self._answer[0] < self._ttl:
            return self._answer[1]
        if self._running is None:
            self._running = asyncio.create_task(self._probe(client))
        # Shielded: a /readyz client that leaves does not cancel the probe the others share.
        return await asyncio.shield(self._running)

    async def _probe(self, client: UpstreamClient) -> str | None:
        problem: str | None
        try:
            async with asyncio.timeout(self._timeout):
                response = await client.request("GET", "models")
                try:
                    await response.read()  # read, so the connection goes back to the pool
                finally:
                    response.release()
            problem = None if response.status < 400 else f"HTTP {response.status}"
        except TimeoutError:
            problem = f"no answer within {self._timeout:g}s"
        except GatewayError as e:
            problem = e.code
        except (OSError, InvalidHTTP) as e:
            problem = f"unreachable ({type(e).__name__})"
        self._answer = (self._clock(), problem)
        self._running = None
        if problem is not None:
            log.warning("readiness: upstream %s", problem)
        return problem

    async def close(self) -> None:
        if self._running is not None:
            self._running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._running
            self._running = None


async def readiness_ctx(app: web.Application) -> AsyncIterator[None]:
    """The upstream probe, and the task that keeps this worker's limiter state in the metrics
    (so /metrics on any worker shows every worker's state, not only its own)."""
    probe = app[UPSTREAM_PROBE] = UpstreamProbe()
    watcher = asyncio.create_task(_publish_limiter_state(app))
    try:
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await probe.close()


async def _publish_limiter_state(app: web.Application) -> None:
    m = app[METRICS]
    while True:
        m.set_limiter_state(limiter_state(app[LIMITER]))
        await asyncio.sleep(LIMITER_STATE_SECONDS)
