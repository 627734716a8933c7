"""Shared fixtures: real servers on loopback ports, real clients.

- ``mock_upstream``: the project's mock xAI server (``gateway.mock.upstream``) on a free port;
  ``mocks``: two of them, named ``a`` and ``b`` (several upstreams).
- ``start_gateway(settings)``: the gateway app served for real (``GatewayRunner`` + TCPSite, as
  ``gateway serve`` runs it: handler cancellation, ``[server]`` timeouts and connection cap) on a
  free port.
- ``redis_url``: a Redis database of the test's own on the machine's server, with a unique key
  prefix; everything under the prefix is deleted afterwards (nothing else is touched).
"""

from __future__ import annotations

import contextlib
import gc
import os
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.mock.upstream import MOCK_STATE, MockState, run_mock_upstream
from gateway.schema import settings_from
from gateway.server.limits import GatewayRunner
from gateway.settings import Settings

KEY = "sk-test-alice-000000000001"
OTHER_KEY = "sk-test-bob-00000000000002"
REDIS_URL = os.environ.get("GATEWAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


class Upstream:
    def __init__(self, app: web.Application, url: str) -> None:
        self.app = app
        self.url = url

    @property
    def state(self) -> MockState:
        return self.app[MOCK_STATE]


@pytest.fixture(autouse=True, scope="module")
def settled_heap() -> None:
    """Each test module starts with the heap so far collected and frozen (``gc.freeze``), so the
    collector scans only what the module itself makes.

    Why: aiohttp keeps the applications it served in a cache (its middleware chain, up to 1,024
    entries), so in one test process every test's gateway app stays alive, and the heap grows
    test after test. A full collection of it paused the event loop that hosts a test's gateway
    and mock upstream for up to half a second (measured in a whole-suite run), longer than the
    tight timeouts some tests set: a warm-up request then timed out. A gateway process serves
    one app; this is the test process's own affair.
    """
    gc.collect()
    gc.freeze()


@pytest.fixture
async def mock_upstream() -> AsyncIterator[Upstream]:
    async with run_mock_upstream() as (app, url):
        yield Upstream(app, url)


@pytest.fixture
async def mocks() -> AsyncIterator[dict[str, Upstream]]:
    """Two mock upstreams, named ``a`` and ``b`` (a named mock starts its default text with
    its name): for several upstreams (``tests/test_upstreams*.py``)."""
    async with run_mock_upstream(name="a") as (app_a, url_a), \
            run_mock_upstream(name="b") as (app_b, url_b):
        yield {"a": Upstream(app_a, url_a), "b": Upstream(app_b, url_b)}


def settings_for(upstream_url: str, **sections: Any) -> Settings:
    """Settings for a test: the given upstream, two keys, generous limits, short keep-alive."""
    data: dict[str, Any] = {
        "upstream": {"url": upstream_url, "api_key": "xai-operator-secret-key", "max_retries": 0},
        "limits": {"requests_per_minute": 6000, "burst": 1000, "max_concurrent_streams": 100},
        "keys": [{"name": "alice", "key": KEY}, {"name": "bob", "key": OTHER_KEY}],
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name] = {**data[name], **value}
        else:
            data[name] = value
    return settings_from(data)


@contextlib.asynccontextmanager
async def serve_gateway(settings: Settings) -> AsyncIterator[tuple[web.Application, str]]:
    app = create_app(settings, environ={})
    runner = GatewayRunner(app, settings.server)  # as `gateway serve` wires it
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield app, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def start_gateway() -> AsyncIterator[Callable[..., Any]]:
    """``app, base = await start_gateway(settings)``: served until the test ends."""
    stack = contextlib.AsyncExitStack()

    async def start(settings: Settings) -> tuple[web.Application, str]:
        return await stack.enter_async_context(serve_gateway(settings))

    async with stack:
        yield start


@pytest.fixture
async def gateway(mock_upstream: Upstream, start_gateway: Callable[..., Any]
                  ) -> tuple[web.Application, str]:
    """The gateway with default test settings in front of the mock upstream."""
    return await start_gateway(settings_for(mock_upstream.url))  # type: ignore[no-any-return]


@pytest.fixture
def redis_prefix() -> str:
    return f"gwtest:{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def redis_url(redis_prefix: str) -> AsyncIterator[str]:
    """The shared Redis; the test's keys go under ``redis_prefix`` and are removed after."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as e:  # pragma: no cover - CI starts Redis
        pytest.fail(f"Redis at {REDIS_URL} is not reachable: {e}")
    yield REDIS_URL
    keys = [k async for k in client.scan_iter(match=f"{redis_prefix}*", count=500)]
    if keys:
        await client.delete(*keys)
    await client.aclose()
