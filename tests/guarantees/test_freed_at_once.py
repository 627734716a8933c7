"""What a request builds is freed the moment it ends, by reference counting: no reference cycle
keeps a stream, its request or the upstream's answer alive for the garbage collector.

A cycle per request makes every object hanging off it wait for a collection, and those
collections are a share of a short stream's CPU worth saving (``scripts/bench.py``; the
figures are in ``docs/performance.md``).
Each way a request ends is tried: a stream that completes, one ended by the upstream's error
event or by its broken connection, one whose client leaves, one the upstream refuses, a plain
answer, a request refused by auth or by the rate limit, a Responses stream.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from gateway.appkeys import IN_FLIGHT
from gateway.request_info import RequestInfo
from gateway.stream.client_stream import ClientStream
from gateway.stream.relay import StreamRelay
from gateway.stream.render import StreamRenderer
from gateway.stream.watchdog import Watchdog

from clients import AUTH, chat_body
from conftest import KEY, Upstream, settings_for
from observe import wait_until

ROUTE = "/api/v1/chat/completions"
GATEWAY_TYPES = (StreamRelay, StreamRenderer, ClientStream, Watchdog, RequestInfo)
"""The gateway's own per-request objects: any of them in a cycle's garbage means a cycle of
the gateway's (the test's client and the mock upstream make objects of other types)."""


@contextlib.contextmanager
def cycles_left() -> Iterator[collections.Counter[str]]:
    """Counts, by type, the gateway's objects that only the garbage collector could free."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds is kept in gc.garbage, to look at
    found: collections.Counter[str] = collections.Counter()
    try:
        yield found
        gc.collect()
        found.update(type(o).__name__ for o in gc.garbage if isinstance(o, GATEWAY_TYPES))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


async def post(session: aiohttp.ClientSession, base: str, body: dict[str, Any],
               path: str = ROUTE, **kw: Any) -> int:
    async with session.post(f"{base}{path}", json=body, **kw) as response:
        await response.read()
        return response.status


@pytest.mark.parametrize("body, status", [
    (chat_body(stream=True, chunks=3), 200),
    (chat_body(stream=True, chunks=3, error_after=1), 200),
    (chat_body(stream=True, chunks=3, disconnect_after=1), 200),
    (chat_body(stream=True, status=503), 503),
    (chat_body(stream=False), 200),
    ({"model": "grok-4", "input": "hi", "stream": True}, 200),
], ids=["completed", "upstream_error_event", "upstream_disconnect", "upstream_refuses",
        "plain", "responses_stream"])
async def test_a_finished_request_leaves_no_cycle(mock_upstream: Upstream, start_gateway: Any,
                                                  body: dict[str, Any], status: int) -> None:
    app, base = await start_gateway(settings_for(mock_upstream.url))
    path = "/api/v1/responses" if "input" in body else ROUTE
    async with aiohttp.ClientSession(headers=AUTH) as session:
        await post(session, base, body, path)  # first-time work (pools, caches) out of the way
        with cycles_left() as found:
            for _ in range(5):
                assert await post(session, base, body, path) == status
            await wait_until(lambda: not app[IN_FLIGHT], 2, "the streams ended")
    assert not found, f"left in reference cycles: {dict(found)}"


async def test_refused_requests_leave_no_cycle(mock_upstream: Upstream,
                                               start_gateway: Any) -> None:
    settings = settings_for(mock_upstream.url,
                            keys=[{"name": "alice", "key": KEY, "burst": 1,
                                   "requests_per_minute": 1}])
    app, base = await start_gateway(settings)
    async with aiohttp.ClientSession() as session:
        assert await post(session, base, chat_body(stream=True), headers=AUTH) == 200
        with cycles_left() as found:
            for _ in range(5):
                assert await post(session, base, chat_body(stream=True), headers=AUTH) == 429
                assert await post(session, base, chat_body(stream=True),
                                  headers={"Authorization": "Bearer sk-nobody"}) == 401
    assert not found, f"left in reference cycles: {dict(found)}"


async def test_a_stream_whose_client_leaves_leaves_no_cycle(mock_upstream: Upstream,
                                                            start_gateway: Any) -> None:
    app, base = await start_gateway(settings_for(mock_upstream.url))
    with cycles_left() as found:
        for _ in range(5):
            session = aiohttp.ClientSession(headers=AUTH)
            response = await session.post(f"{base}{ROUTE}", json=chat_body(
                stream=True, chunks=1000, chunk_delay=0.02))
            await response.content.readuntil(b"\n\n")
            response.close()  # the client goes away mid-stream
            await session.close()
            await wait_until(lambda: not app[IN_FLIGHT], 2, "the stream ended")
        await asyncio.sleep(0.05)  # the upstream connection's close
    assert not found, f"left in reference cycles: {dict(found)}"
