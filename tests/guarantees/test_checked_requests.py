"""The request the upstream sees is the request the gateway checked, and what the gateway records
of it is true.

A body with duplicate keys is checked on its last value (orjson keeps the last) and forwarded as
what was checked, re-serialized, so an upstream that keeps the first cannot run another model or
another mode. Time to first byte is measured on one clock, so it is never negative and never
more than the whole request.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from clients import AUTH, post
from conftest import KEY, Upstream, settings_for
from servers import GatewayProcess, accepts, free_port, running, spawn, wait_until

ROUTE = "/api/v1/chat/completions"


def duplicated(first: bytes, last: bytes, stream: bytes = b"true") -> bytes:
    """A chat body whose ``model`` appears twice (``first``, then ``last``)."""
    return (b'{"model": "' + first + b'", "messages": [{"role": "user", "content": "hi"}], '
            b'"stream": ' + stream + b', "model": "' + last + b'"}')


async def test_a_duplicated_model_reaches_the_upstream_only_as_the_model_that_was_checked(
        mock_upstream: Upstream, start_gateway: Any) -> None:
    _, base = await start_gateway(settings_for(mock_upstream.url, keys=[
        {"name": "alice", "key": "sk-test-alice-000000000001", "models": ["grok-4"]}]))
    r = await post(f"{base}{ROUTE}", data=duplicated(b"grok-3-mini", b"grok-4"),
                   headers={"Content-Type": "application/json"})
    assert r.status == 200 and r.body.endswith(b"data: [DONE]\n\n")
    raw = mock_upstream.state.requests[-1]["raw"]
    assert raw.count(b'"model"') == 1 and b"grok-3-mini" not in raw
    assert orjson.loads(raw)["model"] == "grok-4"
    # And the other way round: the model the key may not use is the one checked, and refused.
    refused = await post(f"{base}{ROUTE}", data=duplicated(b"grok-4", b"grok-3-mini"),
                         headers={"Content-Type": "application/json"})
    assert refused.status == 403 and len(mock_upstream.state.requests) == 1


async def test_a_duplicated_stream_flag_reaches_the_upstream_as_the_mode_that_took_the_slot(
        gateway: Any, mock_upstream: Upstream) -> None:
    _, base = gateway
    body = duplicated(b"grok-4", b"grok-4")[:-1] + b', "stream": false}'
    r = await post(f"{base}{ROUTE}", data=body, headers={"Content-Type": "application/json"})
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/json")
    raw = mock_upstream.state.requests[-1]["raw"]
    assert raw.count(b'"stream"') == 1 and orjson.loads(raw)["stream"] is False


async def test_time_to_first_byte_is_never_negative_nor_longer_than_the_request(
        mock_upstream: Upstream, tmp_path: Path) -> None:
    """Under ``gateway serve`` (uvloop, whose loop clock is libuv's cached milliseconds): with
    two clocks about a fifth of fast requests logged a negative time to first byte."""
    gateway = GatewayProcess(tmp_path, "ttfb", {
        "server": {"port": free_port()},
        "upstream": {"url": mock_upstream.url, "api_key": "xai-test-operator-key"},
        "limits": {"requests_per_minute": 60000, "burst": 1000},
        "keys": [{"name": "alice", "key": KEY}]})
    with running(gateway):
        for stream in [False, True] * 40:
            body = {"model": "grok-4", "messages": [{"role": "user", "content": "hi"}],
                    "stream": stream}
            assert (await post(f"{gateway.url}{ROUTE}", body)).status == 200
    lines = [line for line in gateway.access_lines() if line["route"] == ROUTE]
    assert len(lines) == 80
    for line in lines:
        assert 0 <= line["ttfb_ms"] <= line["duration_ms"], line


async def test_the_parsed_body_is_not_kept_while_the_answer_streams(start_gateway: Any) -> None:
    """The mock upstream runs in a process of its own, so every dict this process holds with
    the request's marker in it would be the gateway's."""
    port = free_port()
    mock = spawn([sys.executable, "-m", "gateway", "mock-upstream", "--port", str(port)],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: accepts(port), 15, "the mock upstream process")
        _, base = await start_gateway(settings_for(f"http://127.0.0.1:{port}/v1"))
        marker = f"marker-{uuid.uuid4().hex}"
        data = orjson.dumps({"model": "grok-4", "stream": True, "mock": {
            "pause_after": 2, "pause": 3},
            "messages": [{"role": "user", "content": marker + "x" * 100_000}]})

        def held() -> list[dict[str, Any]]:
            gc.collect()
            return [o for o in gc.get_objects() if isinstance(o, dict)
                    and isinstance(o.get("messages"), list) and marker in repr(o["messages"])]

        async with aiohttp.ClientSession() as session, session.post(
                f"{base}{ROUTE}", data=data,
                headers={**AUTH, "Content-Type": "application/json"}) as r:
            for _ in range(2):
                await r.content.readuntil(b"\n\n")
            assert held() == []  # mid-stream: the upstream is pausing
            assert (await r.read()).endswith(b"data: [DONE]\n\n")
    finally:
        mock.kill()
        mock.wait()
