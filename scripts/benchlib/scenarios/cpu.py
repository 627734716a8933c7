"""``cpu``: --streams concurrent paced streams through each proxy: CPU per stream of the proxy's
processes, and its peak RSS."""

from __future__ import annotations

from typing import Any

from ..clients import measured
from ..rounds import median
from ..targets import Bench


def scenario_cpu(b: Bench) -> dict[str, Any]:
    a = b.args
    per: dict[str, list[float]] = {t.name: [] for t in b.proxies}
    rss: dict[str, int] = {}
    for _ in range(a.rounds):
        for t in b.proxies:
            r = measured(t, concurrency=a.streams, requests=a.streams, mock=b.paced())
            per[t.name].append(r["cpu_s"] * 1000 / r["ok"])
            rss[t.name] = max(rss.get(t.name, 0), t.rss("VmHWM"))
    out: dict[str, Any] = {n: {"cpu_ms_per_stream": round(median(v), 3),
                               "rounds": [round(x, 3) for x in v],
                               "peak_rss_mb": round(rss[n] / 2**20, 1)}
                           for n, v in per.items()}
    for n in ("naive", "gateway"):
        out[f"ratio_{n}_to_nginx"] = round(median(per[n]) / median(per["nginx"]), 2)
    return out
