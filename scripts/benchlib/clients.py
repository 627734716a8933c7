"""The load clients, one run each.

scripts/loadtest.py verifies every stream and measures itself (the cores it used, how late its
loop ran), so that a run can tell when the client was what limited it; it runs in client
processes of its own, forked from this one. wrk is C and leaves the CPU to the servers, but
parses nothing: the scenarios that need raw throughput use it when it is installed.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import loadtest

from .processes import Target, child_cpu, cpu_seconds
from .proxies import KEY


def load(base: str, *, concurrency: int, requests: int | None = None,
         duration: float | None = None, mock: dict[str, Any] | None = None,
         processes: int = 1, plain: bool = False, events: int | None = None,
         gaps: bool = False, stall_ms: float | None = None, timeout: float = 600,
         checksum: bool = False, warmup: int = 0, include_usage: bool = False
         ) -> dict[str, Any]:
    """One scripts/loadtest.py run in ``processes`` client processes of its own."""
    argv = ["--url", base, "--key", KEY, "--concurrency", str(concurrency), "--quiet",
            "--timeout", str(timeout), "--processes", str(processes), "--warmup", str(warmup)]
    argv += ["--requests", str(requests)] if requests is not None else []
    argv += ["--duration", str(duration)] if duration is not None else []
    argv += ["--mock", json.dumps(mock)] if mock is not None else []
    argv += ["--events", str(events)] if events is not None else []
    argv += ["--stall-ms", str(stall_ms)] if stall_ms is not None else []
    argv += [flag for flag, on in (("--plain", plain), ("--gaps", gaps),
                                   ("--checksum", checksum),
                                   ("--include-usage", include_usage)) if on]
    return loadtest.measure(loadtest.parse_args(argv), fork=True)


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
"""
WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def wrk(base: str, tmp: Path, body: dict[str, Any], *, connections: int, seconds: float,
        threads: int = 1, latency: bool = False) -> dict[str, Any]:
    """One wrk run (C: it leaves the CPU to the servers; it does not parse the streams, the
    other scenarios verify every byte): requests/s, failures, p99 in ms with ``latency``, and
    wrk's own CPU seconds."""
    text = json.dumps({"model": "grok-4", "messages": [{"role": "user", "content": "hi"}],
                       **body})
    script = tmp / "wrk.lua"
    script.write_text(WRK_SCRIPT.format(body=text, key=KEY))
    threads = max(1, min(threads, connections))
    c0 = child_cpu()
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "-s",
         str(script), *(["--latency"] if latency else []), base + "/chat/completions"],
        capture_output=True, text=True, check=True).stdout
    cpu = child_cpu() - c0
    rate = next(line for line in out.splitlines() if line.startswith("Requests/sec:"))
    failed = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       out)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    return {"requests_per_s": float(rate.split()[1]),
            "failed": int(failed.group(1)) if failed else 0,
            "socket_errors": sum(map(int, errors.groups())) if errors else 0,
            "p99_ms": round(float(p99.group(1)) * WRK_UNITS[p99.group(2)], 3) if p99 else None,
            "client_cpu_s": cpu, "output": out}


def wrk_chunks_per_s(base: str, tmp: Path, *, connections: int, chunks: int,
                     seconds: float, threads: int = 1) -> tuple[float, float]:
    """Chunks per second of bursts with wrk as the client, and wrk's CPU seconds."""
    r = wrk(base, tmp, {"stream": True, "mock": {"chunks": chunks}}, connections=connections,
            seconds=seconds, threads=threads)
    if r["failed"]:
        raise RuntimeError(f"wrk saw failed requests:\n{r['output']}")
    # content chunks, the finish chunk, [DONE]
    return r["requests_per_s"] * (chunks + 2), r["client_cpu_s"]


def measured(target: Target, redis: int | None = None, **kw: Any) -> dict[str, Any]:
    """A load run with the CPU that ``target`` (and, given its pid, Redis) used meanwhile."""
    c0, r0 = target.cpu(), cpu_seconds(redis) if redis else 0.0
    result = load(target.base, **kw)
    result["cpu_s"] = target.cpu() - c0
    if redis:
        result["redis_cpu_s"] = cpu_seconds(redis) - r0
    result["rss"] = target.rss()
    if result["errors"]:
        raise RuntimeError(f"{target.name}: {result['errors']} failed streams: "
                           f"{result['error_kinds']}")
    return result
