"""A client that leaves, at any moment, cancels the upstream request at once and gives back all
the request held: the gateway's stream, the upstream connection, its tasks and the key's
concurrency slot. The access-log line says ``client_disconnect`` and the metric counts it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import aiohttp
import pytest

from gateway.appkeys import IN_FLIGHT

from clients import AUTH, chat_body, scrape, value
from conftest import KEY, Upstream, settings_for
from observe import Baseline, access_lines, assert_released, wait_until

ROUTE = "/api/v1/chat/completions"


@pytest.mark.parametrize("mock, read_events", [
    ({"headers_delay": 30}, 0),  # before the upstream answered at all
    ({"first_token_delay": 30}, 0),  # upstream answered, model still thinking
    ({"chunks": 1000, "chunk_delay": 0.05}, 3),  # mid-stream
    ({"pause_after": 2, "pause": 30}, 2),  # during a long silence
], ids=["before_the_upstream_answers", "before_the_first_token", "mid_stream",
        "during_a_long_silence"])
async def test_a_client_disconnect_cancels_the_upstream_within_a_second_and_frees_everything(
        mock_upstream: Upstream, start_gateway: Any, caplog: pytest.LogCaptureFixture,
        mock: dict[str, Any], read_events: int) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    settings = settings_for(mock_upstream.url, stream={"keepalive_seconds": 0.2},
                            limits={"max_concurrent_streams": 1},
                            keys=[{"name": "alice", "key": KEY, "max_concurrent_streams": 1}])
    app, base = await start_gateway(settings)
    baseline = await Baseline.after_one_request(base, KEY)
    session = aiohttp.ClientSession()
    response = await session.post(f"{base}{ROUTE}", headers=AUTH,
                                  json=chat_body(stream=True, **mock))
    assert response.status == 200
    for _ in range(read_events):
        line = await response.content.readuntil(b"\n\n")
        assert line.startswith(b"data: ") or line.startswith(b": keep-alive")
    await wait_until(lambda: len(app[IN_FLIGHT]) == 1, 2, "the stream is relayed")
    left = time.monotonic()
    response.close()  # the client goes away
    await session.close()

    await wait_until(lambda: mock_upstream.state.disconnects == 1, 1.0,
                     "the upstream saw the request cancelled")
    assert mock_upstream.state.last_disconnect - left < 1.0
    await assert_released(app, mock_upstream.state, baseline, timeout=1.0)
    [logged] = access_lines(caplog, ROUTE)
    assert logged["outcome"] == "client_disconnect" and logged["error"] is None
    samples = await scrape(base)
    assert value(samples, "gateway_client_disconnects_total", route=ROUTE) == 1
    assert value(samples, "gateway_open_streams") == 0
    # The key's only stream slot came back: a new stream is admitted and completes.
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}{ROUTE}", headers=AUTH,
                          json=chat_body(stream=True, fields={"mock": {}})) as r:
            assert r.status == 200
            assert (await r.read()).endswith(b"data: [DONE]\n\n")
