"""What the rate limiter costs: per check, per gateway request, and how many checks one Redis
sustains from gateway processes.

    python scripts/bench_limiter.py [--redis-url URL | --own-redis] [--seconds 3] [--procs 4]
    python scripts/bench_limiter.py --cluster [--seconds 3] [--procs 4]

Measures, with real servers on loopback:

1. one check, sequentially: ``MemoryLimiter.acquire`` vs ``RedisLimiter.acquire`` (one script
   call, one round trip);
2. checks per second one Redis sustains: concurrent script calls from 1 and from ``--procs``
   processes (each one event loop, as a gateway worker is), and the Redis CPU time per check
   (``INFO commandstats``), whose inverse bounds what one Redis core can serve; and the
   gateway's own CPU per check (and per stream's check, lease and release) with 1, 4 and
   ``--concurrency`` in flight, which is what batching saves;
3. the limiter's cost per gateway request: the same requests through a real gateway (mock
   upstream in-process) with the memory limiter and with the Redis limiter, sequential
   latency and concurrent throughput.

4. with ``--cluster`` only: the same checks through a private 3-primary Redis Cluster
   (``[redis] mode = "cluster"``) against a private single Redis: checks per second from 1 and
   from ``--procs`` processes, the gateway's CPU per check, and Redis' CPU per check summed over
   the primaries. On a host with few cores the servers and the clients share them: the ratio,
   not the absolute numbers, is what carries over.

All keys live under a fresh ``gwbench:<random>`` prefix and are deleted at the end.
``--own-redis`` starts a private redis-server on a free port instead (clean server-side numbers
on a Redis that others also use).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import multiprocessing
import os
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import loadtest
import redis.asyncio as aioredis
from aiohttp import web
from benchlib.processes import started
from benchlib.table import markdown

from gateway.app import create_app
from gateway.mock.ports import free_port
from gateway.ratelimit.memory import MemoryLimiter
from gateway.ratelimit.redis import RedisLimiter
from gateway.redis.topology import close, connect
from gateway.request_info import ClientKey
from gateway.schema import settings_from
from gateway.settings import RedisSettings, Settings

KEY = "sk-bench-000000000000000001"
BIG = ClientKey(name="bench", requests_per_minute=1e9, burst=1_000_000_000,
                max_concurrent_streams=1000)
TIMINGS = ["mean", "p50", "p99"]  # the columns of a row of timings


async def sequential_checks(limiter: Any, n: int) -> list[float]:
    timings = []
    for i in range(n):
        key = BIG if i % 2 else ClientKey(name=f"bench-{i % 64}", requests_per_minute=1e9,
                                          burst=1_000_000_000, max_concurrent_streams=1000)
        t0 = time.perf_counter()
        await limiter.acquire(key, stream=False)
        timings.append(time.perf_counter() - t0)
    return timings


async def concurrent_checks(url: str, prefix: str, seconds: float, concurrency: int,
                            mode: str = "single", stream: bool = False) -> int:
    """Checks done in ``seconds`` by ``concurrency`` tasks; with ``stream``, each a stream's
    check and lease, then the lease's release."""
    settings = RedisSettings(url=url, key_prefix=prefix, timeout_seconds=2, mode=mode)
    client = connect(settings)
    limiter = RedisLimiter(client, settings)
    stop = time.monotonic() + seconds
    done = 0

    async def worker(w: int) -> None:
        nonlocal done
        key = ClientKey(name=f"bench-c{os.getpid()}-{w % 32}", requests_per_minute=1e9,
                        burst=1_000_000_000, max_concurrent_streams=1000)
        while time.monotonic() < stop:
            decision = await limiter.acquire(key, stream=stream)
            if decision.lease is not None:
                await limiter.release(key, decision.lease)
            done += 1

    try:
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    finally:
        await limiter.close()
        await close(client)
    return done


def _process_checks(args: tuple[str, str, float, int, float, str]) -> int:
    url, prefix, seconds, concurrency, start_at, mode = args
    time.sleep(max(0.0, start_at - time.time()))
    return loadtest.run_loop(concurrent_checks(url, prefix, seconds, concurrency, mode))


def many_processes(url: str, prefix: str, seconds: float, procs: int, concurrency: int,
                   mode: str = "single") -> float:
    start_at = time.time() + 1.0  # every process starts checking at once
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(procs) as pool:
        counts = pool.map(_process_checks,
                          [(url, prefix, seconds, concurrency, start_at, mode)] * procs)
    return sum(counts) / seconds


async def gateway_requests(settings: Settings, n: int, seconds: float,
                           concurrency: int) -> tuple[list[float], float]:
    app = create_app(settings, environ={})
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    url = f"{base}/v1/chat/completions"
    body = {"model": "grok-4", "messages": [{"role": "user", "content": "hi"}],
            "mock": {"text": "ok"}}
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            async def one() -> None:
                async with http.post(url, json=body, headers=headers) as resp:
                    await resp.read()
                    assert resp.status == 200, resp.status

            for _ in range(200):  # warm up connections, caches, the script
                await one()
            timings = []
            for _ in range(n):
                t0 = time.perf_counter()
                await one()
                timings.append(time.perf_counter() - t0)
            stop = time.monotonic() + seconds
            done = 0

            async def worker() -> None:
                nonlocal done
                while time.monotonic() < stop:
                    await one()
                    done += 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return timings, done / seconds
    finally:
        await runner.cleanup()


def bench_settings(redis: dict[str, Any] | None) -> Settings:
    data: dict[str, Any] = {
        "upstream": {"url": "mock"},
        "keys": [{"name": "bench", "key": KEY, "requests_per_minute": 1e9,
                  "burst": 1_000_000_000, "max_concurrent_streams": 1000}],
    }
    if redis:
        data["redis"] = redis
    return settings_from(data)


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f} µs"


def timing_cells(timings: list[float]) -> list[str]:
    """The ``TIMINGS`` columns: mean, p50 and p99, as loadtest.py takes its percentiles."""
    return [us(statistics.fmean(timings)),
            *(us(loadtest.percentile(timings, p) or 0.0) for p in (50, 99))]


def section(title: str, head: list[str], rows: list[list[str]], *notes: str) -> None:
    """One section of the report: its title, its Markdown table, a line per note."""
    print("\n".join(["", title, "", *markdown(head, rows), *notes]), flush=True)


async def sequential_section(args: argparse.Namespace, prefix: str) -> None:
    """Section 1: one check at a time, each limiter, and Redis' round trip alone."""
    memory = await sequential_checks(MemoryLimiter(), args.checks)
    settings = RedisSettings(url=args.redis_url, key_prefix=prefix, timeout_seconds=2)
    client = connect(settings)
    limiter = RedisLimiter(client, settings)
    await sequential_checks(limiter, 200)  # loads the script
    red = await sequential_checks(limiter, args.checks)
    ping = []
    for _ in range(args.checks):
        t0 = time.perf_counter()
        await client.ping()
        ping.append(time.perf_counter() - t0)
    await limiter.close()
    await close(client)
    section("1. one check, sequential", ["", *TIMINGS], [
        ["memory limiter", *timing_cells(memory)],
        ["redis limiter (one EVALSHA round trip)", *timing_cells(red)],
        ["redis PING (the round trip alone)", *timing_cells(ping)]])


async def sustained_section(args: argparse.Namespace, prefix: str) -> None:
    """Section 2: the checks one process gets from one Redis, what each costs Redis, and the
    gateway's CPU per check by tasks in flight (what batching saves)."""
    before = await evalsha_stats(args.redis_url)
    one = await concurrent_checks(args.redis_url, prefix, args.seconds, args.concurrency)
    after = await evalsha_stats(args.redis_url)
    rows = [[f"1 process x {args.concurrency} tasks", f"{one / args.seconds:,.0f} checks/s"]]
    calls, usec = after[0] - before[0], after[1] - before[1]
    if calls:
        rows.append(["Redis CPU per check", f"{usec / calls:,.1f} µs: one Redis core tops out "
                                            f"near {calls / usec * 1e6:,.0f} checks/s"])
    in_flight = (1, 4, args.concurrency)
    for stream in (False, True):
        costs = []
        for concurrency in in_flight:
            cpu = time.process_time()
            done = await concurrent_checks(args.redis_url, prefix, args.seconds / 2,
                                           concurrency, stream=stream)
            costs.append(us((time.process_time() - cpu) / done))
        what = "stream (check, lease, release)" if stream else "check"
        rows.append([f"gateway CPU per {what}, by tasks in flight",
                     ", ".join(f"{n}: {c}" for n, c in zip(in_flight, costs, strict=True))])
    section("2. checks per second one Redis sustains (concurrent script calls)",
            ["", "measured"], rows)


async def gateway_section(args: argparse.Namespace, prefix: str) -> None:
    """Section 3: the same requests through a real gateway, memory limiter against Redis."""
    results = {}
    for name, redis in (("memory", None),
                        ("redis", {"url": args.redis_url, "key_prefix": prefix})):
        results[name] = await gateway_requests(bench_settings(redis), args.requests,
                                               args.seconds, args.concurrency)
    mean = statistics.fmean(results["redis"][0]) - statistics.fmean(results["memory"][0])
    p50 = statistics.median(results["redis"][0]) - statistics.median(results["memory"][0])
    section("3. through the gateway (POST chat/completions, mock upstream in-process)",
            ["limiter", *(f"sequential {t}" for t in TIMINGS), f"{args.concurrency} concurrent"],
            [[name, *timing_cells(timings), f"{rps:,.0f} req/s"]
             for name, (timings, rps) in results.items()],
            f"=> the Redis limiter adds {us(mean)} (mean), {us(p50)} (p50) per request")


async def evalsha_stats(*urls: str) -> tuple[int, int]:
    """(calls, microseconds) the Redis servers have spent in EVALSHA so far, summed."""
    calls = usec = 0
    for url in urls:
        client = aioredis.Redis.from_url(url)
        try:
            stats = await client.info("commandstats")
        finally:
            await client.aclose()
        entry = stats.get("cmdstat_evalsha", {})
        calls, usec = calls + int(entry.get("calls", 0)), usec + int(entry.get("usec", 0))
    return calls, usec


async def one_deployment(urls: list[str], mode: str, prefix: str, args: argparse.Namespace
                         ) -> list[str]:
    """Section 4's row for one deployment: sequential timings, then checks per second from one
    process, with the gateway's and Redis' CPU per check."""
    settings = RedisSettings(url=urls[0], key_prefix=prefix, timeout_seconds=2, mode=mode)
    client = connect(settings)
    limiter = RedisLimiter(client, settings)
    await sequential_checks(limiter, 200)  # loads the script, learns the slots
    seq = await sequential_checks(limiter, args.checks)
    await limiter.close()
    await close(client)
    before, cpu = await evalsha_stats(*urls), time.process_time()
    done = await concurrent_checks(urls[0], prefix, args.seconds, args.concurrency, mode)
    cpu, after = time.process_time() - cpu, await evalsha_stats(*urls)
    calls, usec = after[0] - before[0], after[1] - before[1]
    return [mode, *timing_cells(seq), f"{done / args.seconds:,.0f} checks/s", us(cpu / done),
            f"{usec / max(calls, 1):,.1f} µs"]


def cluster_vs_single(args: argparse.Namespace, prefix: str) -> None:
    head = ["", *(f"sequential {t}" for t in TIMINGS),
            f"1 process x {args.concurrency}", "gateway CPU per check", "Redis CPU per check"]
    if args.procs > 1:
        head.append(f"{args.procs} processes x {args.concurrency}")
    rows = []
    with private_redis(1) as single, private_redis(3, cluster=True) as nodes:
        for deployment, mode in ((single, "single"), (nodes, "cluster")):
            row = loadtest.run_loop(one_deployment(deployment, mode, prefix, args))
            if args.procs > 1:
                rate = many_processes(deployment[0], prefix, args.seconds, args.procs,
                                      args.concurrency, mode)
                row.append(f"{rate:,.0f} checks/s")
            rows.append(row)
    section("4. a 3-primary Redis Cluster vs one Redis (both private, on this host)", head, rows)


async def cleanup(url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(url)
    keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
    for i in range(0, len(keys), 500):
        await client.delete(*keys[i:i + 500])
    await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default=os.environ.get("GATEWAY_TEST_REDIS_URL",
                                                              "redis://127.0.0.1:6379/0"))
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--checks", type=int, default=5000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--procs", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--own-redis", action="store_true",
                        help="start a private redis-server on a free port")
    parser.add_argument("--cluster", action="store_true",
                        help="only section 4: a private 3-primary cluster vs a private Redis")
    args = parser.parse_args()
    prefix = f"gwbench:{uuid.uuid4().hex[:10]}"
    logging.basicConfig(level=logging.ERROR)
    if args.cluster:
        cluster_vs_single(args, prefix)
        return
    with contextlib.ExitStack() as servers:
        if args.own_redis:
            args.redis_url = servers.enter_context(private_redis(1))[0]
        try:
            for run in (sequential_section, sustained_section, gateway_section):
                loadtest.run_loop(run(args, prefix))
            if args.procs > 1:
                rate = many_processes(args.redis_url, prefix, args.seconds, args.procs,
                                      args.concurrency)
                print(f"\n{args.procs} processes x {args.concurrency} tasks: {rate:,.0f} checks/s "
                      "(section 2, several gateway workers)")
        finally:
            loadtest.run_loop(cleanup(args.redis_url, prefix))


@contextlib.contextmanager
def private_redis(count: int, cluster: bool = False) -> Iterator[list[str]]:
    """The URLs of ``count`` private redis-servers on free ports (with ``cluster``, joined into
    a cluster of as many primaries, no replicas), each with its folder in one temporary folder;
    all stopped and the folder removed at the end, however it ends."""
    with tempfile.TemporaryDirectory(prefix="gwbench-") as folder, \
            contextlib.ExitStack() as servers:
        urls = []
        for i in range(count):
            port = free_port()
            os.mkdir(f"{folder}/{i}")
            argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", f"{folder}/{i}"]
            if cluster:
                argv += ["--cluster-enabled", "yes", "--cluster-port", str(free_port())]
            servers.enter_context(started(argv, port))
            urls.append(f"redis://127.0.0.1:{port}/0")
        if cluster:
            _create_cluster(urls)
        yield urls


def _create_cluster(urls: list[str]) -> None:
    subprocess.run(["redis-cli", "--cluster", "create",
                    *(u.removeprefix("redis://").removesuffix("/0") for u in urls),
                    "--cluster-replicas", "0", "--cluster-yes"],
                   check=True, capture_output=True, timeout=60)
    for _ in range(250):
        info = subprocess.run(["redis-cli", "-u", urls[0], "cluster", "info"],
                              capture_output=True, text=True).stdout
        if "cluster_state:ok" in info:
            return
        time.sleep(0.05)
    raise SystemExit("the cluster did not come up")


if __name__ == "__main__":
    main()
