"""Many streams at once: 1,000 concurrent streams through one ``gateway serve`` process each
arrive with every byte intact.

Each stream's text carries its index, so no two streams have the same bytes and a byte that
strayed into another stream would show. The mock upstream holds every stream after its first
event until all 1,000 are open at once (``hold_until_open``), so they really are concurrent,
whatever the speed of the host. Each client computes the SHA-256 of the exact bytes it read,
which must equal the digest of the stream the upstream sent for that index.
"""

from __future__ import annotations

import asyncio
import hashlib
import resource
from pathlib import Path
from typing import Any

import aiohttp

from clients import AUTH, mock_events
from conftest import KEY, Upstream
from observe import wait_until
from servers import gateway_processes

IN_FLIGHT = 1000


def text_of(index: int) -> str:
    return f"stream {index} of {IN_FLIGHT}: every byte of this sentence must arrive intact"


def expected_digest(index: int) -> str:
    """What the mock upstream sends for ``text_of(index)``, hashed."""
    return hashlib.sha256(b"".join(mock_events(text_of(index)))).hexdigest()


def allow_open_files(count: int) -> None:
    """Three sockets per stream live in this process and the gateway (which inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < count:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(count, hard), hard))


async def test_a_thousand_concurrent_streams_through_one_process_arrive_byte_for_byte(
        mock_upstream: Upstream, tmp_path: Path) -> None:
    allow_open_files(4 * IN_FLIGHT + 256)
    config = {"server": {"drain_seconds": 0.5, "access_log": False},
              "upstream": {"url": mock_upstream.url, "api_key": "xai-operator-secret-key"},
              "limits": {"requests_per_minute": 600_000, "burst": 2 * IN_FLIGHT,
                         "max_concurrent_streams": 2 * IN_FLIGHT},
              "keys": [{"name": "alice", "key": KEY}]}
    async with gateway_processes(config, 1, tmp_path) as [gw], aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=60)) as http:

        async def stream(index: int) -> tuple[int, str]:
            body: dict[str, Any] = {
                "model": "grok-4", "stream": True,
                "messages": [{"role": "user", "content": f"stream {index}"}],
                "mock": {"text": text_of(index), "pause_after": 1,
                         "hold_until_open": IN_FLIGHT, "pause": 15}}
            async with http.post(f"{gw.url}/v1/chat/completions", json=body,
                                 headers=AUTH) as resp:
                digest = hashlib.sha256()
                async for piece in resp.content.iter_any():
                    digest.update(piece)
                return resp.status, digest.hexdigest()

        results = await asyncio.gather(*(stream(i) for i in range(IN_FLIGHT)))

        state = mock_upstream.state
        assert state.peak_open_streams == IN_FLIGHT  # all of them open at the same time
        assert [status for status, _ in results] == [200] * IN_FLIGHT
        intact = [digest == expected_digest(i) for i, (_, digest) in enumerate(results)]
        assert intact.count(False) == 0, f"streams with wrong bytes: {intact.count(False)}"
        assert state.completed_streams == IN_FLIGHT and state.disconnects == 0
        await wait_until(lambda: state.open_streams == 0, 2, "every upstream stream closed")
        async with http.get(f"{gw.url}/metrics") as resp:
            metrics = await resp.text()
        assert "gateway_open_streams 0.0" in metrics.splitlines()
        assert "Traceback" not in gw.logs()
