"""The app factory: it only wires settings, shared state, middlewares, cleanup contexts, routes."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence

from aiohttp import web

from .appkeys import (
    AUTH_FAILURES,
    IN_FLIGHT,
    KEYSTORE,
    LIMITER,
    METRICS,
    MODEL_CATALOG,
    PROXY,
    RECORDS,
    SETTINGS,
    UPSTREAM_SOCKETS,
    UPSTREAMS,
)
from .auth import AuthFailureThrottle, ConfigKeyStore
from .catalog import ModelCatalog
from .handlers import chat, health, images, models, responses, socket, stored, vision
from .inflight import InFlight
from .log_filters import http_server_log
from .metrics import Metrics
from .middleware import CHAIN
from .monitoring import monitoring_ctx
from .ratelimit.memory import MemoryLimiter
from .ratelimit.redis import RedisLimiter
from .records.memory import MemoryRecords
from .records.redis import RedisRecords
from .redis.keystore import RedisKeyStore
from .redis.lifecycle import open_redis
from .settings import Settings, UpstreamEntry
from .stream.proxy import Proxy
from .upstream.client import UpstreamClient
from .upstream.sockets import SocketUpstreams, UpstreamSockets
from .upstream.upstreams import UpstreamSet

log = logging.getLogger("gateway")

API_PREFIXES = ("/api/v1", "/v1")


def create_app(settings: Settings, environ: Mapping[str, str] | None = None) -> web.Application:
    """Build the gateway. ``environ`` is where the upstream key's variable is read (at start-up,
    never at import); tests pass their own."""
    app = web.Application(
        middlewares=CHAIN,
        client_max_size=settings.stream.max_body_bytes,
        handler_args={"logger": http_server_log()},  # aiohttp's own errors, without credentials
    )
    app[SETTINGS] = settings
    app[IN_FLIGHT] = InFlight()
    app[KEYSTORE] = ConfigKeyStore(settings)
    app[AUTH_FAILURES] = AuthFailureThrottle(settings.server.auth_failures_per_minute)
    app[MODEL_CATALOG] = ModelCatalog(settings.models)
    app[METRICS] = Metrics()
    env = os.environ if environ is None else environ
    app.cleanup_ctx.append(lambda a: _upstream_ctx(a, env))
    app.cleanup_ctx.append(_limiter_ctx)
    app.cleanup_ctx.append(monitoring_ctx)
    app.on_shutdown.append(_drain_streams)

    for prefix in API_PREFIXES:
        app.router.add_post(f"{prefix}/chat/completions", chat.chat_completions)
        app.router.add_get(f"{prefix}/models", models.list_models)
        app.router.add_get(f"{prefix}/models/{{model:.+}}", models.get_model)  # ids may hold "/"
        app.router.add_post(f"{prefix}/responses", responses.create_response)
        app.router.add_get(f"{prefix}/responses", socket.responses_socket)  # WebSocket mode
        stored_one = f"{prefix}/responses/{{response_id}}"
        app.router.add_get(stored_one, stored.retrieve)
        app.router.add_delete(stored_one, stored.delete)
        app.router.add_get(f"{stored_one}/input_items", stored.input_items)
        app.router.add_post(f"{stored_one}/cancel", stored.cancel)
        app.router.add_post(f"{prefix}/images/generate", images.generate_images)
        app.router.add_post(f"{prefix}/images/generations", images.generate_images)
        app.router.add_post(f"{prefix}/vision/analyze", vision.analyze)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/metrics", health.metrics)
    return app


async def _upstream_ctx(app: web.Application, environ: Mapping[str, str]
                        ) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if settings.uses_mock:
        # Imported here: a gateway with a real upstream never loads the mock.
        from .mock.upstream import run_mock_upstream

        async with run_mock_upstream() as (_, url):
            log.warning("upstream: the built-in mock at %s (set [upstream] url for a real one)",
                        url)
            entry = dataclasses.replace(settings.upstream_entries[0], url=url)
            async with _upstreams(app, [(entry, "mock-upstream-key")]):
                yield
    else:
        async with _upstreams(app, [(entry, entry.key(environ))
                                    for entry in settings.upstream_entries]):
            yield


@contextlib.asynccontextmanager
async def _upstreams(app: web.Application, entries: Sequence[tuple[UpstreamEntry, str]]
                     ) -> AsyncIterator[None]:
    """The app's upstreams, a client each (url and key), open for the app's whole life."""
    settings = app[SETTINGS]
    upstreams = UpstreamSet(settings, [(entry, UpstreamClient(settings, entry.url, key))
                                       for entry, key in entries], app[METRICS])
    await upstreams.start()
    app[UPSTREAMS] = upstreams
    app[PROXY] = Proxy(upstreams, settings, app[IN_FLIGHT], app[METRICS])
    sockets = app[UPSTREAM_SOCKETS] = SocketUpstreams(upstreams, {
        entry.name: UpstreamSockets(entry.url, key, settings.stream, upstreams.secrets)
        for entry, key in entries})
    try:
        yield
    finally:
        await sockets.close()
        await upstreams.close()


async def _limiter_ctx(app: web.Application) -> AsyncIterator[None]:
    """The limiter and the response records, and with Redis the app's one Redis client, the
    key store and the records in Redis."""
    redis_settings = app[SETTINGS].redis
    retention = app[SETTINGS].responses.retention_seconds
    if redis_settings is None:
        memory = MemoryLimiter()
        app[LIMITER] = memory
        app[RECORDS] = MemoryRecords(retention)
        yield
        await memory.close()
        await app[RECORDS].close()
        return
    async with open_redis(redis_settings) as (client, breaker):
        keystore = RedisKeyStore(app[KEYSTORE], client, redis_settings, breaker)
        limiter = RedisLimiter(client, redis_settings, breaker)
        records = RedisRecords(client, redis_settings.key_prefix, retention, breaker)
        app[KEYSTORE] = keystore
        app[LIMITER] = limiter
        app[RECORDS] = records
        try:
            yield
        finally:
            await records.close()
            await limiter.close()
            await keystore.close()


async def _drain_streams(app: web.Application) -> None:
    await app[IN_FLIGHT].drain(app[SETTINGS].server.drain_seconds)
