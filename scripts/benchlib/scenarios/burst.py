"""``burst``: streams whose chunks come with no pause: chunks per second through each target,
with wrk as the client when it is installed (a Python client would be what limits it)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..clients import load, wrk_chunks_per_s
from ..rounds import median
from ..targets import Bench


def burst_rate(base: str, tmp: Path, connections: int, seconds: float = 4) -> float:
    if shutil.which("wrk"):
        return wrk_chunks_per_s(base, tmp, connections=connections, chunks=500,
                                seconds=seconds)[0]
    r = load(base, concurrency=connections, requests=connections * 5, mock={"chunks": 500})
    if r["errors"]:
        raise RuntimeError(f"{base}: {r['errors']} failed streams")
    return float(r["chunks_per_s"])


def scenario_burst(b: Bench) -> dict[str, Any]:
    cps: dict[str, list[float]] = {}
    for _ in range(b.args.rounds):
        for t in b.everyone:
            cps.setdefault(t.name, []).append(burst_rate(t.base, b.tmp, 20,
                                                         b.args.burst_seconds))
    out: dict[str, Any] = {n: round(median(v)) for n, v in cps.items()}
    for n in ("naive", "gateway"):
        out[f"ratio_{n}_to_nginx"] = round(median(cps[n]) / median(cps["nginx"]), 2)
    return out
