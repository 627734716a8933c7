"""Real processes for the deployment tests (gateway processes: ``GatewayProcess`` and
``running`` in ``tests/servers.py``).

- ``NginxProcess``: nginx run with ``deploy/nginx.conf`` itself; only the lines marked
  ``# site: NAME`` are changed (ports, upstream servers, file paths), see the file's header.
- ``ThreadedMockUpstream``: the project's mock upstream on an event loop of its own in a thread
  of the test process, so module-scoped fixtures can share it and tests can read its
  ``MockState`` (open streams, disconnects).

Every wait is bounded; a process that dies early fails the test with its stderr.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.mock.upstream import MOCK_STATE, MockState, run_mock_upstream

from servers import accepts, free_port, json_lines, orphan_proof, spawn, wait_until

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
SITE_MARKERS = frozenset(("user", "pid", "error_log", "access_log", "temp_paths", "listen",
                          "upstream"))
_MARKER = re.compile(r"#\s*site:\s*([a-z_]+)\s*$")


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                      else None)
    if found is None:
        pytest.fail("nginx is not installed (scripts/test installs Debian's nginx package); "
                    "the nginx tests cannot run without it")
    return found


def render_nginx_conf(prefix: Path, listen_port: int, upstreams: list[str]) -> str:
    """deploy/nginx.conf with its ``# site:`` lines made to run unprivileged in ``prefix``."""
    out: list[str] = []
    seen: set[str] = set()
    upstream_done = False
    for line in NGINX_CONF.read_text().splitlines():
        m = _MARKER.search(line)
        if m is None:
            out.append(line)
            continue
        name = m.group(1)
        assert name in SITE_MARKERS, f"unknown marker in deploy/nginx.conf: {line!r}"
        seen.add(name)
        code = line[:m.start()].rstrip()
        indent = line[:len(line) - len(line.lstrip())]
        if name == "user":
            continue
        if name in ("pid", "error_log", "access_log"):
            parts = re.match(r"(\s*\w+\s+)([^\s;]+)(.*)$", code)
            assert parts is not None, line
            out.append(f"{parts[1]}{prefix / Path(parts[2]).name}{parts[3]}")
        elif name == "temp_paths":
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
                out.append(f"{indent}{kind}_temp_path {prefix / 'temp' / kind};")
        elif name == "listen":
            out.append(re.sub(r"listen\s+[^\s;]+", f"listen 127.0.0.1:{listen_port}", code))
        elif name == "upstream":
            if not upstream_done:
                address = re.search(r"server\s+([^\s;]+)", code)
                assert address is not None, line
                for u in upstreams:
                    out.append(code.replace(address.group(1), u, 1))
                upstream_done = True
    assert seen == SITE_MARKERS, f"deploy/nginx.conf lacks markers: {SITE_MARKERS - seen}"
    return "\n".join(out) + "\n"


class NginxProcess:
    """nginx with deploy/nginx.conf on a free loopback port, in front of ``upstreams``."""

    def __init__(self, upstreams: list[str]) -> None:
        # Its own world-traversable directory: nginx's workers may run as another user (as root,
        # nginx switches its workers to "nobody"), and must reach their temp files.
        self.prefix = Path(tempfile.mkdtemp(prefix="gateway-nginx-"))
        self.prefix.chmod(0o755)
        (self.prefix / "temp").mkdir()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(render_nginx_conf(self.prefix, self.port, upstreams))
        self.binary = nginx_binary()
        self.proc: subprocess.Popen[bytes] | None = None

    def check(self) -> None:
        result = subprocess.run([self.binary, "-t", "-p", str(self.prefix), "-c", str(self.conf)],
                                capture_output=True, timeout=20, **orphan_proof())
        assert result.returncode == 0, result.stderr.decode()

    def start(self) -> NginxProcess:
        self.check()
        self.proc = spawn(
            [self.binary, "-p", str(self.prefix), "-c", str(self.conf), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.prefix / "stderr.log", "wb"))

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"nginx exited: {self.error_log()}")
            return accepts(self.port)
        wait_until(up, 10, "nginx", interval=0.05)
        return self

    def error_log(self) -> str:
        parts = []
        for name in ("stderr.log", "error.log"):
            path = self.prefix / name
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def access_lines(self) -> list[dict[str, Any]]:
        return json_lines(self.prefix / "access.log")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.prefix, ignore_errors=True)


class ThreadedMockUpstream:
    """The mock upstream served from a thread; ``url`` and ``state`` for the tests."""

    def __init__(self) -> None:
        self.url = ""
        self._app: web.Application | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mock-upstream", daemon=True)

    @property
    def state(self) -> MockState:
        assert self._app is not None
        return self._app[MOCK_STATE]

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with run_mock_upstream() as (app, url):
            self._app, self.url = app, url
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> ThreadedMockUpstream:
        self._thread.start()
        assert self._ready.wait(10), "the mock upstream did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
