#!/usr/bin/env python3
"""A/B: the gateway's CPU per stream at another commit against this tree's, in one run.

A change of a few percent is smaller than what a small machine drifts between two runs of
scripts/bench.py. So both gateways run at once (the other commit from a git worktree), with
nginx beside them, against one mock upstream and one Redis, and each round runs every load
against each of the three in turn, the order alternating. Medians over the rounds; "lower in"
counts the rounds where this tree's gateway cost less than the other's in the same round, and
the middle half of the rounds' changes shows the spread (one that straddles zero is noise: the
paced and long loads drift the most between identical trees; docs/performance.md says how much).

    python scripts/bench_ab.py BASE [--rounds N] [--loads one,one_read,paced,long] [--no-redis]
                                    [--budget] [--include-usage]

--budget gives this tree's key token and spend limits that no load reaches (every request then
reserves and settles: what the checks cost), the base's none. --include-usage: every request
asks for its usage, so that an upstream sends both gateways the same stream (one that does not
ask gets, from a gateway that asks for it itself, the stream of one that does).

Loads (CPU of the proxy process per stream; nginx's for the ratio; each one's size in LOADS):
  one       streams of one event, a few at a time, on kept-alive connections: a request's cost
  one_read  streams whose events all arrive in one read, a few at a time
  paced     many concurrent paced streams, each on a new connection
  long      a few long streams of events close together: nearly all per event
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from benchlib.clients import load
from benchlib.processes import ROOT, Target
from benchlib.proxies import gateway_started, nginx_started, redis_available
from benchlib.rounds import median
from benchlib.upstreams import upstream_group

from gateway.mock.ports import free_port

LOADS: dict[str, dict[str, Any]] = {
    "one": {"concurrency": 20, "requests": 3000, "mock": {"chunks": 1}},
    "one_read": {"concurrency": 20, "requests": 2000, "mock": {"chunks": 100}},
    "paced": {"concurrency": 200, "requests": 200, "mock": {"chunks": 50, "chunk_delay": 0.02}},
    "long": {"concurrency": 20, "requests": 20, "mock": {"chunks": 500, "chunk_delay": 0.002}},
}
REDIS_URL = "redis://127.0.0.1:6379/0"


@contextlib.contextmanager
def worktree(rev: str, where: Path) -> Any:
    """``rev`` checked out in ``where`` (a detached git worktree), removed afterwards."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(where),
                    rev], check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)],
                       check=False, capture_output=True)


def gateway(st: contextlib.ExitStack, tmp: Path, name: str, tree: Path, up: int,
            redis: str | None, budget: bool = False) -> Target:
    port = free_port()
    proc = st.enter_context(gateway_started(tmp, up, redis, port, tree=tree, budget=budget))
    return Target(name, proc, f"http://127.0.0.1:{port}/api/v1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="the commit to compare this tree against (HEAD, main~3, a sha)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--loads", default=",".join(LOADS), help="comma-separated, of: " + "; ".join(
        f"{name} {json.dumps(size)}" for name, size in LOADS.items()))
    p.add_argument("--no-redis", action="store_true", help="the in-process limiter")
    p.add_argument("--clients", type=int, default=2, help="load client processes")
    p.add_argument("--include-usage", action="store_true",
                   help="every request asks for its usage (the same upstream stream for both)")
    p.add_argument("--budget", action="store_true",
                   help="this tree's key with token and spend limits (none reached)")
    a = p.parse_args()
    loads = a.loads.split(",")
    redis = None if a.no_redis or not redis_available(REDIS_URL) else REDIS_URL
    with tempfile.TemporaryDirectory() as d, contextlib.ExitStack() as st:
        tmp = Path(d)
        base_tree = st.enter_context(worktree(a.base, tmp / "base"))
        up = free_port()
        upstream_group(st, tmp, up, 1)
        ngx_port = free_port()
        targets = [gateway(st, tmp, "base", base_tree, up, redis),
                   gateway(st, tmp, "new", ROOT, up, redis, a.budget),
                   Target("nginx", st.enter_context(nginx_started(tmp, up, ngx_port)),
                          f"http://127.0.0.1:{ngx_port}/v1")]
        for t in targets:  # pools warm, as many upstream connections as the paced load needs
            load(t.base, concurrency=200, requests=400, processes=a.clients,
                 mock={"chunks": 3, "chunk_delay": 0.01})
        cpu: dict[str, dict[str, list[float]]] = {name: {t.name: [] for t in targets}
                                                  for name in loads}
        for rnd in range(a.rounds):
            for name in loads:
                for t in targets if rnd % 2 == 0 else targets[::-1]:
                    c0 = t.cpu()
                    r = load(t.base, processes=a.clients, include_usage=a.include_usage,
                             **LOADS[name])
                    if r["errors"]:
                        raise RuntimeError(f"{t.name}: {r['errors']} failed streams")
                    cpu[name][t.name].append((t.cpu() - c0) * 1e6 / r["ok"])
    print(f"CPU per stream, medians of {a.rounds} rounds; base {a.base}, new this tree"
          f"{' (its key with token and spend limits)' if a.budget else ''}; "
          f"{'every request asks for its usage; ' if a.include_usage else ''}"
          f"limiter: {'redis' if redis else 'memory'}")
    print("| load | base | new | new vs base | new lower in | middle half of the rounds' "
          "changes | nginx | base / nginx | new / nginx |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, runs in cpu.items():
        b, n, g = (median(runs[k]) for k in ("base", "new", "nginx"))
        lower = sum(x < y for x, y in zip(runs["new"], runs["base"], strict=True))
        # Each round's change: a middle half that straddles zero is a change within noise.
        changes = sorted(100 * (x / y - 1) for x, y in zip(runs["new"], runs["base"],
                                                           strict=True))
        q1, q3 = changes[len(changes) // 4], changes[-1 - len(changes) // 4]
        print(f"| {name} | {b:,.0f} us | {n:,.0f} us | {100 * (n / b - 1):+.1f} % | "
              f"{lower}/{a.rounds} | {q1:+.1f} to {q3:+.1f} % | {g:,.0f} us | {b / g:.2f}x | "
              f"{n / g:.2f}x |")


if __name__ == "__main__":
    main()
