"""A client that leaves cancels the upstream request at once and releases all it held."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from conftest import KEY, Upstream, settings_for
from gateway.appkeys import STREAMS

AUTH = {"Authorization": f"Bearer {KEY}"}


def body(**mock: Any) -> dict[str, Any]:
    return {"model": "grok-4", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "mock": mock}


async def wait_for(predicate: Any, timeout: float) -> float:
    """Seconds until ``predicate()`` held; fails the test after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


@pytest.mark.parametrize("mock, read_events", [
    ({"headers_delay": 30}, 0),  # before the upstream answered at all
    ({"first_token_delay": 30}, 0),  # upstream answered, model still thinking
    ({"chunks": 1000, "chunk_delay": 0.05}, 3),  # mid-stream
    ({"pause_after": 2, "pause": 30}, 2),  # during a long silence
])
async def test_disconnect_cancels_the_upstream_within_a_second(
        mock_upstream: Upstream, start_gateway: Any, mock: dict[str, Any], read_events: int
) -> None:
    settings = settings_for(mock_upstream.url, stream={"keepalive_seconds": 0.2},
                            limits={"max_concurrent_streams": 1},
                            keys=[{"name": "alice", "key": KEY, "max_concurrent_streams": 1}])
    app, base = await start_gateway(settings)
    tasks_before = len(asyncio.all_tasks())
    session = aiohttp.ClientSession()
    response = await session.post(f"{base}/api/v1/chat/completions", headers=AUTH,
                                  json=body(**mock))
    assert response.status == 200
    for _ in range(read_events):
        line = await response.content.readuntil(b"\n\n")
        assert line.startswith(b"data: ") or line.startswith(b": keep-alive")
    await wait_for(lambda: len(app[STREAMS]) == 1, 2)
    left = time.monotonic()
    response.close()  # the client goes away
    await session.close()

    await wait_for(lambda: mock_upstream.state.disconnects == 1, 1.0)
    assert mock_upstream.state.last_disconnect - left < 1.0
    await wait_for(lambda: len(app[STREAMS]) == 0, 1.0)
    await wait_for(lambda: len(asyncio.all_tasks()) <= tasks_before, 1.0)
    # The key's only stream slot came back: a new stream is admitted and completes.
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/api/v1/chat/completions", headers=AUTH, json=body()) as r:
            assert r.status == 200
            assert (await r.read()).endswith(b"data: [DONE]\n\n")
