"""What the guarantee tests look at after a fault: the access-log line, the metrics, and whether
everything the request held was given back.

- ``access_lines(caplog)``: the ``gateway.access`` JSON lines captured so far (the test calls
  ``caplog.set_level(logging.INFO, logger="gateway.access")`` first).
- The metrics (``scrape(base)`` and ``value(samples, name, **labels)``) and the events of an SSE
  body (``sse_events(raw)``) are read with ``tests/clients.py``, as in the other tests.
- ``Baseline`` / ``assert_released``: no stream still registered, no stream open at the mock
  upstream, no task left behind, each waited for (bounded) rather than assumed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.appkeys import IN_FLIGHT
from gateway.mock.upstream import MockState


def access_lines(caplog: pytest.LogCaptureFixture, route: str | None = None
                 ) -> list[dict[str, Any]]:
    lines = [orjson.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    return [line for line in lines if route is None or line["route"] == route]


async def wait_until(predicate: Callable[[], bool], timeout: float,
                     what: str | Callable[[], str]) -> float:
    """Seconds until ``predicate()`` held; fails the test after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"not within {timeout}s: {what if isinstance(what, str) else what()}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


class Baseline:
    """The tasks running before the request under test: the servers' own, pytest's, and one
    pooled keep-alive connection to the upstream (whose handler task the mock keeps), made by
    one healthy request first so that a connection the pool keeps is not counted as a leak."""

    def __init__(self, tasks: int) -> None:
        self.tasks = tasks

    @classmethod
    async def after_one_request(cls, base: str, key: str) -> Baseline:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{base}/v1/chat/completions", headers={
                    "Authorization": f"Bearer {key}"}, json={
                    "model": "grok-4", "stream": True,
                    "messages": [{"role": "user", "content": "warm up"}]}) as r:
                assert r.status == 200 and (await r.read()).endswith(b"data: [DONE]\n\n")
        await asyncio.sleep(0.05)  # the client's connection handler ends
        return cls(len(asyncio.all_tasks()))


async def assert_released(app: web.Application, state: MockState | None, baseline: Baseline,
                          timeout: float = 2.0) -> None:
    await wait_until(lambda: len(app[IN_FLIGHT]) == 0, timeout, "the gateway's streams ended")
    if state is not None:
        await wait_until(lambda: state.open_streams == 0, timeout,
                         "the upstream's stream was closed")
    await wait_until(lambda: len(asyncio.all_tasks()) <= baseline.tasks, timeout,
                     lambda: f"tasks back to {baseline.tasks}: {asyncio.all_tasks()}")


def error_of(frame_or_body: bytes) -> dict[str, Any]:
    """The ``error`` object of a JSON error body or an SSE error frame, in the OpenAI shape."""
    data = frame_or_body[6:] if frame_or_body.startswith(b"data: ") else frame_or_body
    err = orjson.loads(data)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err  # type: ignore[no-any-return]

