"""``many``: --many concurrent slow streams through one gateway process, every byte checked
(one checksum for all), and the memory each open stream holds."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import loadtest

from ..processes import rss_bytes
from ..proxies import KEY
from ..targets import Bench


def scenario_many(b: Bench) -> dict[str, Any]:
    a, gw = b.args, b.gateway.proc
    base_rss = rss_bytes(gw.pid)
    peak = [base_rss]

    async def sample() -> None:
        while True:
            peak[0] = max(peak[0], rss_bytes(gw.pid))
            await asyncio.sleep(0.5)

    async def run_many() -> dict[str, Any]:
        sampler = asyncio.create_task(sample())
        args = loadtest.parse_args([
            "--url", b.gateway.base, "--key", KEY, "--concurrency", str(a.many),
            "--requests", str(a.many), "--quiet", "--timeout", "600", "--checksum",
            "--mock", json.dumps({"chunks": 20, "chunk_delay": 0.5})])
        try:
            return await loadtest.run(args)
        finally:
            sampler.cancel()

    r = loadtest.run_loop(run_many())
    return {"streams": a.many, "ok": r["ok"], "errors": r["errors"],
            "identical_checksums": r["distinct_checksums"] == 1,
            "rss_before_mb": round(base_rss / 2**20, 1),
            "rss_peak_mb": round(peak[0] / 2**20, 1),
            "kb_per_open_stream": round((peak[0] - base_rss) / 1024 / max(1, a.many), 1)}
