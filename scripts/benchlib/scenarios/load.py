"""``load``: issue 13's table. --streams concurrent paced streams and a light load: TTFB p50/p99
and whole-stream p99 of each target, each proxy's over direct and the gateway's over nginx; CPU
per paced stream of each proxy, and per stream whose events all arrive in one read; each
measured value beside the target issue 13 set for it."""

from __future__ import annotations

from typing import Any, NamedTuple, cast

from ..clients import load, measured
from ..rounds import median, medians, rotated
from ..targets import Bench

LATENCIES = ("ttfb_p50_ms", "ttfb_p99_ms", "stream_p99_ms")
# A load client whose loop runs later than this (p99) may be what limits the run: its delays
# are in every target's latencies.
CLIENT_LAG_LIMIT_MS = 2


def scenario_load(b: Bench) -> dict[str, Any]:
    """Issue 13's table."""
    a = b.args
    events = a.chunks + 2  # content chunks, the finish chunk, [DONE]
    one_read_events = a.one_read_chunks + 2
    # Every round alike: the proxies' upstream pools hold --streams connections from here on.
    for t in b.everyone:
        load(t.base, concurrency=a.streams, requests=a.streams, processes=a.clients,
             mock={"chunks": 5, "chunk_delay": a.chunk_delay_ms / 1000})
    heavy: dict[str, list[dict[str, float]]] = {}
    light: dict[str, list[dict[str, float]]] = {}
    one_read: dict[str, list[dict[str, float]]] = {}
    for rnd in range(a.rounds):
        for t in rotated(b.everyone, rnd):
            r = measured(t, b.redis_for(t), concurrency=a.streams, requests=a.streams,
                         mock=b.paced(), processes=a.clients, events=events)
            heavy.setdefault(t.name, []).append({
                "ttfb_p50_ms": r["ttfb_ms"]["p50"], "ttfb_p99_ms": r["ttfb_ms"]["p99"],
                "stream_p99_ms": r["duration_ms"]["p99"],
                "cpu_ms_per_stream": r["cpu_s"] * 1000 / r["ok"],
                "redis_cpu_ms_per_stream": r.get("redis_cpu_s", 0.0) * 1000 / r["ok"],
                "client_cores": r["client_cores"],
                "client_loop_lag_p99_ms": r["loop_lag_ms"]["p99"] or 0.0})
        for t in rotated(b.everyone, rnd):
            r = measured(t, concurrency=a.light_streams, requests=a.light_requests,
                         mock=b.paced(), events=events)
            light.setdefault(t.name, []).append({
                "ttfb_p50_ms": r["ttfb_ms"]["p50"], "ttfb_p99_ms": r["ttfb_ms"]["p99"],
                "stream_p99_ms": r["duration_ms"]["p99"]})
        for t in rotated(b.proxies, rnd):
            r = measured(t, b.redis_for(t), concurrency=a.one_read_concurrency,
                         requests=a.one_read_streams, mock={"chunks": a.one_read_chunks},
                         processes=a.clients, events=one_read_events)
            one_read.setdefault(t.name, []).append({
                "cpu_ms_per_stream": r["cpu_s"] * 1000 / r["ok"],
                "redis_cpu_ms_per_stream": r.get("redis_cpu_s", 0.0) * 1000 / r["ok"]})

    out: dict[str, Any] = {
        "heavy": {"streams": a.streams, "chunks": a.chunks, "chunk_delay_ms": a.chunk_delay_ms,
                  "client_processes": a.clients,
                  **medians(heavy, (*LATENCIES, "cpu_ms_per_stream", "redis_cpu_ms_per_stream",
                                    "client_cores", "client_loop_lag_p99_ms"), LATENCIES)},
        "light": {"streams": a.light_streams, "requests": a.light_requests,
                  **medians(light, LATENCIES, LATENCIES)},
        "one_read": {
            "chunks": a.one_read_chunks, "events_per_stream": one_read_events,
            "streams": a.one_read_streams, "concurrency": a.one_read_concurrency,
            "how": "the mock's burst mode: no pacing, so it writes all the events at once "
                   "(one write, below 64 KiB): they reach the proxy together",
            **medians(one_read, ("cpu_ms_per_stream", "redis_cpu_ms_per_stream"), digits=4)},
    }
    for part, runs in (("heavy", heavy), ("one_read", one_read)):
        for n in ("naive", "gateway"):
            out[part][f"cpu_ratio_{n}_to_nginx"] = round(
                median([r["cpu_ms_per_stream"] for r in runs[n]])
                / median([r["cpu_ms_per_stream"] for r in runs["nginx"]]), 2)
    for part, names in (("heavy", ("direct", "nginx", "naive")), ("one_read", ("nginx", "naive"))):
        for n in names:
            del out[part][n]["redis_cpu_ms_per_stream"]  # Redis serves the gateway alone
    direct = out["heavy"]["direct"]
    direct["upstream_cpu_ms_per_stream"] = direct.pop("cpu_ms_per_stream")
    lag = max(out["heavy"][t]["client_loop_lag_p99_ms"] for t in heavy)
    if lag > CLIENT_LAG_LIMIT_MS:
        out["heavy"]["warning"] = (f"the load client's loop ran up to {lag} ms late (p99): it "
                                   "may be what limits the run; try more --clients")
    out["targets"] = load_targets(out)
    return out


class Goal(NamedTuple):
    """One of issue 13's targets: the measure as the summary's ``targets`` name it, where its
    value is in the load summary (a path of keys), and the most it may be."""

    measure: str
    path: tuple[str, ...]
    at_most: float

    def value(self, load: dict[str, Any]) -> float:
        found: Any = load
        for key in self.path:
            found = found[key]
        return cast(float, found)

    def met(self, load: dict[str, Any]) -> bool:
        return self.value(load) <= self.at_most


# Issue 13's targets, the one place they are written: load_targets reports each, and the table
# (benchlib/table.py) prints each beside the measure it bounds.
GOALS: dict[str, Goal] = {
    "heavy_ttfb_p50": Goal("heavy TTFB p50, gateway minus nginx (ms)",
                           ("heavy", "gateway_minus_nginx", "ttfb_p50_ms"), 1),
    "heavy_ttfb_p99": Goal("heavy TTFB p99, gateway minus nginx (ms)",
                           ("heavy", "gateway_minus_nginx", "ttfb_p99_ms"), 5),
    "heavy_stream_p99": Goal("heavy whole-stream p99, gateway minus nginx (ms)",
                             ("heavy", "gateway_minus_nginx", "stream_p99_ms"), 10),
    "light_ttfb_p50": Goal("light TTFB p50, gateway over direct (ms)",
                           ("light", "gateway", "over_direct", "ttfb_p50_ms"), 1),
    "light_ttfb_p99": Goal("light TTFB p99, gateway over direct (ms)",
                           ("light", "gateway", "over_direct", "ttfb_p99_ms"), 3),
    "cpu_paced": Goal("CPU per paced stream, gateway / nginx",
                      ("heavy", "cpu_ratio_gateway_to_nginx"), 1.4),
    "cpu_paced_goal": Goal("CPU per paced stream, gateway / nginx (goal beyond the target)",
                           ("heavy", "cpu_ratio_gateway_to_nginx"), 1.25),
    "cpu_one_read": Goal("CPU per stream in one read, gateway / nginx",
                         ("one_read", "cpu_ratio_gateway_to_nginx"), 2.5),
}


def load_targets(out: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 13's targets, each with the value this run measured."""
    return [{"measure": g.measure, "value": g.value(out), "at_most": g.at_most, "met": g.met(out)}
            for g in GOALS.values()]
