"""Every stream has a maximum duration (``[stream] max_duration_seconds``, counted from the
request's arrival): past it, one that is still flowing, silent, or waiting for the upstream's
first byte ends with a ``stream_max_duration`` error frame, and gives back everything it held:
its upstream connection, its stream slot, its tasks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import pytest

from gateway.schema import settings_from
from gateway.settings import ConfigError

from clients import AUTH, chat_body, sse_events
from conftest import KEY, Upstream, settings_for
from observe import Baseline, access_lines, assert_released, error_of, wait_until

ROUTE = "/api/v1/chat/completions"
MAX_DURATION = 0.6
MARGIN = 0.5
"""For the last write and a busy test host."""


@pytest.mark.parametrize("mock", [
    {"chunks": 1000, "chunk_delay": 0.02},  # never silent: no other limit applies
    {"pause_after": 2, "pause": 30},  # silent, well short of the idle limit
    {"headers_delay": 30},  # the upstream has not answered (keep-alives have opened it)
], ids=["mid_stream", "during_a_long_silence", "before_the_upstream_answers"])
async def test_a_stream_past_its_maximum_duration_ends_with_its_error_frame_and_frees_all(
        mock_upstream: Upstream, start_gateway: Any, caplog: pytest.LogCaptureFixture,
        mock: dict[str, Any]) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    app, base = await start_gateway(settings_for(
        mock_upstream.url, stream={"keepalive_seconds": 0.2,
                                   "max_duration_seconds": MAX_DURATION},
        keys=[{"name": "alice", "key": KEY, "max_concurrent_streams": 1}]))
    baseline = await Baseline.after_one_request(base, KEY)
    async with aiohttp.ClientSession() as s:
        started = time.monotonic()
        async with s.post(f"{base}{ROUTE}", headers=AUTH,
                          json=chat_body(stream=True, **mock)) as r:
            assert r.status == 200
            raw = await asyncio.wait_for(r.read(), MAX_DURATION + 5)
        took = time.monotonic() - started
    assert MAX_DURATION <= took <= MAX_DURATION + MARGIN
    frames = sse_events(raw)  # keep-alive comments aside
    error = error_of(frames[-1].removesuffix(b"\n\n"))
    assert error["code"] == "stream_max_duration" and "maximum duration" in error["message"]
    assert b"[DONE]" not in raw
    if "headers_delay" not in mock:
        assert len(frames) > 1  # the events before it came through

    if "headers_delay" not in mock:  # (else the mock's waiting handler is among the tasks)
        await wait_until(lambda: mock_upstream.state.disconnects == 1, 1,
                         "the upstream saw its request end before its answer did")
    await assert_released(app, mock_upstream.state, baseline)
    [logged] = access_lines(caplog, ROUTE)  # (the warm-up's route is /v1/...)
    assert (logged["outcome"], logged["error"]) == ("timeout", "stream_max_duration")
    # The key's one stream slot came back.
    async with aiohttp.ClientSession() as s, s.post(
            f"{base}{ROUTE}", headers=AUTH, json=chat_body(stream=True)) as r:
        assert r.status == 200 and (await r.read()).endswith(b"data: [DONE]\n\n")


def test_the_maximum_duration_is_an_hour_unless_set_and_must_be_a_positive_finite_number(
        ) -> None:
    assert settings_from({}).stream.max_duration_seconds == 3600
    assert settings_from({"stream": {"max_duration_seconds": 60}}).stream.max_duration_seconds \
        == 60
    for bad in (0, -1, float("inf"), float("nan"), "1h"):
        with pytest.raises(ConfigError, match="stream.max_duration_seconds"):
            settings_from({"stream": {"max_duration_seconds": bad}})
