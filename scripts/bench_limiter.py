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
import multiprocessing
import os
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from gateway.app import create_app
from gateway.ratelimit.memory import MemoryLimiter
from gateway.ratelimit.redis import RedisLimiter
from gateway.redis.topology import close, connect
from gateway.request_info import ClientKey
from gateway.settings import RedisSettings, Settings

KEY = "sk-bench-000000000000000001"
BIG = ClientKey(name="bench", requests_per_minute=1e9, burst=1_000_000_000,
                max_concurrent_streams=1000)


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def sequential_checks(limiter: Any, n: int) -> list[float]:
    timings = []
    for i in range(n):
        key = BIG if i % 2 else ClientKey(name=f"bench-{i % 64}", requests_per_minute=1e9,
                                          burst=1_000_000_000, max_concurrent_streams=1000)
        started = time.perf_counter()
        await limiter.acquire(key, stream=False)
        timings.append(time.perf_counter() - started)
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
    _use_uvloop()
    time.sleep(max(0.0, start_at - time.time()))
    return asyncio.run(concurrent_checks(url, prefix, seconds, concurrency, mode))


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
                started = time.perf_counter()
                await one()
                timings.append(time.perf_counter() - started)
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
    return Settings.from_mapping(data)


def us(seconds: float) -> str:
    return f"{seconds * 1e6:8.1f} µs"


def summary(timings: list[float]) -> str:
    timings = sorted(timings)
    p99 = timings[int(len(timings) * 0.99)]
    return (f"mean {us(statistics.fmean(timings))}  p50 {us(timings[len(timings) // 2])}  "
            f"p99 {us(p99)}")


async def main_async(args: argparse.Namespace, prefix: str) -> None:
    import logging
    logging.basicConfig(level=logging.ERROR)

    print("1. one check, sequential")
    memory = MemoryLimiter()
    mem = await sequential_checks(memory, args.checks)
    print(f"   memory limiter      {summary(mem)}")
    settings = RedisSettings(url=args.redis_url, key_prefix=prefix, timeout_seconds=2)
    client = connect(settings)
    limiter = RedisLimiter(client, settings)
    await sequential_checks(limiter, 200)  # loads the script
    red = await sequential_checks(limiter, args.checks)
    print(f"   redis limiter       {summary(red)}   (one EVALSHA round trip)")
    ping = []
    for _ in range(args.checks):
        started = time.perf_counter()
        await client.ping()
        ping.append(time.perf_counter() - started)
    print(f"   redis PING          {summary(ping)}   (the round trip alone)")
    await limiter.close()
    await close(client)

    print("2. checks per second one Redis sustains (concurrent script calls)")
    before = await evalsha_stats(args.redis_url)
    one = await concurrent_checks(args.redis_url, prefix, args.seconds, args.concurrency)
    after = await evalsha_stats(args.redis_url)
    print(f"   1 process x {args.concurrency} tasks    {one / args.seconds:10,.0f} checks/s")
    calls, usec = after[0] - before[0], after[1] - before[1]
    if calls:
        print(f"   Redis CPU per check {usec / calls:8.1f} µs  => one Redis core tops out near "
              f"{calls / usec * 1e6:,.0f} checks/s")
    for stream in (False, True):  # what batching saves the gateway: CPU by tasks in flight
        costs = []
        for concurrency in (1, 4, args.concurrency):
            cpu = time.process_time()
            done = await concurrent_checks(args.redis_url, prefix, args.seconds / 2,
                                           concurrency, stream=stream)
            costs.append(f"{concurrency}: {us((time.process_time() - cpu) / done)}")
        print(f"   gateway CPU per {'stream (check, lease, release)' if stream else 'check'}"
              f" by tasks in flight: {', '.join(costs)}")

    print("3. through the gateway (POST chat/completions, mock upstream in-process)")
    results = {}
    for name, redis in (("memory", None),
                        ("redis", {"url": args.redis_url, "key_prefix": prefix})):
        timings, rps = await gateway_requests(bench_settings(redis), args.requests,
                                              args.seconds, args.concurrency)
        results[name] = (timings, rps)
        print(f"   {name:6} limiter  sequential {summary(timings)}   "
              f"{args.concurrency} concurrent: {rps:8,.0f} req/s")
    cost = statistics.fmean(results["redis"][0]) - statistics.fmean(results["memory"][0])
    cost50 = (statistics.median(results["redis"][0])
              - statistics.median(results["memory"][0]))
    print(f"   => the Redis limiter adds {us(cost)} (mean), {us(cost50)} (p50) per request")


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
                         ) -> None:
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
    print(f"   {mode:8} sequential {summary(seq)}")
    print(f"   {mode:8} 1 process x {args.concurrency}: {done / args.seconds:8,.0f} checks/s, "
          f"gateway CPU {us(cpu / done)}/check, Redis CPU {usec / max(calls, 1):6.1f} µs/check")


def cluster_vs_single(args: argparse.Namespace, prefix: str) -> None:
    print("4. a 3-primary Redis Cluster vs one Redis (both private, on this host)")
    with private_redis(1) as single, private_redis(3, cluster=True) as nodes:
        for deployment, mode in ((single, "single"), (nodes, "cluster")):
            asyncio.run(one_deployment(deployment, mode, prefix, args))
            if args.procs > 1:
                rate = many_processes(deployment[0], prefix, args.seconds, args.procs,
                                      args.concurrency, mode)
                print(f"   {mode:8} {args.procs} processes x {args.concurrency}: "
                      f"{rate:8,.0f} checks/s")


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
    _use_uvloop()
    if args.cluster:
        cluster_vs_single(args, prefix)
        return
    with contextlib.ExitStack() as servers:
        if args.own_redis:
            args.redis_url = servers.enter_context(private_redis(1))[0]
        try:
            asyncio.run(main_async(args, prefix))
            if args.procs > 1:
                rate = many_processes(args.redis_url, prefix, args.seconds, args.procs,
                                      args.concurrency)
                print(f"   {args.procs} processes x {args.concurrency} tasks "
                      f"{rate:10,.0f} checks/s   (section 2, several gateway workers)")
        finally:
            asyncio.run(cleanup(args.redis_url, prefix))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int) -> None:
    for _ in range(250):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise SystemExit(f"redis-server on port {port} did not start")


@contextlib.contextmanager
def private_redis(count: int, cluster: bool = False) -> Iterator[list[str]]:
    """The URLs of ``count`` private redis-servers on free ports (with ``cluster``, joined into
    a cluster of as many primaries, no replicas), each with its folder in one temporary folder;
    all killed and the folder removed at the end, however it ends."""
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="gwbench-") as folder:
        try:
            urls = []
            for i in range(count):
                port = _free_port()
                os.mkdir(f"{folder}/{i}")
                argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save",
                        "", "--appendonly", "no", "--dir", f"{folder}/{i}"]
                if cluster:
                    argv += ["--cluster-enabled", "yes", "--cluster-port", str(_free_port())]
                procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))
                _wait_port(port)
                urls.append(f"redis://127.0.0.1:{port}/0")
            if cluster:
                _create_cluster(urls)
            yield urls
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()


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
