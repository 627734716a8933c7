"""The upstreams the targets call.

One upstream is ``gateway mock-upstream``. Several (``--mocks K``) share one port through
SO_REUSEPORT, each started as ``scripts/bench.py --serve-mock`` so that the kernel spreads the
connections over them. The workers scenario uses a replay upstream instead
(``--serve-replay``): every stream is answered with the bytes the mock sent for one burst
stream, recorded at start and written as the mock writes them, at next to no CPU, so that the
upstream is never what limits that run.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
from pathlib import Path
from typing import cast

import loadtest

from .processes import ROOT, started

# Each of several upstream processes is this command with --serve-mock or --serve-replay.
BENCH_SCRIPT = ROOT / "scripts" / "bench.py"


def serve_mock(port: int, ready: Path) -> None:
    """``--serve-mock``: the project's mock upstream as one of several processes on ``port``."""
    from aiohttp import web

    from gateway.mock.upstream import BACKLOG, create_mock_app

    async def serve() -> None:
        runner = web.AppRunner(create_mock_app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=BACKLOG, reuse_port=True).start()
        ready.touch()
        await asyncio.Event().wait()  # until SIGTERM

    loadtest.run_loop(serve())


REPLAY_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
               b"Transfer-Encoding: chunked\r\nServer: bench-replay\r\n\r\n")
REPLAY_404 = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
BATCH_BYTES = 64 * 1024  # the mock's burst writes (gateway/mock/stream.py, _BATCH_BYTES)


def replay_answer(body: bytes) -> bytes:
    """The whole HTTP answer for a recorded SSE body: its events in batches of up to
    ``BATCH_BYTES``, one HTTP chunk each, as the mock writes a burst."""
    events = [e + b"\n\n" for e in body.split(b"\n\n") if e]
    chunks, batch = [], b""
    for event in events:
        batch += event
        if len(batch) >= BATCH_BYTES:
            chunks.append(batch)
            batch = b""
    if batch:
        chunks.append(batch)
    return REPLAY_HEAD + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


class ReplayUpstream(asyncio.Protocol):
    """Answers every ``POST .../chat/completions`` with one recorded stream, anything else with
    404. Requests are parsed only as far as their length (``Content-Length`` or chunked)."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.buf = bytearray()
        self.body_left: int | None = None  # None: reading a head
        self.chunked = self.stream = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.step():
            pass

    def step(self) -> bool:
        if self.body_left is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            head = bytes(self.buf[:end]).lower()
            del self.buf[:end + 4]
            line = head.split(b"\r\n", 1)[0]
            self.stream = line.startswith(b"post ") and b"/chat/completions" in line
            length = re.search(rb"\r\ncontent-length: *(\d+)", head)
            self.chunked = length is None and b"\r\ntransfer-encoding: chunked" in head
            self.body_left = int(length.group(1)) if length else 0
            return True
        if self.chunked:
            eol = self.buf.find(b"\r\n")
            if eol < 0:
                return False
            size = int(bytes(self.buf[:eol]).split(b";")[0], 16)
            if len(self.buf) < eol + 2 + size + 2:
                return False
            del self.buf[:eol + 2 + size + 2]
            if size:
                return True
        else:
            if len(self.buf) < self.body_left:
                return False
            del self.buf[:self.body_left]
        self.body_left = None
        assert self.transport is not None
        self.transport.write(self.answer if self.stream else REPLAY_404)
        return True


def serve_replay(port: int, recorded: Path, ready: Path) -> None:
    """``--serve-replay``: one of several replay upstream processes on ``port``."""
    answer = replay_answer(recorded.read_bytes())

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(lambda: ReplayUpstream(answer), "127.0.0.1", port,
                                 backlog=4096, reuse_port=True)
        ready.touch()
        await asyncio.Event().wait()  # until SIGTERM

    loadtest.run_loop(serve())


def upstream_group(st: contextlib.ExitStack, tmp: Path, port: int, count: int,
                   replay: Path | None = None) -> list[subprocess.Popen[bytes]]:
    """``count`` upstream processes on ``port``: the mock (``gateway mock-upstream`` when one),
    or the replay upstream serving the stream recorded in ``replay``."""
    py, me = sys.executable, str(BENCH_SCRIPT)
    if replay is None and count == 1:
        return [st.enter_context(started(
            [py, "-m", "gateway", "mock-upstream", "--port", str(port)], port))]
    procs = []
    for i in range(count):
        ready = tmp / f"upstream-{port}-{i}.ready"
        cmd = [py, me, "--serve-mock", str(port), "--ready", str(ready)] if replay is None \
            else [py, me, "--serve-replay", str(port), "--recorded", str(replay),
                  "--ready", str(ready)]
        procs.append(st.enter_context(started(cmd, port, ready=ready)))
    return procs


def record_stream(base: str, chunks: int) -> bytes:
    """The body the mock sends for one burst stream of ``chunks`` chunks."""
    import aiohttp

    async def fetch() -> bytes:
        async with aiohttp.ClientSession() as s, s.post(base + "/chat/completions", json={
                "model": "grok-4", "stream": True, "mock": {"chunks": chunks},
                "messages": [{"role": "user", "content": "hi"}]}) as r:
            r.raise_for_status()
            return await r.read()

    return loadtest.run_loop(fetch())
