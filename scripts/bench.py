#!/usr/bin/env python3
"""Benchmark the gateway against the upstream directly and nginx as a plain proxy, in one run.

Starts the mock upstream, nginx (``proxy_buffering off``, one worker, no auth, no limits, no
framing), a naive aiohttp pass-through (benchlib/relays/naive.py: the usual relay on
aiohttp) and the gateway (auth, a Redis rate-limit check when Redis answers, SSE framing), each
as its own process on loopback, and runs the same load against all of them, interleaved round
by round (the order rotating) so machine noise hits each alike. Reports medians over rounds, as
a JSON summary and, with ``--table``, a Markdown table after it.

Scenarios (``--only`` picks some; ``all`` is every one):
  load     issue 13's table: --streams concurrent paced streams (--chunks, --chunk-delay-ms)
           and light load (--light-streams): TTFB p50/p99 and whole-stream p99, and each
           proxy's over direct; CPU per paced stream of each proxy; CPU per stream whose
           --one-read-chunks events arrive in one read (the mock's burst mode writes them in
           one write); each beside the target issue 13 set for it
  field    the figures of the public cross-gateway benchmark "On the Bench": added latency
           (plain request, concurrency 1), added time to first token, added inter-frame
           latency on a paced stream, streams sustained (a ladder of concurrencies), requests/s
           at each p99 bound of --rps-bounds (a ladder of concurrencies)
  cpu      N concurrent streams of C chunks, D ms apart: CPU per stream of the proxy process
  ttfb     one stream at a time: added time to first byte over calling the upstream directly
  burst    chunks with no pause: chunks per second through each proxy
  many     M concurrent slow streams through one gateway process: every byte checked, RSS
  workers  burst throughput of `gateway serve --workers N` and of nginx with N worker
           processes, for each N of --workers-list, and the cores the proxy, the upstream and
           the client each used (what limited the run)
  layers   what each layer costs: CPU per stream of nginx, a bare Python relay
           (benchlib/relays/floor.py), the naive relay, the gateway's hot-path work on raw
           protocols (benchlib/relays/lean.py), the gateway with its in-process limiter and with
           Redis, each beside nginx's, for a stream of one event, one whose --one-read-chunks
           events arrive in one read, --streams paced streams and long streams of events close
           together (also per event)
  sockets  the Responses API's WebSocket mode: CPU of the gateway per socket turn (each of
           --socket-clients sockets runs --socket-turns turns) beside CPU per POST responses
           stream (as many clients, as many streams each), the same answer of --chunks deltas

CPU is the scheduler's nanosecond count of every thread of the process and its children
(/proc/PID/task/TID/schedstat), not the coarse clock ticks (SC_CLK_TCK) of /proc/PID/stat.

Clients: burst, workers and the requests/s ladder use wrk when it is installed (a Python client
would be what limits them); the other scenarios use scripts/loadtest.py, which verifies every
stream, split over --clients processes, and reports the cores it used and how late its own
event loop ran (``client`` in the summary): a client that lags is what limits a run.

Upstreams: ``--mocks K`` runs K mock processes on one port (SO_REUSEPORT; the kernel spreads
connections over them) for machines where one would be the bottleneck. The workers scenario
uses a replay upstream instead (``--serve-replay``): it answers every stream with the bytes the
mock sent for one burst stream, recorded at start, framed as the mock frames them, at next to
no CPU, so that the upstream is never what limits it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchlib.proxies import redis_available
from benchlib.scenarios.burst import scenario_burst
from benchlib.scenarios.cpu import scenario_cpu
from benchlib.scenarios.field import scenario_field
from benchlib.scenarios.layers import scenario_layers
from benchlib.scenarios.load import scenario_load
from benchlib.scenarios.many import scenario_many
from benchlib.scenarios.sockets import scenario_sockets
from benchlib.scenarios.ttfb import scenario_ttfb
from benchlib.scenarios.workers import scenario_workers
from benchlib.table import table
from benchlib.targets import Bench, targets_started
from benchlib.upstreams import serve_mock, serve_replay

# The scenarios in the order they run, whatever the order of --only.
RUNS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "load": scenario_load, "field": scenario_field, "cpu": scenario_cpu, "ttfb": scenario_ttfb,
    "burst": scenario_burst, "many": scenario_many, "workers": scenario_workers,
    "layers": scenario_layers, "sockets": scenario_sockets}
SCENARIOS = tuple(RUNS)
SUMMARY_KEYS = {"ttfb": "ttfb_ms", "burst": "burst_chunks_per_s"}  # the names they had before


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="cpu,ttfb,burst,many,workers",
                   help=f"scenarios, comma-separated, or 'all' ({','.join(SCENARIOS)})")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--table", action="store_true",
                   help="print a Markdown table of the results after the JSON")
    p.add_argument("--json", type=Path, help="write the summary here too")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    g = p.add_argument_group("paced streams (load, cpu, field)")
    g.add_argument("--streams", type=int, default=200, help="load, cpu: concurrent streams")
    g.add_argument("--chunks", type=int, default=50)
    g.add_argument("--chunk-delay-ms", type=float, default=20)
    g.add_argument("--clients", type=int, default=max(2, min(4, cores // 4)),
                   help="load client processes for the many-stream runs (default: %(default)s)")
    g = p.add_argument_group("load")
    g.add_argument("--light-streams", type=int, default=10, help="light load: concurrent streams")
    g.add_argument("--light-requests", type=int, default=30, help="light load: streams per round")
    g.add_argument("--one-read-chunks", type=int, default=100,
                   help="events of a stream that arrives in one read (plus finish and [DONE])")
    g.add_argument("--one-read-streams", type=int, default=2000,
                   help="such streams per target and round")
    g.add_argument("--one-read-concurrency", type=int, default=20)
    g = p.add_argument_group("field")
    g.add_argument("--field-requests", type=int, default=500,
                   help="requests per target and round at concurrency 1 (latency, TTFT)")
    g.add_argument("--frame-streams", type=int, default=10,
                   help="concurrent paced streams whose inter-frame gaps are measured")
    g.add_argument("--ladder", type=ints, default=[50, 100, 200, 400, 800, 1600],
                   help="streams sustained: the concurrencies to try (default: %(default)s)")
    g.add_argument("--ladder-budget-s", type=float, default=60,
                   help="streams sustained: no new step after this many seconds")
    g.add_argument("--rps-bounds", type=floats, default=[1.0, 5.0, 10.0, 50.0],
                   help="p99 bounds in ms for requests/s (default: 1,5,10,50)")
    g.add_argument("--rps-seconds", type=int, default=2,
                   help="requests/s: seconds at each concurrency")
    g.add_argument("--rps-max", type=int, default=256,
                   help="requests/s: the highest concurrency to try")
    g = p.add_argument_group("other scenarios")
    g.add_argument("--burst-seconds", type=int, default=4,
                   help="burst, workers: seconds of each wrk run")
    g.add_argument("--many", type=int, default=9900,
                   help="many: concurrent slow streams (each needs 2 fds in the gateway)")
    g.add_argument("--workers-list", type=ints, default=[1, 2],
                   help="workers: the process counts to run, gateway and nginx alike "
                        "(default: 1,2; a many-core machine: 1,2,4,8)")
    g.add_argument("--socket-clients", type=int, default=20,
                   help="sockets: concurrent sockets (and stream clients)")
    g.add_argument("--socket-turns", type=int, default=50,
                   help="sockets: turns per socket (and streams per client)")
    g.add_argument("--mocks", type=int, default=1,
                   help="upstream processes sharing the upstream port (SO_REUSEPORT)")
    g.add_argument("--wrk-threads", type=int,
                   help="wrk threads (default: burst 1, requests/s one per 8 cores, workers "
                        "half the worker count, rounded up)")
    p.add_argument("--serve-mock", type=int, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument("--serve-replay", type=int, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument("--recorded", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--ready", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.only = set(SCENARIOS) if args.only == "all" else set(args.only.split(","))
    unknown = args.only - set(SCENARIOS)
    if unknown:
        p.error(f"--only: unknown scenario(s) {', '.join(sorted(unknown))}")
    if args.rounds < 1 or args.clients < 1 or args.mocks < 1 or not args.workers_list:
        p.error("--rounds, --clients and --mocks must be at least 1, --workers-list non-empty")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_mock:
        serve_mock(args.serve_mock, args.ready)
        return 0
    if args.serve_replay:
        serve_replay(args.serve_replay, args.recorded, args.ready)
        return 0
    only = args.only
    redis_url = args.redis_url if redis_available(args.redis_url) else None
    summary: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   f"{platform.python_implementation()} {platform.python_version()}",
        "limiter": "redis" if redis_url else "memory (Redis not reachable)",
        "rounds": args.rounds, "clients": args.clients, "mocks": args.mocks}

    with tempfile.TemporaryDirectory(prefix="gwbench-") as tmpdir, \
            targets_started(args, Path(tmpdir), redis_url) as b:
        took: dict[str, float] = {}
        summary["seconds"] = took
        for name in SCENARIOS:
            if name in only:
                t0 = time.monotonic()
                result = RUNS[name](b)
                took[name] = round(time.monotonic() - t0, 1)
                if name == "workers":  # its keys at the top, as before
                    summary.update(result)
                else:
                    summary[SUMMARY_KEYS.get(name, name)] = result
                if name == "burst":
                    summary["burst_client"] = "wrk" if shutil.which("wrk") else "loadtest.py"

    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    if args.table:
        print()
        print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
