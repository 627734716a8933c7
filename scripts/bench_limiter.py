"""What the rate limiter costs: per check, per gateway request, and how many checks one Redis
sustains from gateway processes.

    python scripts/bench_limiter.py [--redis-url URL | --own-redis] [--seconds 3] [--procs 4]

Measures, with real servers on loopback:

1. one check, sequentially: ``MemoryLimiter.acquire`` vs ``RedisLimiter.acquire`` (one script
   call, one round trip);
2. checks per second one Redis sustains: concurrent script calls from 1 and from ``--procs``
   processes (each one event loop, as a gateway worker is), and the Redis CPU time per check
   (``INFO commandstats``), whose inverse bounds what one Redis core can serve;
3. the limiter's cost per gateway request: the same requests through a real gateway (mock
   upstream in-process) with the memory limiter and with the Redis limiter, sequential
   latency and concurrent throughput.

All keys live under a fresh ``gwbench:<random>`` prefix and are deleted at the end.
``--own-redis`` starts a private redis-server on a free port instead (clean server-side numbers
on a Redis that others also use).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import statistics
import subprocess
import time
import uuid
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from gateway.app import create_app
from gateway.ratelimit.memory import MemoryLimiter
from gateway.ratelimit.redis import RedisLimiter
from gateway.redisclient import connect
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


async def concurrent_checks(url: str, prefix: str, seconds: float, concurrency: int) -> int:
    settings = RedisSettings(url=url, key_prefix=prefix, timeout_seconds=2)
    client = connect(settings)
    limiter = RedisLimiter(client, settings)
    stop = time.monotonic() + seconds
    done = 0

    async def worker(w: int) -> None:
        nonlocal done
        key = ClientKey(name=f"bench-c{os.getpid()}-{w % 32}", requests_per_minute=1e9,
                        burst=1_000_000_000, max_concurrent_streams=1000)
        while time.monotonic() < stop:
            await limiter.acquire(key, stream=False)
            done += 1

    try:
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    finally:
        await limiter.close()
        await client.aclose()
    return done


def _process_checks(args: tuple[str, str, float, int, float]) -> int:
    url, prefix, seconds, concurrency, start_at = args
    _use_uvloop()
    time.sleep(max(0.0, start_at - time.time()))
    return asyncio.run(concurrent_checks(url, prefix, seconds, concurrency))


def many_processes(url: str, prefix: str, seconds: float, procs: int, concurrency: int) -> float:
    start_at = time.time() + 1.0  # every process starts checking at once
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(procs) as pool:
        counts = pool.map(_process_checks,
                          [(url, prefix, seconds, concurrency, start_at)] * procs)
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
    await client.aclose()

    print("2. checks per second one Redis sustains (concurrent script calls)")
    before = await evalsha_stats(args.redis_url)
    one = await concurrent_checks(args.redis_url, prefix, args.seconds, args.concurrency)
    after = await evalsha_stats(args.redis_url)
    print(f"   1 process x {args.concurrency} tasks    {one / args.seconds:10,.0f} checks/s")
    calls, usec = after[0] - before[0], after[1] - before[1]
    if calls:
        print(f"   Redis CPU per check {usec / calls:8.1f} µs  => one Redis core tops out near "
              f"{calls / usec * 1e6:,.0f} checks/s")

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


async def evalsha_stats(url: str) -> tuple[int, int]:
    """(calls, microseconds) Redis has spent in EVALSHA so far."""
    client = aioredis.Redis.from_url(url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    entry = stats.get("cmdstat_evalsha", {})
    return int(entry.get("calls", 0)), int(entry.get("usec", 0))


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
    args = parser.parse_args()
    prefix = f"gwbench:{uuid.uuid4().hex[:10]}"
    _use_uvloop()
    server = None
    if args.own_redis:
        server, args.redis_url = start_redis()
    try:
        asyncio.run(main_async(args, prefix))
        if args.procs > 1:
            rate = many_processes(args.redis_url, prefix, args.seconds, args.procs,
                                  args.concurrency)
            print(f"   {args.procs} processes x {args.concurrency} tasks "
                  f"{rate:10,.0f} checks/s   (section 2, several gateway workers)")
    finally:
        asyncio.run(cleanup(args.redis_url, prefix))
        if server is not None:
            server.kill()
            server.wait()


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(250):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, url
        time.sleep(0.02)
    proc.kill()
    raise SystemExit("redis-server did not start")


if __name__ == "__main__":
    main()
