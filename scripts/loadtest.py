#!/usr/bin/env python3
"""Load generator for any OpenAI-compatible streaming endpoint (the gateway, nginx, the mock).

Runs concurrent chat-completion streams for a bounded count or duration, verifies every stream
(status 200, ends with ``data: [DONE]``, no error frame, optional byte checksum), and reports
requests/s, chunks/s, time-to-first-byte and stream-duration percentiles, errors and 429s, with
a live progress line on stderr and a JSON summary on stdout.

    python scripts/loadtest.py --url http://127.0.0.1:8080/api/v1 --key sk-gateway-demo \\
        --concurrency 50 --requests 500 --mock '{"chunks": 50, "chunk_delay": 0.02}'

``--mock`` is passed as the request body's ``mock`` object, which the built-in mock upstream
reads (chunk count, size, pacing); a real upstream ignores it... or rejects it, so leave it out.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Stats:
    started: float = field(default_factory=time.perf_counter)
    ok: int = 0
    errors: int = 0
    rate_limited: int = 0
    chunks: int = 0
    bytes: int = 0
    ttfb: list[float] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    error_kinds: dict[str, int] = field(default_factory=dict)
    digests: set[str] = field(default_factory=set)

    def fail(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


async def one_stream(session: aiohttp.ClientSession, url: str, body: bytes,
                     headers: dict[str, str], stats: Stats, checksum: bool) -> None:
    start = time.perf_counter()
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
            first = None
            tail = b""
            digest = hashlib.sha256() if checksum else None
            n = 0
            async for piece in r.content.iter_any():
                if first is None and piece.strip(b": keep-alive\n"):
                    first = time.perf_counter()
                n += piece.count(b"\n\ndata: ") + piece.startswith(b"data: ")
                stats.bytes += len(piece)
                if digest is not None:
                    digest.update(piece)
                tail = (tail + piece)[-64:]
                if b'"error"' in piece:
                    stats.fail("error_frame")
                    return
            if not tail.endswith(b"data: [DONE]\n\n"):
                stats.fail("no_done")
                return
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        stats.fail(type(e).__name__)
        return
    end = time.perf_counter()
    stats.ok += 1
    stats.chunks += n
    stats.ttfb.append((first or end) - start)
    stats.durations.append(end - start)
    if digest is not None:
        stats.digests.add(digest.hexdigest())


async def run(args: argparse.Namespace) -> dict[str, Any]:
    url = args.url.rstrip("/") + "/chat/completions"
    body_obj: dict[str, Any] = {
        "model": args.model, "stream": True,
        "messages": [{"role": "user", "content": "x" * args.prompt_bytes}]}
    if args.mock:
        body_obj["mock"] = json.loads(args.mock)
    body = json.dumps(body_obj).encode()
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if args.key:
        headers["Authorization"] = f"Bearer {args.key}"
    stats = Stats()
    deadline = stats.started + args.duration if args.duration else None
    total = args.requests
    issued = 0
    interval = 1.0 / args.rate if args.rate else 0.0
    connector = aiohttp.TCPConnector(limit=0, force_close=args.no_keepalive)
    timeout = aiohttp.ClientTimeout(total=args.timeout)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def worker() -> None:
            nonlocal issued
            while (total is None or issued < total) and (deadline is None
                                                         or time.perf_counter() < deadline):
                issued += 1
                if interval:
                    await asyncio.sleep(max(0.0, stats.started + issued * interval
                                            - time.perf_counter()))
                await one_stream(session, url, body, headers, stats, args.checksum)

        async def progress() -> None:
            while True:
                await asyncio.sleep(1)
                elapsed = time.perf_counter() - stats.started
                print(f"\r{elapsed:6.1f}s ok={stats.ok} err={stats.errors} "
                      f"429={stats.rate_limited} {stats.ok / elapsed:8.1f} req/s "
                      f"{stats.chunks / elapsed:9.0f} chunks/s", end="", file=sys.stderr)

        ticker = asyncio.create_task(progress()) if not args.quiet else None
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        if ticker is not None:
            ticker.cancel()
            print(file=sys.stderr)
    elapsed = time.perf_counter() - stats.started

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 3)

    return {
        "url": url, "concurrency": args.concurrency, "elapsed_s": round(elapsed, 3),
        "ok": stats.ok, "errors": stats.errors, "rate_limited": stats.rate_limited,
        "error_kinds": stats.error_kinds,
        "requests_per_s": round(stats.ok / elapsed, 2),
        "chunks_per_s": round(stats.chunks / elapsed, 1),
        "bytes": stats.bytes,
        "ttfb_ms": {p: ms(percentile(stats.ttfb, q)) for p, q in
                    (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        "duration_ms": {p: ms(percentile(stats.durations, q)) for p, q in
                        (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        "distinct_checksums": len(stats.digests) if args.checksum else None,
    }


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
    p.add_argument("--checksum", action="store_true",
                   help="hash every stream's bytes; identical streams give one checksum")
    p.add_argument("--no-keepalive", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    args = p.parse_args(argv)
    if args.requests is None and args.duration is None:
        p.error("give --requests or --duration (the load must be bounded)")
    return args


def main(argv: list[str] | None = None) -> int:
    summary = asyncio.run(run(parse_args(argv)))
    print(json.dumps(summary, indent=2))
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
