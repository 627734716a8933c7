"""Real servers as processes, for tests that need several gateways, or a Redis they may stop.

- ``RedisServer``: a ``redis-server`` of the test's own on a free loopback port (no persistence),
  which the test may kill and start again; the machine's Redis is never touched.
- ``gateway_processes(config, count, tmp)``: ``python -m gateway serve --config <file>`` processes,
  each on its own port, ready (GET /healthz answered) when the context is entered, killed when it
  is left. Their logs go to files the test can read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import redis

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_environ(**extra: str) -> dict[str, str]:
    """This process's environment without anything that would change a gateway's settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GATEWAY_") and k != "XAI_API_KEY"}
    env.update(extra)
    return env


class RedisServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def start(self) -> None:
        assert self.proc is None
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        deadline = time.monotonic() + 5
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise RuntimeError(f"redis-server on port {self.port} did not start")
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(sig)
        self.proc.wait(timeout=5)
        self.proc = None


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string, for the strings tests use
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_text(data: Mapping[str, Any]) -> str:
    """Sections of scalars and lists, and ``keys`` as an array of tables."""
    lines: list[str] = []
    for section, values in data.items():
        if section == "keys":
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    for entry in data.get("keys", ()):
        lines.append("[[keys]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"


def write_config(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(toml_text(data))
    return path


def run_cli(*args: str, env: Mapping[str, str] | None = None,
            timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """``python -m gateway <args>`` to completion."""
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=ROOT,
                          env=dict(env) if env is not None else clean_environ(),
                          capture_output=True, text=True, timeout=timeout)


class GatewayProcess:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log_path

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill9()


async def _wait_ready(gw: GatewayProcess, session: aiohttp.ClientSession,
                      seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if gw.proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {gw.proc.returncode}:\n{gw.logs()}")
        with contextlib.suppress(aiohttp.ClientError, OSError):  # TimeoutError is an OSError
            async with session.get(f"{gw.base}/healthz") as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"gateway on port {gw.port} not ready after {seconds}s:\n{gw.logs()}")


@contextlib.asynccontextmanager
async def gateway_processes(config: Mapping[str, Any] | list[Mapping[str, Any]], count: int,
                            tmp: Path) -> AsyncIterator[list[GatewayProcess]]:
    """``count`` gateway processes with the same config (or one config each, given a list)."""
    configs = list(config) if isinstance(config, list) else [config] * count
    procs: list[GatewayProcess] = []
    try:
        for i, cfg in enumerate(configs):
            path = write_config(tmp / f"gateway-{i}-{os.getpid()}-{time.monotonic_ns()}.toml",
                                cfg)
            port = free_port()
            log_path = path.with_suffix(".log")
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "gateway", "serve", "--config", str(path),
                     "--port", str(port)],
                    cwd=ROOT, env=clean_environ(), stdout=log, stderr=subprocess.STDOUT)
            procs.append(GatewayProcess(proc, port, log_path))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            await asyncio.gather(*(_wait_ready(gw, session) for gw in procs))
        yield procs
    finally:
        for gw in procs:  # all at once: each may take its drain time to stop
            if gw.proc.poll() is None:
                gw.proc.terminate()
        for gw in procs:
            gw.stop()
