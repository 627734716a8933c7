"""Processes and their lifecycle: ``gateway serve --workers N`` on one port, and the graceful
shutdown on SIGTERM (drain, then the restarting frame), for real: subprocess gateways, signals,
real clients. One in-process test looks inside (Redis leases, the upstream session)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from gateway.appkeys import LIMITER, UPSTREAMS
from gateway.ratelimit.redis import key_names
from gateway.server.workers import GatewayServer

from clients import AUTH, blocks, chat_body
from conftest import KEY, REDIS_URL, Upstream, settings_for
from processes import ThreadedMockUpstream
from servers import GatewayProcess, accepts, free_port, running, wait_until, wait_until_async

BAD_SIGNS = ("Traceback", "Unclosed", "Task was destroyed", "Exception ignored")


@pytest.fixture(scope="module")
def mock() -> Iterator[ThreadedMockUpstream]:
    with ThreadedMockUpstream() as upstream:
        yield upstream


def config(upstream: str, **server: Any) -> dict[str, Any]:
    return {
        "server": {"port": free_port(), **server},
        "upstream": {"url": upstream, "api_key": "xai-operator-secret-key", "max_retries": 0},
        "stream": {"keepalive_seconds": 5.0},
        "limits": {"requests_per_minute": 6000, "burst": 1000, "max_concurrent_streams": 100},
        "keys": [{"name": "alice", "key": KEY}],
    }


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, Any], rid: str,
                first_event: asyncio.Event | None = None) -> tuple[int, str, bytes]:
    async with session.post(url, json=body, headers={**AUTH, "X-Request-ID": rid}) as r:
        if first_event is None:
            return r.status, r.headers["Content-Type"], await r.read()
        raw = await r.content.readuntil(b"\n\n")
        first_event.set()
        return r.status, r.headers["Content-Type"], raw + await r.read()


async def test_sigterm_lets_streams_finish_then_ends_the_rest_and_exits(
        mock: ThreadedMockUpstream, tmp_path: Path) -> None:
    gateway = GatewayProcess(tmp_path, "gw", config(mock.url, drain_seconds=2.5))
    url = f"{gateway.url}/v1/chat/completions"
    with running(gateway):
        async with aiohttp.ClientSession() as s:
            started = {name: asyncio.Event() for name in ("short", "endless")}
            requests = {
                # Ends about 1 s after SIGTERM, within the 2.5 s drain: completes intact.
                "short": _post(s, url, chat_body(stream=True, chunks=6, chunk_delay=0.15), "short",
                               started["short"]),
                # Never ends: cut at the end of the drain with the restarting frame.
                "endless": _post(s, url, chat_body(stream=True, hang_after=2), "endless",
                                 started["endless"]),
                # Still waiting for the upstream's headers (keep-alive 5 s: nothing sent yet):
                # a true 503, as JSON, since no Accept names the event stream.
                "waiting": _post(s, url, chat_body(stream=True, headers_delay=30), "waiting"),
                # A plain request still waiting: 503 JSON.
                "plain": _post(s, url, chat_body(stream=False, headers_delay=30), "plain"),
            }
            tasks = {name: asyncio.create_task(c) for name, c in requests.items()}
            for event in started.values():
                await asyncio.wait_for(event.wait(), 5)
            await wait_until_async(lambda: len(mock.state.requests) >= 4, 5, "all 4 upstream")
            assert not any(task.done() for task in tasks.values())
            sigterm_at = time.monotonic()
            gateway.signal(signal.SIGTERM)
            # Stop accepting: the port refuses new connections at once.
            await wait_until_async(lambda: not accepts(gateway.port), 1.0, "the port to close")
            async with asyncio.timeout(10):
                results = {name: await task for name, task in tasks.items()}
            code = await asyncio.get_running_loop().run_in_executor(None, gateway.wait, 10)
            stopped_in = time.monotonic() - sigterm_at

    assert code == 0
    assert 2.4 <= stopped_in <= 6.0

    status, ctype, raw = results["short"]
    assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
    assert b"gateway_restarting" not in raw
    assert len([e for e in blocks(raw) if e.startswith(b"data: {")]) == 7  # 6 + finish_reason

    status, ctype, raw = results["endless"]
    assert status == 200
    frames = blocks(raw)
    assert [f.startswith(b'data: {"id"') for f in frames] == [True, True, False]
    error = orjson.loads(frames[-1].removeprefix(b"data: "))["error"]
    assert error["code"] == "gateway_restarting" and error["type"] == "server_error"
    assert "restarting" in error["message"]

    status, ctype, raw = results["waiting"]
    assert (status, ctype) == (503, "application/json")
    assert orjson.loads(raw)["error"]["code"] == "gateway_restarting"

    status, ctype, raw = results["plain"]
    assert (status, ctype) == (503, "application/json")
    assert orjson.loads(raw)["error"]["code"] == "gateway_restarting"

    outcomes = {line["request_id"]: (line["outcome"], line["error"])
                for line in gateway.access_lines()}
    assert outcomes == {"short": ("completed", None),
                        "endless": ("shutdown", "gateway_restarting"),
                        "waiting": ("shutdown", "gateway_restarting"),
                        "plain": ("shutdown", "gateway_restarting")}
    # The upstream requests were closed, not left behind.
    wait_until(lambda: mock.state.open_streams == 0, 2, "upstream streams to close")
    stderr = gateway.stderr()
    assert "draining 4 open requests for up to 2.5s" in stderr
    assert not any(sign in stderr for sign in BAD_SIGNS), stderr


async def test_shutdown_releases_leases_in_redis_and_closes_the_upstream_session(
        mock_upstream: Upstream, redis_url: str, redis_prefix: str) -> None:
    settings = settings_for(mock_upstream.url, server={"port": 0, "drain_seconds": 0.3},
                            redis={"url": redis_url, "key_prefix": redis_prefix},
                            stream={"keepalive_seconds": 0.2})
    server = GatewayServer(settings)
    await server.start()
    stopped = False
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        streams_key = key_names(redis_prefix, "alice")[1]
        upstream = server.app[UPSTREAMS].only
        assert upstream is not None
        assert type(server.app[LIMITER]).__name__ == "RedisLimiter"
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{server.port}/v1/chat/completions",
                              json=chat_body(stream=True, hang_after=1), headers=AUTH) as r:
                await r.content.readuntil(b"\n\n")
                assert await client.zcard(streams_key) == 1  # the stream holds a lease
                stop = asyncio.create_task(server.stop())
                raw = await asyncio.wait_for(r.read(), 5)
        await asyncio.wait_for(stop, 10)
        stopped = True
        assert b'"code":"gateway_restarting"' in raw
        assert await client.zcard(streams_key) == 0  # released, not left to expire
        assert upstream.pool is None  # the upstream connections were closed
        assert mock_upstream.state.open_streams == 0
    finally:
        if not stopped:
            await server.stop()
        await client.aclose()


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _healthz_pid(gateway: GatewayProcess, rid: str) -> int:
    """One request on a new connection; which worker served it (from the access log)."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as s:
        s.sendall(f"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Request-ID: {rid}\r\n"
                  "Connection: close\r\n\r\n".encode())
        while s.recv(4096):
            pass
    for _ in range(100):
        for line in gateway.access_lines():
            if line["request_id"] == rid:
                return int(line["pid"])
        time.sleep(0.01)
    raise AssertionError(f"no access-log line for {rid}")


def _wait_for_workers(gateway: GatewayProcess, count: int) -> None:
    """The port answers once the first worker listens; wait for all of them."""
    wait_until(lambda: gateway.stderr().count("listening on") >= count, 20, "the workers")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_workers_share_one_port_with_metrics_from_all_and_stop_together(
        mock: ThreadedMockUpstream, tmp_path: Path) -> None:
    gateway = GatewayProcess(tmp_path, "workers", config(mock.url, drain_seconds=1.0),
                             args=("--workers", "2"))
    with running(gateway):
        _wait_for_workers(gateway, 2)
        pids = {_healthz_pid(gateway, f"spread-{i}") for i in range(30)}
        assert len(pids) == 2 and gateway.pid not in pids  # two workers, not the supervisor
        # A second gateway on the same port is refused, not let in to share the traffic.
        twin = GatewayProcess(tmp_path, "twin", {**config(mock.url), "server": {
            "port": gateway.port}}, args=("--workers", "2")).start()
        assert twin.wait(20) == 1 and "cannot serve on" in twin.stderr()
        metrics = _scrape(gateway)
        # Any worker reports for both: 30 requests, whichever served the scrape.
        assert _metric(metrics, "gateway_requests_total", route="/healthz") == 30
        assert _metric(metrics, "gateway_limiter_backend", state="memory") == 2

        # A worker that dies is replaced; its counts stay in the metrics.
        victim = pids.pop()
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: re.search(rf"pid {victim}\) exited with status -9; restarting",
                                     gateway.stderr()) is not None, 5, "the supervisor")
        new_pids: set[int] = set()
        deadline = time.monotonic() + 10
        while not new_pids - pids - {victim}:
            assert time.monotonic() < deadline, "no replacement worker served a request"
            new_pids.add(_healthz_pid(gateway, f"after-{len(new_pids)}-{time.monotonic()}"))
        metrics = _scrape(gateway)
        assert _metric(metrics, "gateway_requests_total", route="/healthz") >= 31
        assert _metric(metrics, "gateway_limiter_backend", state="memory") == 2  # not 3

        # SIGINT (Ctrl-C) to the supervisor: forwarded, every process exits.
        metrics_dir = re.search(r"metrics from all of them in (\S+)\)", gateway.stderr())
        assert metrics_dir is not None and os.path.isdir(metrics_dir[1])
        workers = pids | new_pids
        gateway.signal(signal.SIGINT)
        assert gateway.wait(10) == 0
    assert not any(_alive(pid) for pid in workers)
    assert not os.path.exists(metrics_dir[1])  # the supervisor removed its directory
    stderr = gateway.stderr()
    assert stderr.count("SIGTERM: stopping") == 2  # each worker got the forwarded signal once
    assert not any(sign in stderr for sign in BAD_SIGNS), stderr


def test_workers_stop_by_themselves_when_the_supervisor_is_killed(
        mock: ThreadedMockUpstream, tmp_path: Path) -> None:
    gateway = GatewayProcess(tmp_path, "orphans", config(mock.url, drain_seconds=0.5),
                             args=("--workers", "2"))
    with running(gateway):
        _wait_for_workers(gateway, 2)
        workers = {_healthz_pid(gateway, f"w-{i}") for i in range(20)}
        gateway.signal(signal.SIGKILL)
        gateway.wait(5)
        # Each worker notices within a second and drains (0.5 s) on its own.
        wait_until(lambda: not any(_alive(pid) for pid in workers), 8, "orphaned workers")
    assert not accepts(gateway.port)
    assert gateway.stderr().count("is gone; stopping") == 2


def test_serve_refuses_a_port_already_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for workers in ("1", "2"):
            cfg = config("mock")
            cfg["server"]["port"] = port
            gateway = GatewayProcess(tmp_path, f"taken{workers}", cfg,
                                     args=("--workers", workers))
            gateway.start()
            assert gateway.wait(20) == 1
            assert f"cannot serve on 127.0.0.1:{port}" in gateway.stderr()


def _scrape(gateway: GatewayProcess) -> str:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"text/plain" in head
    return body.decode()
