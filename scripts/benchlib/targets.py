"""The four targets every scenario calls, started and warmed up: the upstream itself
(``direct``), nginx, the naive relay and the gateway, each its own process group on loopback.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import loadtest

from gateway.mock.ports import free_port

from .clients import load
from .processes import Target
from .proxies import gateway_started, naive_started, nginx_started, redis_pid
from .upstreams import upstream_group


@dataclass
class Bench:
    """What every scenario is handed: the command line, the run's temporary folder, the Redis
    beside the gateway (its CPU counts as the gateway's) and the four targets."""

    args: argparse.Namespace
    tmp: Path
    redis_url: str | None
    redis: int | None  # the local Redis server's pid
    up_port: int
    direct: Target
    nginx: Target
    naive: Target
    gateway: Target

    @property
    def proxies(self) -> list[Target]:
        return [self.nginx, self.naive, self.gateway]

    @property
    def everyone(self) -> list[Target]:
        return [self.direct, *self.proxies]

    def paced(self) -> dict[str, Any]:
        return {"chunks": self.args.chunks, "chunk_delay": self.args.chunk_delay_ms / 1000}

    def redis_for(self, t: Target) -> int | None:
        return self.redis if t is self.gateway else None


@contextlib.contextmanager
def targets_started(args: argparse.Namespace, tmp: Path, redis_url: str | None
                    ) -> Iterator[Bench]:
    """The upstream (``--mocks`` processes) and the three proxies in front of it, warmed up,
    until the block ends."""
    with contextlib.ExitStack() as st:
        up_port, ngx_port, gw_port, naive_port = (free_port() for _ in range(4))
        mocks = upstream_group(st, tmp, up_port, args.mocks)
        ngx = st.enter_context(nginx_started(tmp, up_port, ngx_port))
        gw = st.enter_context(gateway_started(tmp, up_port, redis_url, gw_port))
        naive = st.enter_context(naive_started(up_port, naive_port))
        b = Bench(args=args, tmp=tmp, redis_url=redis_url, redis=redis_pid(redis_url),
                  up_port=up_port,
                  direct=Target("direct", mocks, f"http://127.0.0.1:{up_port}/v1"),
                  nginx=Target("nginx", ngx, f"http://127.0.0.1:{ngx_port}/v1"),
                  naive=Target("naive", naive, f"http://127.0.0.1:{naive_port}/v1"),
                  gateway=Target("gateway", gw, f"http://127.0.0.1:{gw_port}/api/v1"))
        # Warm up connection pools and caches, the client's too: the client processes of the
        # runs are forked from this one, with aiohttp's lazy set-up done once here.
        loadtest.measure(loadtest.parse_args(["--url", b.direct.base, "--requests", "5",
                                              "--quiet"]))
        for t in b.everyone:
            load(t.base, concurrency=10, requests=50, mock={"chunks": 5})
        yield b
