#!/usr/bin/env python3
"""Benchmark the gateway against the upstream directly and nginx as a plain proxy, in one run.

Starts the mock upstream, nginx (``proxy_buffering off``, one worker, no auth, no limits, no
framing), a naive aiohttp pass-through (scripts/naive_relay.py: the usual relay on aiohttp)
and the gateway (auth, a Redis rate-limit check when Redis answers, SSE framing), each
as its own process on loopback, and runs the same load against all three, interleaved round by
round so machine noise hits each alike. Prints a table with ratios and writes a JSON summary.

Scenarios (``--only`` picks some):
  cpu      N concurrent streams of C chunks, D ms apart: CPU per stream of the proxy process
  ttfb     one stream at a time: added time to first byte over calling the upstream directly
  burst    chunks with no pause: chunks per second through each proxy
  many     M concurrent slow streams through one gateway process: every byte checked, RSS
  workers  burst throughput of `gateway serve --workers 2` over one worker, and the cores the
           gateway, the mock and the client each used (what limited the run)

burst and workers use wrk as the client when it is installed (a Python client would be what
limits them); the other scenarios use scripts/loadtest.py, which verifies every stream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadtest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-bench-0000000000000000"
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout}s")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (nginx workers, gateway workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / TICK


def child_cpu() -> float:
    """CPU seconds of the finished child processes (the wrk runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1]) * 1024
    return total


class Target:
    def __init__(self, name: str, proc: subprocess.Popen[bytes], base: str) -> None:
        self.name, self.proc, self.base = name, proc, base


@contextlib.contextmanager
def started(cmd: list[str], port: int, env: dict[str, str] | None = None,
            log: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=out, stderr=out,
                            cwd=ROOT, start_new_session=True)
    try:
        wait_port(port)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


NGINX_CONF = """
worker_processes 1;
worker_rlimit_nofile 20000;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 19000; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    upstream mock {{ server 127.0.0.1:{upstream}; keepalive 512; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def redis_available(url: str) -> bool:
    try:
        import redis

        redis.Redis.from_url(url, socket_timeout=0.5).ping()
        return True
    except Exception:
        return False


def gateway_config(tmp: Path, upstream_port: int, redis_url: str | None, port: int,
                   workers: int = 1) -> Path:
    lines = [
        "[server]", f"port = {port}", f"workers = {workers}", "access_log = false", "",
        "[upstream]", f'url = "http://127.0.0.1:{upstream_port}/v1"',
        'api_key = "mock-upstream-key"', "max_retries = 0", "",
        "[limits]", "requests_per_minute = 100000000", "burst = 10000000",
        "max_concurrent_streams = 100000", "",
        "[[keys]]", 'name = "bench"', f'key = "{KEY}"', "",
    ]
    if redis_url:
        lines += ["[redis]", f'url = "{redis_url}"', f'key_prefix = "gwbench:{os.getpid()}"', ""]
    path = tmp / f"gateway-{port}.toml"
    path.write_text("\n".join(lines))
    return path


def load(base: str, *, concurrency: int, requests: int, mock: dict[str, Any],
         checksum: bool = False) -> dict[str, Any]:
    args = loadtest.parse_args([
        "--url", base, "--key", KEY, "--concurrency", str(concurrency),
        "--requests", str(requests), "--mock", json.dumps(mock), "--quiet", "--timeout", "600"]
        + (["--checksum"] if checksum else []))
    return asyncio.run(loadtest.run(args))


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
"""


def wrk_chunks_per_s(base: str, tmp: Path, *, connections: int, chunks: int,
                     seconds: float) -> float:
    """Chunks per second with wrk as the client (C: it leaves the CPU to the servers). wrk
    does not parse the streams; the other scenarios verify every byte."""
    body = json.dumps({"model": "grok-4", "stream": True, "mock": {"chunks": chunks},
                       "messages": [{"role": "user", "content": "hi"}]})
    script = tmp / "wrk.lua"
    script.write_text(WRK_SCRIPT.format(body=body, key=KEY))
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script),
         base + "/chat/completions"], capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw failed requests:\n{out}")
    rate = next(line for line in out.splitlines() if line.startswith("Requests/sec:"))
    return float(rate.split()[1]) * (chunks + 2)  # content chunks, the finish chunk, [DONE]


def burst_rate(base: str, tmp: Path, connections: int) -> float:
    if shutil.which("wrk"):
        return wrk_chunks_per_s(base, tmp, connections=connections, chunks=500, seconds=4)
    r = load(base, concurrency=connections, requests=connections * 5, mock={"chunks": 500})
    if r["errors"]:
        raise RuntimeError(f"{base}: {r['errors']} failed streams")
    return float(r["chunks_per_s"])


def measured(target: Target, **kw: Any) -> dict[str, Any]:
    pid = target.proc.pid
    c0 = cpu_seconds(pid)
    result = load(target.base, **kw)
    result["cpu_s"] = cpu_seconds(pid) - c0
    result["rss"] = rss_bytes(pid)
    if result["errors"]:
        raise RuntimeError(f"{target.name}: {result['errors']} failed streams: "
                           f"{result['error_kinds']}")
    return result


def median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=200, help="cpu: concurrent streams")
    p.add_argument("--chunks", type=int, default=50)
    p.add_argument("--chunk-delay-ms", type=float, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--many", type=int, default=9900,
                   help="many: concurrent slow streams (each needs 2 fds in the gateway)")
    p.add_argument("--only", default="cpu,ttfb,burst,many,workers")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    p.add_argument("--json", type=Path, help="write the summary here too")
    args = p.parse_args()
    only = set(args.only.split(","))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    redis_url = args.redis_url if redis_available(args.redis_url) else None
    summary: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   f"{platform.python_implementation()} {platform.python_version()}",
        "limiter": "redis" if redis_url else "memory (Redis not reachable)"}

    with tempfile.TemporaryDirectory(prefix="gwbench-") as tmpdir, contextlib.ExitStack() as st:
        tmp = Path(tmpdir)
        up_port, ngx_port, gw_port, naive_port = (free_port() for _ in range(4))
        py = sys.executable
        mock = st.enter_context(started(
            [py, "-m", "gateway", "mock-upstream", "--port", str(up_port)], up_port))
        for d in ("body", "proxy"):
            (tmp / d).mkdir()
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(tmp=tmp, upstream=up_port,
                                                          port=ngx_port))
        ngx = st.enter_context(started(
            [nginx, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-g", "daemon off;"],
            ngx_port))
        gw = st.enter_context(started(
            [py, "-m", "gateway", "serve", "--config",
             str(gateway_config(tmp, up_port, redis_url, gw_port))], gw_port,
            log=tmp / "gateway.log"))
        naive = st.enter_context(started(
            [py, str(ROOT / "scripts" / "naive_relay.py"), str(naive_port),
             f"http://127.0.0.1:{up_port}/v1"], naive_port))
        direct = Target("direct", mock, f"http://127.0.0.1:{up_port}/v1")
        gateway = Target("gateway", gw, f"http://127.0.0.1:{gw_port}/api/v1")
        targets = [Target("nginx", ngx, f"http://127.0.0.1:{ngx_port}/v1"),
                   Target("naive", naive, f"http://127.0.0.1:{naive_port}/v1"), gateway]
        # Warm up connection pools and caches.
        for t in [direct, *targets]:
            load(t.base, concurrency=10, requests=50, mock={"chunks": 5})

        if "cpu" in only:
            mock_opts = {"chunks": args.chunks, "chunk_delay": args.chunk_delay_ms / 1000}
            per: dict[str, list[float]] = {t.name: [] for t in targets}
            rss: dict[str, int] = {}
            for _ in range(args.rounds):
                for t in targets:
                    r = measured(t, concurrency=args.streams, requests=args.streams,
                                 mock=mock_opts)
                    per[t.name].append(r["cpu_s"] * 1000 / r["ok"])
                    rss[t.name] = max(rss.get(t.name, 0), rss_bytes(t.proc.pid, "VmHWM"))
            summary["cpu"] = {n: {"cpu_ms_per_stream": round(median(v), 3),
                                  "rounds": [round(x, 3) for x in v],
                                  "peak_rss_mb": round(rss[n] / 2**20, 1)}
                              for n, v in per.items()}
            for n in ("naive", "gateway"):
                summary["cpu"][f"ratio_{n}_to_nginx"] = round(
                    median(per[n]) / median(per["nginx"]), 2)

        if "ttfb" in only:
            res: dict[str, dict[str, list[float]]] = {}
            for _ in range(args.rounds):
                for t in [direct, *targets]:
                    r = load(t.base, concurrency=1, requests=200, mock={"chunks": 5})
                    for q in ("p50", "p99"):
                        res.setdefault(t.name, {}).setdefault(q, []).append(r["ttfb_ms"][q])
            summary["ttfb_ms"] = {n: {q: round(median(v), 3) for q, v in d.items()}
                                  for n, d in res.items()}
            for n in ("nginx", "naive", "gateway"):
                summary["ttfb_ms"][f"added_{n}"] = {
                    q: round(summary["ttfb_ms"][n][q] - summary["ttfb_ms"]["direct"][q], 3)
                    for q in ("p50", "p99")}

        if "burst" in only:
            cps: dict[str, list[float]] = {}
            for _ in range(args.rounds):
                for t in [direct, *targets]:
                    cps.setdefault(t.name, []).append(burst_rate(t.base, tmp, 20))
            summary["burst_client"] = "wrk" if shutil.which("wrk") else "loadtest.py"
            summary["burst_chunks_per_s"] = {n: round(median(v)) for n, v in cps.items()}
            for n in ("naive", "gateway"):
                summary["burst_chunks_per_s"][f"ratio_{n}_to_nginx"] = round(
                    median(cps[n]) / median(cps["nginx"]), 2)

        if "many" in only:
            base_rss = rss_bytes(gw.pid)
            peak = [base_rss]

            async def sample() -> None:
                while True:
                    peak[0] = max(peak[0], rss_bytes(gw.pid))
                    await asyncio.sleep(0.5)

            async def run_many() -> dict[str, Any]:
                sampler = asyncio.create_task(sample())
                a = loadtest.parse_args([
                    "--url", gateway.base, "--key", KEY, "--concurrency", str(args.many),
                    "--requests", str(args.many), "--quiet", "--timeout", "600", "--checksum",
                    "--mock", json.dumps({"chunks": 20, "chunk_delay": 0.5})])
                try:
                    return await loadtest.run(a)
                finally:
                    sampler.cancel()

            r = asyncio.run(run_many())
            summary["many"] = {
                "streams": args.many, "ok": r["ok"], "errors": r["errors"],
                "identical_checksums": r["distinct_checksums"] == 1,
                "rss_before_mb": round(base_rss / 2**20, 1),
                "rss_peak_mb": round(peak[0] / 2**20, 1),
                "kb_per_open_stream": round((peak[0] - base_rss) / 1024 / max(1, args.many), 1)}

        if "workers" in only:
            # Who had the CPU: the gateway's workers share the machine with the mock and wrk,
            # so the cores each used (CPU seconds per second) show what limited the run.
            rates: dict[int, list[float]] = {}
            cores: dict[int, dict[str, float]] = {}
            for workers in (1, 2):
                port = free_port()
                with started([py, "-m", "gateway", "serve", "--config",
                              str(gateway_config(tmp, up_port, redis_url, port, workers))],
                             port) as served:
                    time.sleep(1.0)  # the port answers once the first worker listens
                    t = Target(f"w{workers}", served, f"http://127.0.0.1:{port}/api/v1")
                    load(t.base, concurrency=10, requests=50, mock={"chunks": 5})
                    gw0, up0, wrk0 = cpu_seconds(served.pid), cpu_seconds(mock.pid), child_cpu()
                    t0 = time.monotonic()
                    for _ in range(args.rounds):
                        rates.setdefault(workers, []).append(burst_rate(t.base, tmp, 40))
                    wall = time.monotonic() - t0
                    cores[workers] = {
                        "gateway": round((cpu_seconds(served.pid) - gw0) / wall, 2),
                        "mock": round((cpu_seconds(mock.pid) - up0) / wall, 2),
                        "client": round((child_cpu() - wrk0) / wall, 2)}
            summary["workers_chunks_per_s"] = {f"{w} worker(s)": round(median(v))
                                               for w, v in rates.items()}
            summary["workers_chunks_per_s"]["ratio_2_to_1"] = round(
                median(rates[2]) / median(rates[1]), 2)
            summary["workers_cores_used"] = {f"{w} worker(s)": c for w, c in cores.items()}

    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
