"""``workers``: burst throughput of ``gateway serve --workers N`` and of nginx with N worker
processes, for each N of --workers-list, and the cores the proxy, the upstream and the client
each used, so that the summary says what limited the run. The upstream is the replay upstream
(benchlib/upstreams.py), which is never what limits it."""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from typing import Any

from gateway.mock.ports import free_port

from ..clients import load, wrk_chunks_per_s
from ..processes import Target
from ..proxies import gateway_started, nginx_started
from ..rounds import median, rotated
from ..targets import Bench
from ..upstreams import record_stream, upstream_group


def burst_and_client(b: Bench, t: Target, connections: int, chunks: int,
                     threads: int) -> tuple[float, float]:
    """Chunks per second of bursts through ``t``, and the client's CPU seconds: wrk's, or
    (without wrk) those of --clients loadtest.py processes."""
    if shutil.which("wrk"):
        return wrk_chunks_per_s(t.base, b.tmp, connections=connections, chunks=chunks,
                                seconds=b.args.burst_seconds, threads=threads)
    r = load(t.base, concurrency=connections, duration=b.args.burst_seconds,
             mock={"chunks": chunks}, processes=b.args.clients, events=chunks + 2)
    if r["errors"]:
        raise RuntimeError(f"{t.name}: {r['errors']} failed streams: {r['error_kinds']}")
    return float(r["chunks_per_s"]), float(r["client_cpu_s"])


def scenario_workers(b: Bench) -> dict[str, Any]:
    """Burst throughput of N gateway workers and of N nginx workers, for each N, with the
    cores each process group used: the proxy, the upstream and wrk. The upstream replays one
    recorded mock stream (``--serve-replay``), so that it is never what limits the run."""
    a = b.args
    chunks = 500
    recorded = b.tmp / "burst-stream.sse"
    recorded.write_bytes(record_stream(b.direct.base, chunks))
    port = free_port()
    rates: dict[str, dict[int, list[float]]] = {"gateway": {}, "nginx": {}}
    cores: dict[str, dict[int, dict[str, float]]] = {"gateway": {}, "nginx": {}}
    with contextlib.ExitStack() as st:
        upstream = Target("replay", upstream_group(st, b.tmp, port, a.mocks, recorded),
                          f"http://127.0.0.1:{port}/v1")
        for workers in a.workers_list:
            gw_port, ngx_port = free_port(), free_port()
            threads = (a.wrk_threads or max(1, math.ceil(workers / 2))) \
                if shutil.which("wrk") else a.clients  # client threads or processes
            connections = max(40, 20 * workers)
            with gateway_started(b.tmp, port, b.redis_url, gw_port, workers) as gw, \
                    nginx_started(b.tmp, port, ngx_port, workers) as ngx:
                time.sleep(1.0)  # the port answers once the first gateway worker listens
                groups = [Target("gateway", gw, f"http://127.0.0.1:{gw_port}/api/v1"),
                          Target("nginx", ngx, f"http://127.0.0.1:{ngx_port}/v1")]
                for t in groups:
                    load(t.base, concurrency=connections, requests=connections * 2,
                         mock={"chunks": 5}, processes=a.clients)
                used = {t.name: {"proxy": 0.0, "upstream": 0.0, "client": 0.0, "wall": 0.0}
                        for t in groups}
                for rnd in range(a.rounds):
                    for t in rotated(groups, rnd):
                        p0, u0, w0 = t.cpu(), upstream.cpu(), time.monotonic()
                        rate, client = burst_and_client(b, t, connections, chunks, threads)
                        u = used[t.name]
                        u["wall"] += time.monotonic() - w0
                        u["proxy"] += t.cpu() - p0
                        u["upstream"] += upstream.cpu() - u0
                        u["client"] += client
                        rates[t.name].setdefault(workers, []).append(rate)
                for name, u in used.items():
                    cores[name][workers] = {k: round(u[k] / u["wall"], 2)
                                            for k in ("proxy", "upstream", "client")}
                    cores[name][workers]["client_threads"] = threads
    gw_rates = {w: median(v) for w, v in rates["gateway"].items()}
    ngx_rates = {w: median(v) for w, v in rates["nginx"].items()}
    first = a.workers_list[0]
    out: dict[str, Any] = {
        "upstream": f"replay of one recorded mock stream of {chunks} chunks, "
                    f"{a.mocks} process(es)",
        "client": "wrk" if shutil.which("wrk") else f"loadtest.py, {a.clients} processes",
        "workers_chunks_per_s": {f"{w} worker(s)": round(v) for w, v in gw_rates.items()},
        "workers_nginx_chunks_per_s": {f"{w} worker(s)": round(v) for w, v in ngx_rates.items()},
        "workers_cores_used": {f"{w} worker(s)": cores["gateway"][w] for w in gw_rates},
        "workers_nginx_cores_used": {f"{w} worker(s)": cores["nginx"][w] for w in ngx_rates},
        "workers_gateway_to_nginx": {f"{w} worker(s)": round(gw_rates[w] / ngx_rates[w], 2)
                                     for w in gw_rates},
    }
    for w in a.workers_list[1:]:
        out["workers_chunks_per_s"][f"ratio_{w}_to_{first}"] = round(
            gw_rates[w] / gw_rates[first], 2)
        out["workers_nginx_chunks_per_s"][f"ratio_{w}_to_{first}"] = round(
            ngx_rates[w] / ngx_rates[first], 2)
    saturated = [f"{name} {w}: {c['upstream']} cores" for name in cores
                 for w, c in cores[name].items() if c["upstream"] > 0.8 * a.mocks]
    threads_busy = [f"{name} {w}: {c['client']} cores for {c['client_threads']} threads"
                    for name in cores for w, c in cores[name].items()
                    if c["client"] > 0.8 * c["client_threads"]]
    if saturated:
        out["warning_upstream_busy"] = saturated
    if threads_busy:
        out["warning_client_busy"] = threads_busy
    return out
