"""Real servers as processes, for tests that need several gateways, or a Redis they may stop.

- ``spawn(args, **popen)``: every long-lived child of the suite starts through it, in a session
  of its own and with a parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGTERM)``), so a pytest
  that is killed or aborted leaves no gateway, nginx or redis-server behind.
- ``RedisServer``: a ``redis-server`` of the test's own on a free loopback port (no persistence),
  which the test may kill and start again; the machine's Redis is never touched.
- ``Blackhole``: a TCP proxy to a Redis that can go silent (connections open, bytes dropped).
- ``GatewayProcess``: ``python -m gateway serve --config <toml>`` as a subprocess; its stdout
  (the access log, one JSON object per line) and stderr go to files the test reads.
  ``running(*gateways)`` starts several and waits until each port accepts;
  ``gateway_processes(config, count, tmp)`` starts ``count`` of them, each on its own port,
  ready (GET /healthz answered) when the context is entered, stopped when it is left.

Every wait is bounded; a process that dies early fails the test with its output.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import redis

from gateway.mock.ports import free_port  # the one helper, shared with scripts/benchlib

ROOT = Path(__file__).resolve().parent.parent


def clean_environ(**extra: str) -> dict[str, str]:
    """This process's environment without anything that would change a gateway's settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GATEWAY_") and k != "XAI_API_KEY"}
    env.update(extra)
    return env


# --- children that cannot outlive the test run ----------------------------------------------

_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl  # looked up once, not in the child


def _die_with(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: in the child, between fork and exec, ask the kernel for SIGTERM when
    the parent goes away (the setting survives exec). Linux sends it when the *thread* that
    forked the child ends: start a child from a thread that outlives it (the test's main
    thread, or the thread that waits for it, as ``run_cli`` in ``asyncio.to_thread`` does)."""
    sigterm = int(signal.SIGTERM)

    def setup() -> None:
        if _prctl(_PR_SET_PDEATHSIG, sigterm) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before the prctl: do not outlive it
            os._exit(1)
    return setup


def orphan_proof() -> dict[str, Any]:
    """``Popen``/``run`` keyword arguments: a session of its own (Ctrl-C and job control of the
    test's terminal do not reach the child; the test signals it itself) and SIGTERM when the
    test process dies."""
    return {"start_new_session": True, "preexec_fn": _die_with(os.getpid())}


def spawn(args: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(list(args), **orphan_proof(), **popen)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def wait_until_async(predicate: Callable[[], bool], timeout: float, what: str,
                           interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSON-lines log so far; each must be one JSON object, nothing else."""
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# --- Redis ----------------------------------------------------------------------------------

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
        self.proc = spawn(
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
                        raise RuntimeError(
                            f"redis-server on port {self.port} did not start") from None
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


class Blackhole:
    """A TCP proxy to Redis that can go silent (connections stay open, bytes vanish) or hold
    Redis' replies back (``replies.clear()``, until ``replies.set()``; only the replies on the
    ``hold_only``-th connection it accepted, counting from 0, when that is set); ``seen`` is
    every byte sent to Redis through it."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.db = parts.path
        self.silent = False
        self.replies = asyncio.Event()
        self.replies.set()
        self.seen = bytearray()
        self.hold_only: int | None = None
        self.accepted = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}{self.db}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index, self.accepted = self.accepted, self.accepted + 1
        self.writers.add(writer)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.writers.add(upstream_writer)
        with contextlib.suppress(OSError):
            await asyncio.gather(self._pipe(reader, upstream_writer, to_redis=True),
                                 self._pipe(upstream_reader, writer, to_redis=False,
                                            index=index))
        for w in (writer, upstream_writer):
            w.close()
            self.writers.discard(w)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *,
                    to_redis: bool, index: int = 0) -> None:
        while data := await src.read(65536):
            if to_redis:
                self.seen += data
            elif self.hold_only is None or self.hold_only == index:
                await self.replies.wait()
            if not self.silent:
                dst.write(data)
                await dst.drain()
        dst.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.close()
        await self.server.wait_closed()


# --- gateway config files and the CLI -------------------------------------------------------

def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string, for the strings tests use
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):  # an inline table: [models] prices = {"grok-4" = {...}}
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
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
                          capture_output=True, text=True, timeout=timeout, **orphan_proof())


# --- gateway processes ----------------------------------------------------------------------

class GatewayProcess:
    """``gateway serve`` in a subprocess, on its own port, with its own log files.

    The port is ``config["server"]["port"]``, or ``port`` (passed as ``--port``) when given.
    """

    def __init__(self, directory: Path, name: str, config: Mapping[str, Any],
                 args: tuple[str, ...] = (), port: int | None = None) -> None:
        self.name = name
        if port is None:
            self.port = int(config["server"]["port"])
        else:
            self.port = port
            args = (*args, "--port", str(port))
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = write_config(directory / f"{name}.toml", config)
        self.stdout_path = directory / f"{name}.access.log"
        self.stderr_path = directory / f"{name}.stderr.log"
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> GatewayProcess:
        env = clean_environ()
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the supervisor makes its own
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = spawn(
                [sys.executable, "-m", "gateway", "serve", "--config", str(self.config_path),
                 *self.args], stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=ROOT,
                env=env)
        return self

    def wait_ready(self, timeout: float = 20.0) -> GatewayProcess:
        """Until the port accepts connections (no request is made: none is logged)."""
        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"gateway {self.name} exited with {self.proc.returncode}:"
                                     f"\n{self.stderr()}")
            return accepts(self.port)
        wait_until(up, timeout, f"gateway {self.name} on port {self.port}", interval=0.05)
        return self

    async def wait_healthy(self, session: aiohttp.ClientSession, seconds: float = 15) -> None:
        """Until GET /healthz answers 200."""
        assert self.proc is not None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.logs()}")
            with contextlib.suppress(aiohttp.ClientError, OSError):  # TimeoutError is an OSError
                async with session.get(f"{self.url}/healthz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"gateway on port {self.port} not ready after {seconds}s:\n"
                           f"{self.logs()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def logs(self) -> str:
        """Everything the process wrote: its access log (stdout), then its stderr."""
        return self.stdout_path.read_text(errors="replace") + self.stderr()

    def access_lines(self) -> list[dict[str, Any]]:
        """Every access-log line so far; each must be one JSON object, nothing else."""
        return json_lines(self.stdout_path)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=5)

    def stop(self, timeout: float = 20.0, *, raise_on_timeout: bool = True) -> int | None:
        """SIGTERM, then up to ``timeout`` for the drain; past it, SIGKILL (and the
        ``TimeoutExpired`` raised unless ``raise_on_timeout`` is false)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            if raise_on_timeout:
                raise
            return self.proc.returncode


@contextlib.contextmanager
def running(*procs: GatewayProcess) -> Iterator[None]:
    """Start the gateways together, wait for all, stop them all afterwards."""
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.wait_ready()
        yield
    finally:
        for p in procs:
            with contextlib.suppress(Exception):
                p.stop()


@contextlib.asynccontextmanager
async def gateway_processes(config: Mapping[str, Any] | list[Mapping[str, Any]], count: int,
                            tmp: Path) -> AsyncIterator[list[GatewayProcess]]:
    """``count`` gateway processes with the same config (or one config each, given a list),
    each on a free port given as ``--port``."""
    configs = list(config) if isinstance(config, list) else [config] * count
    procs: list[GatewayProcess] = []
    try:
        for i, cfg in enumerate(configs):
            name = f"gateway-{i}-{os.getpid()}-{time.monotonic_ns()}"
            procs.append(GatewayProcess(tmp, name, cfg, port=free_port()).start())
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            await asyncio.gather(*(gw.wait_healthy(session) for gw in procs))
        yield procs
    finally:
        for gw in procs:  # all at once: each may take its drain time to stop
            if gw.proc is not None and gw.proc.poll() is None:
                gw.proc.terminate()
        for gw in procs:
            gw.stop(5, raise_on_timeout=False)
