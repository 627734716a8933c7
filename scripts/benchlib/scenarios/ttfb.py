"""``ttfb``: one stream at a time: time to first byte of the upstream, and what each proxy adds
to it."""

from __future__ import annotations

from typing import Any

from ..clients import load
from ..rounds import median
from ..targets import Bench


def scenario_ttfb(b: Bench) -> dict[str, Any]:
    res: dict[str, dict[str, list[float]]] = {}
    for _ in range(b.args.rounds):
        for t in b.everyone:
            r = load(t.base, concurrency=1, requests=200, mock={"chunks": 5})
            for q in ("p50", "p99"):
                res.setdefault(t.name, {}).setdefault(q, []).append(r["ttfb_ms"][q])
    out: dict[str, Any] = {n: {q: round(median(v), 3) for q, v in d.items()}
                           for n, d in res.items()}
    for n in ("nginx", "naive", "gateway"):
        out[f"added_{n}"] = {q: round(out[n][q] - out["direct"][q], 3) for q in ("p50", "p99")}
    return out
