"""``field``: the figures of the public cross-gateway benchmark "On the Bench", for each target:
added latency of a plain request and added time to first token at concurrency 1, added
inter-frame latency on paced streams, streams sustained (a ladder of concurrencies) and
requests/s at p99 bounds (another ladder)."""

from __future__ import annotations

import os
import resource
import shutil
import time
from typing import Any

from ..clients import load, measured, wrk
from ..rounds import medians, rotated
from ..targets import Bench

Q_US = ("p50_us", "p99_us")
# A step of the streams-sustained ladder passes when every frame arrives, no stream's gap between
# two frames is longer than STALL_FACTOR times the pacing, and fewer than MAX_FAILING of its
# streams fail (the table prints them from here).
STALL_FACTOR = 10
MAX_FAILING = 0.001


def scenario_field(b: Bench) -> dict[str, Any]:
    """The figures of "On the Bench", for each target."""
    a = b.args
    events = a.chunks + 2
    plain: dict[str, list[dict[str, float]]] = {}
    ttft: dict[str, list[dict[str, float]]] = {}
    frames: dict[str, list[dict[str, float]]] = {}
    for rnd in range(a.rounds):
        for t in rotated(b.everyone, rnd):
            r = measured(t, concurrency=1, requests=a.field_requests, plain=True,
                         mock={"chunks": 5}, warmup=1)
            plain.setdefault(t.name, []).append({
                "p50_us": r["duration_ms"]["p50"] * 1000, "p99_us": r["duration_ms"]["p99"] * 1000})
        for t in rotated(b.everyone, rnd):
            r = measured(t, concurrency=1, requests=a.field_requests, mock={"chunks": 5},
                         events=5 + 2, warmup=1)
            ttft.setdefault(t.name, []).append({
                "p50_us": r["ttfb_ms"]["p50"] * 1000, "p99_us": r["ttfb_ms"]["p99"] * 1000})
        for t in rotated(b.everyone, rnd):
            r = measured(t, concurrency=a.frame_streams, requests=a.frame_streams,
                         mock=b.paced(), events=events, gaps=True)
            frames.setdefault(t.name, []).append({
                "p50_us": r["gap_ms"]["p50"] * 1000, "p99_us": r["gap_ms"]["p99"] * 1000})
    out: dict[str, Any] = {
        "latency_c1_plain_us": {"requests": a.field_requests,
                                **medians(plain, Q_US, Q_US, 1)},
        "ttft_c1_us": {"requests": a.field_requests, "chunks": 5,
                       **medians(ttft, Q_US, Q_US, 1)},
        "inter_frame_us": {"streams": a.frame_streams, "chunks": a.chunks,
                           "pacing_ms": a.chunk_delay_ms,
                           **medians(frames, Q_US, Q_US, 1)},
    }
    out["streams_sustained"] = sustained_ladder(b, events)
    out["requests_per_s_at_p99"] = rps_ladder(b)
    return out


def sustained_ladder(b: Bench, events: int) -> dict[str, Any]:
    """The highest concurrency of paced streams at which a step passes (``STALL_FACTOR``,
    ``MAX_FAILING``): one pass up the ladder, each target climbing until it misses. Where direct
    misses too, the client or the mock is the limit there."""
    a = b.args
    stall_ms = STALL_FACTOR * a.chunk_delay_ms
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    fd_cap = (soft - 200) // 2  # a proxied stream holds two sockets in the proxy
    levels = [c for c in a.ladder if c <= fd_cap]
    timeout = 5 * a.chunks * a.chunk_delay_ms / 1000 + 5
    climbing = list(b.everyone)
    passed: dict[str, int | None] = {t.name: None for t in b.everyone}
    steps: dict[str, list[dict[str, Any]]] = {t.name: [] for t in b.everyone}
    stop = "the top of the ladder"
    t0 = time.monotonic()
    for i, c in enumerate(levels):
        if time.monotonic() - t0 > a.ladder_budget_s:
            stop = f"the time budget ({a.ladder_budget_s:g} s, --ladder-budget-s)"
            break
        for t in rotated(climbing, i):
            r = load(t.base, concurrency=c, requests=c, mock=b.paced(), events=events,
                     stall_ms=stall_ms, processes=a.clients, timeout=timeout)
            failed = r["errors"] + r["rate_limited"]
            lost = r["error_kinds"].get("frames_missing", 0)
            ok = lost == 0 and r["stalled"] == 0 and failed < MAX_FAILING * c
            steps[t.name].append({
                "streams": c, "passed": ok, "failed": failed, "frames_missing": lost,
                "stalled": r["stalled"], "max_gap_ms": r["max_gap_ms"]["max"],
                "ttfb_p99_ms": r["ttfb_ms"]["p99"], "elapsed_s": r["elapsed_s"],
                "client_cores": r["client_cores"]})
            if ok:
                passed[t.name] = c
            else:
                climbing.remove(t)
        if b.direct not in climbing:
            stop = f"direct (the client and the mock) failing at {c} streams"
            break
        if not climbing:
            break
    return {"ladder": levels, "stall_ms": stall_ms, "fd_cap": fd_cap,
            "limited_by": stop if climbing else "every target failing",
            **passed, "steps": steps}


def rps_ladder(b: Bench) -> dict[str, Any]:
    """Plain requests at concurrency 1, 2, 4, ...: throughput and p99 at each; per p99 bound,
    the highest throughput whose p99 stayed under it. A target stops climbing once its p99 is
    above the largest bound, requests fail, or its throughput falls below what a lower
    concurrency reached (saturated: more concurrency only adds latency)."""
    a = b.args
    use_wrk = shutil.which("wrk") is not None
    levels = [c for c in (2 ** i for i in range(20)) if c <= a.rps_max]
    climbing = list(b.everyone)
    steps: dict[str, list[dict[str, Any]]] = {t.name: [] for t in b.everyone}
    for i, c in enumerate(levels):
        for t in rotated(climbing, i):
            if use_wrk:
                r = wrk(t.base, b.tmp, {"mock": {"chunks": 5}}, connections=c,
                        seconds=a.rps_seconds, latency=True,
                        threads=a.wrk_threads or max(1, (os.cpu_count() or 1) // 8))
                step = {"concurrency": c, "requests_per_s": round(r["requests_per_s"]),
                        "p99_ms": r["p99_ms"], "failed": r["failed"] + r["socket_errors"],
                        "client_cores": round(r["client_cpu_s"] / a.rps_seconds, 2)}
            else:
                r = load(t.base, concurrency=c, duration=a.rps_seconds, plain=True,
                         mock={"chunks": 5}, processes=a.clients)
                step = {"concurrency": c, "requests_per_s": round(r["requests_per_s"]),
                        "p99_ms": r["duration_ms"]["p99"],
                        "failed": r["errors"] + r["rate_limited"],
                        "client_cores": r["client_cores"]}
            best = max((s["requests_per_s"] for s in steps[t.name]), default=0)
            steps[t.name].append(step)
            if step["failed"] or step["p99_ms"] is None or step["p99_ms"] > max(a.rps_bounds) \
                    or step["requests_per_s"] < 0.97 * best:
                climbing.remove(t)
        if not climbing:
            break
    out: dict[str, Any] = {"client": "wrk" if use_wrk else "loadtest.py",
                           "seconds_per_step": a.rps_seconds, "bounds_ms": a.rps_bounds}
    for name, runs in steps.items():
        good = [s for s in runs if not s["failed"] and s["p99_ms"] is not None]
        out[name] = {f"{bound:g}ms": max((s["requests_per_s"] for s in good
                                          if s["p99_ms"] < bound), default="none")
                     for bound in a.rps_bounds}
    out["steps"] = steps
    return out
