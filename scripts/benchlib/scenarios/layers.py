"""``layers``: what each layer costs, as CPU per stream beside nginx's, all in one run:

  nginx            what issue 13 measures against
  floor            the least a relay in Python does (benchlib/relays/floor.py: uvloop
                   protocols, the bytes passed on from the read callback, httptools finding
                   where each message ends)
  naive            the usual aiohttp pass-through (benchlib/relays/naive.py)
  lean             the gateway's own hot-path work on raw protocols, no aiohttp
                   (benchlib/relays/lean.py: the key, the body parsed, the limiter's check and
                   lease, http1 upstream, the renderer): what a server of its own would cost
  gateway_memory   the gateway with its in-process limiter: aiohttp's server, auth, the body
                   checked, the SSE renderer's decisions, the lease, metrics
  gateway          the same with the Redis limiter: a round trip for the check and one for
                   the lease's release (Redis's own CPU not counted)

under four loads: a stream of one event (what a request costs) and a stream whose
--one-read-chunks events arrive in one read, both on kept-alive connections; --streams
concurrent paced streams, each on a connection of its own (as the load scenario runs them); and
long streams (``LONG_EVENTS`` events, ``LONG_GAP_S`` apart), whose cost is nearly all per event
(reported per event too). The difference from one layer to the next is what that layer adds;
``floor`` against ``nginx`` is what Python itself costs here.
"""

from __future__ import annotations

import contextlib
from typing import Any

from gateway.mock.ports import free_port

from ..clients import load, measured
from ..processes import Target
from ..proxies import floor_started, gateway_started, lean_started
from ..rounds import median, rotated
from ..targets import Bench

LONG_EVENTS = 502  # the long load's events: 500 content chunks, the finish chunk, [DONE]
LONG_GAP_S = 0.002  # between two of its content chunks


def scenario_layers(b: Bench) -> dict[str, Any]:
    a = b.args
    loads: dict[str, dict[str, Any]] = {
        "one_event": {"concurrency": a.one_read_concurrency, "requests": a.one_read_streams,
                      "mock": {"chunks": 1}, "events": 3, "processes": a.clients},
        "one_read": {"concurrency": a.one_read_concurrency, "requests": a.one_read_streams,
                     "mock": {"chunks": a.one_read_chunks}, "events": a.one_read_chunks + 2,
                     "processes": a.clients},
        "paced": {"concurrency": a.streams, "requests": a.streams, "mock": b.paced(),
                  "events": a.chunks + 2, "processes": a.clients},
        "long": {"concurrency": a.one_read_concurrency, "requests": a.one_read_concurrency,
                 "mock": {"chunks": LONG_EVENTS - 2, "chunk_delay": LONG_GAP_S},
                 "events": LONG_EVENTS},
    }
    with contextlib.ExitStack() as st:
        floor_port, lean_port, memory_port = free_port(), free_port(), free_port()
        floor = Target("floor", st.enter_context(floor_started(b.up_port, floor_port)),
                       f"http://127.0.0.1:{floor_port}/v1")
        lean = Target("lean", st.enter_context(lean_started(b.up_port, b.redis_url, lean_port)),
                      f"http://127.0.0.1:{lean_port}/api/v1")
        memory = Target("gateway_memory", st.enter_context(
            gateway_started(b.tmp, b.up_port, None, memory_port)),
            f"http://127.0.0.1:{memory_port}/api/v1")
        layers = [b.nginx, floor, b.naive, lean, memory, b.gateway]
        for t in (floor, lean, memory):  # as warm as the others: pools hold --streams connections
            load(t.base, concurrency=a.streams, requests=a.streams, processes=a.clients,
                 mock={"chunks": 5, "chunk_delay": a.chunk_delay_ms / 1000})
        per: dict[str, dict[str, list[float]]] = {name: {} for name in loads}
        for rnd in range(a.rounds):
            for name, kw in loads.items():
                for t in rotated(layers, rnd):
                    r = measured(t, **kw)
                    per[name].setdefault(t.name, []).append(r["cpu_s"] * 1e6 / r["ok"])
    out: dict[str, Any] = {}
    for name, runs in per.items():
        nginx = median(runs["nginx"])
        out[name] = {t: {"cpu_us_per_stream": round(median(v), 1),
                         "ratio_to_nginx": round(median(v) / nginx, 2)} for t, v in runs.items()}
    for t in out["long"].values():
        t["cpu_us_per_event"] = round(t["cpu_us_per_stream"] / LONG_EVENTS, 2)
    return out
