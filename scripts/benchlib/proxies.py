"""The proxies under test, configured for the bench, and the Redis beside the gateway.

nginx is the floor: one worker (``--workers-list`` asks for more), ``proxy_buffering off``, no
auth, no limits, no framing. The naive relay (relays/naive.py) is the usual aiohttp
pass-through; the floor and lean relays (relays/) price the layers under the gateway. Each relay
is a program of its own, started by its path. The gateway does its whole work: auth, a
rate-limit check in Redis when Redis answers (in memory otherwise), SSE framing, metrics; its
limits are set far above any load here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .processes import ROOT, started

KEY = "sk-bench-0000000000000000"  # the gateway's one client key; every client sends it
RELAYS = Path(__file__).resolve().parent / "relays"


NGINX_CONF = """
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {tmp}/nginx-{port}.pid;
error_log {tmp}/nginx-{port}-error.log warn;
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


def nginx_started(tmp: Path, upstream: int, port: int, workers: int = 1
                  ) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    for d in ("body", "proxy"):
        (tmp / d).mkdir(exist_ok=True)
    conf = tmp / f"nginx-{port}.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, upstream=upstream, port=port, workers=workers))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return started([nginx, "-p", str(tmp), "-c", str(conf), "-g", "daemon off;"], port)


def naive_started(upstream: int, port: int
                  ) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    return started([sys.executable, str(RELAYS / "naive.py"), str(port),
                    f"http://127.0.0.1:{upstream}/v1"], port)


def redis_available(url: str) -> bool:
    try:
        import redis

        redis.Redis.from_url(url, socket_timeout=0.5).ping()
        return True
    except Exception:
        return False


def redis_pid(url: str | None) -> int | None:
    """The local Redis server's process, to count its CPU beside the gateway's."""
    if url is None:
        return None
    with contextlib.suppress(Exception):
        import redis

        pid = int(redis.Redis.from_url(url, socket_timeout=0.5).info("server")["process_id"])
        if Path(f"/proc/{pid}/stat").exists():
            return pid
    return None


OPERATOR_KEY = ("xai-9jYg7SjjPvttfbfMLZuPjII4OoaQmzBinnpy3MPN"
                "ZEPFqzi0OZUrNsPqPdQ1Og7YN8gKkgboxhQGTa3V")
"""The upstream's key the gateways are given: shaped as xAI's (random letters and digits), since
what the gateway does to keep every part of it from clients costs by its bytes
(``gateway/upstream/secrets.py``); ``scripts/benchlib/relays/lean.py`` holds the same."""


BUDGET = ["tokens_per_minute = 1000000000000", "tokens_per_day = 1000000000000",
          "usd_per_day = 1000000", "usd_per_month = 10000000"]
"""Token and spend limits no load reaches: every request reserves and settles (the checks'
cost), none is refused."""


def gateway_config(tmp: Path, upstream_port: int, redis_url: str | None, port: int,
                   workers: int = 1, budget: bool = False) -> Path:
    lines = [
        "[server]", f"port = {port}", f"workers = {workers}", "access_log = false", "",
        "[upstream]", f'url = "http://127.0.0.1:{upstream_port}/v1"',
        f'api_key = "{OPERATOR_KEY}"', "max_retries = 0", "",
        "[limits]", "requests_per_minute = 100000000", "burst = 10000000",
        "max_concurrent_streams = 100000", *(BUDGET if budget else []), "",
        "[[keys]]", 'name = "bench"', f'key = "{KEY}"', "",
    ]
    if budget:
        lines += ['[models.prices."grok-4"]', "input = 3.0", "output = 15.0", ""]
    if redis_url:
        lines += ["[redis]", f'url = "{redis_url}"', f'key_prefix = "gwbench:{os.getpid()}"', ""]
    path = tmp / f"gateway-{port}.toml"
    path.write_text("\n".join(lines))
    return path


def gateway_started(tmp: Path, upstream: int, redis_url: str | None, port: int,
                    workers: int = 1, tree: Path = ROOT, budget: bool = False
                    ) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """The gateway of ``tree`` (a checkout of another commit, for scripts/bench_ab.py); with
    ``budget``, its key has token and spend limits (``BUDGET``)."""
    return started([sys.executable, "-m", "gateway", "serve", "--config",
                    str(gateway_config(tmp, upstream, redis_url, port, workers, budget))], port,
                   log=tmp / f"gateway-{port}.log", cwd=tree,
                   env=None if tree == ROOT else {"PYTHONPATH": str(tree)})


def floor_started(upstream: int, port: int
                  ) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    return started([sys.executable, str(RELAYS / "floor.py"), str(port),
                    str(upstream)], port)


def lean_started(upstream: int, redis_url: str | None, port: int
                 ) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    return started([sys.executable, str(RELAYS / "lean.py"), str(port),
                    f"http://127.0.0.1:{upstream}/v1", KEY, redis_url or "-",
                    f"gwbench-lean:{os.getpid()}"], port)
