#!/usr/bin/env python3
"""Load generator for any OpenAI-compatible streaming endpoint (the gateway, nginx, the mock).

Runs concurrent chat completions (streamed, or plain with ``--plain``) for a bounded count or
duration, verifies every one (status 200; a stream ends with ``data: [DONE]``, carries no error
frame and, with ``--events``, exactly that many data events; a plain answer is a JSON object
with ``choices``; optional byte checksum), and reports requests/s, chunks/s, time-to-first-byte
and duration percentiles, errors and 429s, with a live progress line on stderr and a JSON summary
on stdout.

    python scripts/loadtest.py --url http://127.0.0.1:8080/api/v1 --key sk-gateway-demo \\
        --concurrency 50 --requests 500 --mock '{"chunks": 50, "chunk_delay": 0.02}'

``--mock`` is passed as the request body's ``mock`` object, which the built-in mock upstream
reads (chunk count, size, pacing); a real upstream ignores it... or rejects it, so leave it out.

The client measures itself, so that a run can tell whether the client was what limited it:
``client_cores`` (CPU seconds per second of the client processes) and ``loop_lag_ms`` (how late
a short timer fires in the client's event loop). ``--processes N`` splits the load over N client
processes (one event loop each) when one is too slow. ``--gaps`` records the time between
consecutive data events as the client reads them (``gap_ms``; events that arrive in one read
are 0 apart), and ``--stall-ms`` counts the streams with a gap above it (``stalled``).
``--warmup N`` sends N requests on each connection before the clock starts (latency at
concurrency 1 on a kept-alive connection, as gateway benchmarks report it).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import resource
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import aiohttp

try:
    import uvloop
except ImportError:  # the client is lighter on uvloop, but runs without it
    uvloop = None  # type: ignore[assignment]

T = TypeVar("T")
LAG_PROBE_SECONDS = 0.005
DATA = b"\ndata: "  # an event's data line; a stream is read with b"\n" before its first byte


@dataclass
class Stats:
    started: float = field(default_factory=time.perf_counter)
    elapsed: float = 0.0
    cpu_s: float = 0.0  # CPU time of the client process(es)
    processes: int = 1
    ok: int = 0
    errors: int = 0
    rate_limited: int = 0
    stalled: int = 0  # streams with an inter-event gap above --stall-ms (counted in ok)
    chunks: int = 0
    bytes: int = 0
    ttfb: list[float] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    max_gaps: list[float] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)
    error_kinds: dict[str, int] = field(default_factory=dict)
    digests: set[str] = field(default_factory=set)

    def fail(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1

    def merge(self, other: Stats) -> None:
        """Add another client process's results (they ran at the same time)."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name == "started":
                continue
            if f.name == "elapsed":
                self.elapsed = max(mine, theirs)
            elif isinstance(mine, list):
                mine.extend(theirs)
            elif isinstance(mine, set):
                mine.update(theirs)
            elif isinstance(mine, dict):
                for k, v in theirs.items():
                    mine[k] = mine.get(k, 0) + v
            else:
                setattr(self, f.name, mine + theirs)


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


async def one_stream(session: aiohttp.ClientSession, url: str, body: bytes,
                     headers: dict[str, str], stats: Stats, args: argparse.Namespace) -> None:
    start = time.perf_counter()
    first = None
    try:
        async with session.post(url, data=body, headers=headers) as r:
            if r.status == 429:
                stats.rate_limited += 1
                await r.read()
                return
            if r.status != 200:
                stats.fail(f"http_{r.status}")
                await r.read()
                return
            if args.plain:
                answer = await r.read()
                first = time.perf_counter()
                stats.bytes += len(answer)
                if not answer.startswith(b"{") or b'"choices"' not in answer:
                    stats.fail("not_a_completion")
                    return
                n = 1
            else:
                digest = hashlib.sha256() if args.checksum else None
                record_gaps = args.gaps or args.stall_ms is not None
                gaps: list[float] = []
                carry = b"\n"  # the last len(DATA) - 1 bytes read: no whole DATA fits in it
                last = b""
                n = 0
                previous = 0.0
                async for piece in r.content.iter_any():
                    now = time.perf_counter()
                    seen = carry + piece
                    k = seen.count(DATA)
                    if k:
                        if first is None:
                            first = now
                        elif record_gaps:
                            gaps.append(now - previous)
                        if record_gaps and k > 1:
                            gaps.extend([0.0] * (k - 1))
                        previous = now
                        n += k
                    carry = seen[-(len(DATA) - 1):]
                    last = (last + piece)[-64:] if len(piece) < 64 else piece[-64:]
                    stats.bytes += len(piece)
                    if digest is not None:
                        digest.update(piece)
                    if b'"error"' in seen:
                        stats.fail("error_frame")
                        return
                if not last.endswith(b"data: [DONE]\n\n"):
                    stats.fail("no_done")
                    return
                if args.events is not None and n != args.events:
                    stats.fail("frames_missing" if n < args.events else "frames_extra")
                    return
                if record_gaps:
                    worst = max(gaps, default=0.0)
                    stats.max_gaps.append(worst)
                    if args.gaps:
                        stats.gaps += gaps
                    if args.stall_ms is not None and worst * 1000 > args.stall_ms:
                        stats.stalled += 1
                if digest is not None:
                    stats.digests.add(digest.hexdigest())
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        stats.fail(type(e).__name__)
        return
    end = time.perf_counter()
    stats.ok += 1
    stats.chunks += n
    stats.ttfb.append((first or end) - start)
    stats.durations.append(end - start)


async def probe_lag(stats: Stats) -> None:
    """How late the client's own loop runs a timer: a loaded client delays every reading."""
    while True:
        t = time.perf_counter()
        await asyncio.sleep(LAG_PROBE_SECONDS)
        stats.lag.append(max(0.0, time.perf_counter() - t - LAG_PROBE_SECONDS))


async def collect(args: argparse.Namespace) -> Stats:
    """Run the load in this process; the raw results."""
    url = args.url.rstrip("/") + "/chat/completions"
    body_obj: dict[str, Any] = {
        "model": args.model, "stream": not args.plain,
        "messages": [{"role": "user", "content": "x" * args.prompt_bytes}]}
    if args.mock:
        body_obj["mock"] = json.loads(args.mock)
    if args.include_usage:
        body_obj["stream_options"] = {"include_usage": True}
    body = json.dumps(body_obj).encode()
    headers = {"Content-Type": "application/json",
               "Accept": "application/json" if args.plain else "text/event-stream"}
    if args.key:
        headers["Authorization"] = f"Bearer {args.key}"
    connector = aiohttp.TCPConnector(limit=0, force_close=args.no_keepalive)
    timeout = aiohttp.ClientTimeout(total=args.timeout)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def warm(unseen: Stats) -> None:
            for _ in range(args.warmup):
                await one_stream(session, url, body, headers, unseen, args)

        # The workers' connections open and used before the clock starts.
        await asyncio.gather(*(warm(Stats()) for _ in range(args.concurrency)))
        cpu0 = _own_cpu()
        stats = Stats()
        deadline = stats.started + args.duration if args.duration else None
        total = args.requests
        issued = 0
        interval = 1.0 / args.rate if args.rate else 0.0

        async def worker() -> None:
            nonlocal issued
            while (total is None or issued < total) and (deadline is None
                                                         or time.perf_counter() < deadline):
                issued += 1
                if interval:
                    await asyncio.sleep(max(0.0, stats.started + issued * interval
                                            - time.perf_counter()))
                await one_stream(session, url, body, headers, stats, args)

        async def progress() -> None:
            while True:
                await asyncio.sleep(1)
                elapsed = time.perf_counter() - stats.started
                print(f"\r{elapsed:6.1f}s ok={stats.ok} err={stats.errors} "
                      f"429={stats.rate_limited} {stats.ok / elapsed:8.1f} req/s "
                      f"{stats.chunks / elapsed:9.0f} chunks/s", end="", file=sys.stderr)

        ticker = asyncio.create_task(progress()) if not args.quiet else None
        lag = asyncio.create_task(probe_lag(stats))
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        lag.cancel()
        if ticker is not None:
            ticker.cancel()
            print(file=sys.stderr)
    stats.elapsed = time.perf_counter() - stats.started
    stats.cpu_s = _own_cpu() - cpu0
    return stats


def summarize(args: argparse.Namespace, stats: Stats) -> dict[str, Any]:
    elapsed = max(stats.elapsed, 1e-9)

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    def spread(values: list[float]) -> dict[str, float | None]:
        return {p: ms(percentile(values, q)) for p, q in
                (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))}

    summary: dict[str, Any] = {
        "url": args.url.rstrip("/") + "/chat/completions", "concurrency": args.concurrency,
        "elapsed_s": round(elapsed, 3),
        "ok": stats.ok, "errors": stats.errors, "rate_limited": stats.rate_limited,
        "error_kinds": stats.error_kinds,
        "requests_per_s": round(stats.ok / elapsed, 2),
        "chunks_per_s": round(stats.chunks / elapsed, 1),
        "bytes": stats.bytes,
        "ttfb_ms": spread(stats.ttfb),
        "duration_ms": spread(stats.durations),
        "distinct_checksums": len(stats.digests) if args.checksum else None,
        "processes": stats.processes,
        "client_cpu_s": round(stats.cpu_s, 3),
        "client_cores": round(stats.cpu_s / elapsed, 2),
        "loop_lag_ms": spread(stats.lag),
    }
    if args.gaps:
        summary["gap_ms"] = spread(stats.gaps)
    if args.gaps or args.stall_ms is not None:
        summary["max_gap_ms"] = spread(stats.max_gaps)
        summary["stalled"] = stats.stalled
    return summary


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """The load in this process, on the running loop: the summary."""
    return summarize(args, await collect(args))


def measure(args: argparse.Namespace, fork: bool = False) -> dict[str, Any]:
    """The summary of a run over ``args.processes`` client processes (``fork``: even of one, so
    that this process's own state and CPU stay out of it). Call it with no loop running."""
    n = max(1, min(args.processes, args.concurrency))
    if n == 1 and not fork:
        return summarize(args, run_loop(collect(args)))
    ctx = multiprocessing.get_context("fork")  # the children start at once, with args as they are
    children = []
    for share in split(args, n):
        receive, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_collect_in_child, args=(share, send), daemon=True)
        child.start()
        send.close()
        children.append((child, receive))
    stats: Stats | None = None
    for child, receive in children:
        try:
            part = receive.recv()
        except EOFError:
            raise RuntimeError(f"a load client process died (exit code {child.exitcode})") \
                from None
        child.join()
        if stats is None:
            stats = part
        else:
            stats.merge(part)
    assert stats is not None
    return summarize(args, stats)


def split(args: argparse.Namespace, n: int) -> list[argparse.Namespace]:
    """``args`` for each of ``n`` processes: the concurrency, count and rate shared out."""
    shares = []
    below = 0  # the concurrency of the shares before this one
    for i in range(n):
        c = args.concurrency // n + (i < args.concurrency % n)
        share = argparse.Namespace(**vars(args))
        share.concurrency, share.processes, share.quiet = c, 1, args.quiet or i > 0
        if args.requests is not None:
            share.requests = (args.requests * (below + c) // args.concurrency
                              - args.requests * below // args.concurrency)
        if args.rate:
            share.rate = args.rate * c / args.concurrency
        below += c
        shares.append(share)
    return shares


def _collect_in_child(args: argparse.Namespace,
                      send: multiprocessing.connection.Connection) -> None:
    send.send(run_loop(collect(args)))
    send.close()


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a new event loop (uvloop's when installed)."""
    factory = uvloop.new_event_loop if uvloop is not None else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8080/api/v1")
    p.add_argument("--key", default="", help="API key (Bearer)")
    p.add_argument("--model", default="grok-4")
    p.add_argument("--prompt-bytes", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--requests", type=int, help="stop after this many streams")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--rate", type=float, help="streams started per second, at most")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--mock", help="JSON object sent as the body's 'mock' (mock upstream only)")
    p.add_argument("--include-usage", action="store_true",
                   help="ask for the stream's usage (stream_options.include_usage)")
    p.add_argument("--checksum", action="store_true",
                   help="hash every stream's bytes; identical streams give one checksum")
    p.add_argument("--plain", action="store_true",
                   help="plain (non-streamed) chat completions; ttfb is then the whole answer")
    p.add_argument("--events", type=int,
                   help="a stream must carry exactly this many data events ([DONE] included)")
    p.add_argument("--gaps", action="store_true",
                   help="record the gaps between consecutive data events (gap_ms)")
    p.add_argument("--stall-ms", type=float,
                   help="count streams with a gap between data events above this (stalled)")
    p.add_argument("--warmup", type=int, default=0,
                   help="requests per connection before the clock starts (not counted)")
    p.add_argument("--processes", type=int, default=1,
                   help="client processes to split the load over (one event loop each)")
    p.add_argument("--no-keepalive", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    args = p.parse_args(argv)
    if args.requests is None and args.duration is None:
        p.error("give --requests or --duration (the load must be bounded)")
    if args.processes < 1:
        p.error("--processes must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    summary = measure(parse_args(argv))
    print(json.dumps(summary, indent=2))
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
