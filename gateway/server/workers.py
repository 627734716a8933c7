"""Running the gateway: in this process, or as a supervisor of N worker processes on one port.

``gateway serve`` calls ``serve(settings)``:

- ``[server] workers = 1``: the gateway runs in this process.
- ``workers = N > 1``: this process becomes a supervisor. It binds the port itself with
  ``SO_REUSEPORT`` but does not listen on it (so it keeps the port reserved, and resolves port 0
  to a real one), then starts N workers (``python -m gateway.server.workers``; the settings it
  validated reach them through a pipe, so every worker runs exactly those). Each worker listens
  on the same port with ``SO_REUSEPORT`` and the kernel spreads new connections over them. Workers
  share nothing in memory: rate limits are exact across them only with Redis (``[redis]``).
  Every worker gets the same ``PROMETHEUS_MULTIPROC_DIR`` (a directory the supervisor creates
  and removes, or the operator's, emptied of old files), so ``/metrics`` on any worker reports
  all of them; a worker that exits is marked dead there.
- The supervisor forwards SIGTERM or SIGINT to the workers as SIGTERM and exits once they all
  have. A worker that dies on its own is restarted after a pause; one that keeps dying within
  seconds of starting makes the supervisor give up and stop them all (exit status 1). Workers
  run in their own process group, so a terminal's Ctrl-C reaches the supervisor alone, and a
  worker whose supervisor vanished (``kill -9``) notices within a second and stops by itself.

Stopping one process (SIGTERM or SIGINT) follows aiohttp's ``AppRunner.cleanup`` order:

1. the listening socket closes: no new connections;
2. idle keep-alive connections close, busy ones close after their response;
3. ``on_shutdown``: the app's ``InFlight`` gives requests in flight up to
   ``[server] drain_seconds``, then ends the rest: a stream with a ``gateway_restarting`` error
   frame, a request still waiting for the upstream with a 503 of that code. Rate-limit leases
   come back in the rate-limit middleware's shielded ``finally``;
4. aiohttp waits ``GRACE_SECONDS`` for handlers still finishing (the last frames being
   written), then cancels them and waits as long again;
5. the cleanup contexts close the upstream connection pool and Redis.

So a stop takes at most ``drain_seconds + 5 + 2 * GRACE_SECONDS`` plus the cleanup; the systemd
unit's ``TimeoutStopSec`` must be above that. A second SIGINT (Ctrl-C twice) ends the drain at
once; repeated SIGTERMs change nothing (systemd's default ``KillMode`` sends one to every process
of the unit, the supervisor forwards another).
"""

from __future__ import annotations

import asyncio
import dataclasses
import glob
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from types import FrameType

from aiohttp import web

from ..settings import Settings
from .limits import GatewayRunner, raise_open_file_limit

log = logging.getLogger("gateway.server.workers")

GRACE_SECONDS = 5.0
"""After the drain, how long aiohttp waits for handlers that are still finishing."""
BACKLOG = 1024
PARENT_CHECK_SECONDS = 1.0
FAST_FAILURE_SECONDS = 10.0
"""A worker that exits sooner than this after it started has failed to start."""
MAX_FAST_FAILURES = 3
"""Consecutive fast failures of one worker after which the supervisor gives up."""
STOP_MARGIN_SECONDS = 30.0
"""The supervisor kills workers still running this long after the drain time."""


def serve(settings: Settings) -> int:
    """Run the gateway until SIGTERM or SIGINT; the process's exit status."""
    if settings.server.workers == 1:
        return run_worker(settings)
    return Supervisor(settings).run()


class GatewayServer:
    """One process's gateway: the app, served on ``[server] host:port`` from ``start`` to
    ``stop`` (which is the graceful shutdown described above)."""

    def __init__(self, settings: Settings, *, reuse_port: bool = False) -> None:
        from ..app import create_app  # here: the supervisor process never builds an app

        self.settings = settings
        self.app = create_app(settings)
        # Header, body and idle timeouts and the connection caps ([server]): see limits.py.
        # Idle connections (nginx's) close after keepalive_timeout_seconds; nginx's upstream
        # keepalive_timeout must be shorter, so that nginx, not the gateway, closes them.
        self._runner = GatewayRunner(self.app, settings.server, shutdown_timeout=GRACE_SECONDS)
        self._reuse_port = reuse_port
        self.port = 0

    async def start(self) -> None:
        raise_open_file_limit(self.settings.server.max_connections)
        await self._runner.setup()
        server = self.settings.server
        site = web.TCPSite(self._runner, server.host, server.port, backlog=BACKLOG,
                           reuse_port=self._reuse_port or None)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def stop_waiting(self) -> None:
        """End a drain in progress now."""
        from ..appkeys import IN_FLIGHT

        self.app[IN_FLIGHT].stop_waiting()

    async def stop(self) -> None:
        await self._runner.cleanup()


def run_worker(settings: Settings, *, reuse_port: bool = False,
               supervisor_pid: int | None = None) -> int:
    """Serve in this process until a signal (or the supervisor's death) stops it."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        try:
            runner.run(_serve_until_stopped(settings, reuse_port, supervisor_pid))
        except OSError as e:  # the port is taken, the host is not ours, ...
            log.error("cannot serve on %s:%d: %s", settings.server.host, settings.server.port,
                      e.strerror or e)
            return 1
    return 0


async def _serve_until_stopped(settings: Settings, reuse_port: bool,
                               supervisor_pid: int | None) -> None:
    server = GatewayServer(settings, reuse_port=reuse_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("%s: stopping", sig.name)
            stop.set()
        elif sig == signal.SIGINT:
            log.warning("SIGINT again: ending open requests now")
            server.stop_waiting()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    watcher = None
    try:
        await server.start()
        log.info("listening on http://%s:%d", settings.server.host, server.port)
        if supervisor_pid is not None:
            watcher = asyncio.create_task(_watch_supervisor(supervisor_pid, stop))
        await stop.wait()
        log.info("closing the port; open requests have up to %gs to finish",
                 settings.server.drain_seconds)
    finally:
        if watcher is not None:
            watcher.cancel()
        await server.stop()
    log.info("stopped")


async def _watch_supervisor(pid: int, stop: asyncio.Event) -> None:
    while os.getppid() == pid:
        await asyncio.sleep(PARENT_CHECK_SECONDS)
    log.warning("the supervisor (pid %d) is gone; stopping", pid)
    stop.set()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


@dataclasses.dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    fast_failures: int = 0
    start_at: float = 0.0  # when to (re)start it, while proc is None


class Supervisor:
    """The parent of N workers; see the module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._signals: list[signal.Signals] = []
        self._stopping = False
        self._forwarded = 0
        self._exit_status = 0
        self._workers = [_Worker(i) for i in range(settings.server.workers)]
        self._metrics_dir = ""

    def run(self) -> int:
        server = self.settings.server
        try:
            reserved = _reserve_port(server.host, server.port)
        except OSError as e:
            log.error("cannot serve on %s:%d: %s", server.host, server.port, e.strerror or e)
            return 1
        port = reserved.getsockname()[1]
        self.settings = dataclasses.replace(
            self.settings, server=dataclasses.replace(server, port=port))
        self._metrics_dir, own_dir = _metrics_dir()
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        log.info("supervisor: %d workers on http://%s:%d (metrics from all of them in %s)",
                 server.workers, server.host, port, self._metrics_dir)
        try:
            self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for w in self._workers:  # only if the loop itself failed
                if w.proc is not None and w.proc.poll() is None:
                    w.proc.kill()
                    w.proc.wait()
            reserved.close()
            if own_dir:
                shutil.rmtree(self._metrics_dir, ignore_errors=True)
        log.info("supervisor: stopped")
        return self._exit_status

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signal.Signals(signum))  # acted on by the loop, not in here

    def _loop(self) -> None:
        kill_at = 0.0
        while True:
            now = time.monotonic()
            if len(self._signals) > self._forwarded:
                self._forward(now)
                if not kill_at:
                    kill_at = now + self.settings.server.drain_seconds + STOP_MARGIN_SECONDS
            for w in self._workers:
                if w.proc is not None and w.proc.poll() is not None:
                    self._exited(w, now)
                if w.proc is None and not self._stopping and now >= w.start_at:
                    self._spawn(w)
            if self._stopping:
                running = [w.proc for w in self._workers if w.proc is not None]
                if not running:
                    return
                if kill_at and now > kill_at:
                    for proc in running:
                        log.error("supervisor: worker pid %d did not stop in time; killing it",
                                  proc.pid)
                        proc.kill()
                    kill_at = float("inf")
                if not kill_at:  # stopping without a signal: a worker kept failing
                    kill_at = now + self.settings.server.drain_seconds + STOP_MARGIN_SECONDS
            time.sleep(0.05)

    def _forward(self, now: float) -> None:
        new = self._signals[self._forwarded:]
        self._forwarded = len(self._signals)
        for sig in new:
            # The first signal stops the workers gracefully; a later SIGINT (Ctrl-C twice)
            # ends their drain at once.
            if not self._stopping:
                log.info("supervisor: %s: stopping %d workers", sig.name,
                         sum(w.proc is not None for w in self._workers))
                self._stopping = True
                self._signal_all(signal.SIGTERM)
            elif sig == signal.SIGINT:
                self._signal_all(signal.SIGINT)

    def _signal_all(self, sig: signal.Signals) -> None:
        for w in self._workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(sig)

    def _exited(self, w: _Worker, now: float) -> None:
        from prometheus_client import multiprocess

        assert w.proc is not None
        pid, status = w.proc.pid, w.proc.returncode
        w.proc = None
        multiprocess.mark_process_dead(pid, self._metrics_dir)
        if self._stopping:
            log.info("supervisor: worker %d (pid %d) exited with status %d", w.index, pid, status)
            return
        w.fast_failures = w.fast_failures + 1 if now - w.started < FAST_FAILURE_SECONDS else 0
        if w.fast_failures >= MAX_FAST_FAILURES:
            log.error("supervisor: worker %d (pid %d) exited with status %d, %d times in a row "
                      "right after starting; giving up", w.index, pid, status, w.fast_failures)
            self._exit_status = 1
            self._stopping = True
            self._signal_all(signal.SIGTERM)
            return
        delay = min(30.0, 0.5 * 2 ** w.fast_failures)
        log.error("supervisor: worker %d (pid %d) exited with status %d; restarting it in %gs",
                  w.index, pid, status, delay)
        w.start_at = now + delay

    def _spawn(self, w: _Worker) -> None:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": self._metrics_dir}
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.server.workers", "--supervisor", str(os.getpid())],
            stdin=subprocess.PIPE, env=env, process_group=0)
        assert proc.stdin is not None
        proc.stdin.write(pickle.dumps(self.settings))
        proc.stdin.close()
        w.proc = proc
        w.started = time.monotonic()
        log.info("supervisor: started worker %d (pid %d)", w.index, proc.pid)


def _reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT but not listening: the port stays ours (and
    port 0 becomes a real one) while the workers, which do listen, take the connections."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    if port:
        # SO_REUSEPORT would let this bind succeed next to another gateway of the same user
        # (which would then silently share the traffic): first make sure nothing holds the port.
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _metrics_dir() -> tuple[str, bool]:
    """The workers' shared metrics directory, and whether the supervisor created it."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not given:
        return tempfile.mkdtemp(prefix="gateway-metrics-"), True
    os.makedirs(given, exist_ok=True)
    for path in glob.glob(os.path.join(given, "*.db")):
        os.remove(path)  # a previous run's counts would add to this run's
    return given, False


def _worker_main(argv: list[str]) -> int:
    """``python -m gateway.server.workers --supervisor PID``, settings (pickled) on stdin."""
    from ..accesslog import setup_access_log

    supervisor_pid = int(argv[argv.index("--supervisor") + 1])
    settings = pickle.loads(sys.stdin.buffer.read())
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s [worker %(process)d] "
                               "%(message)s")
    setup_access_log()
    return run_worker(settings, reuse_port=True, supervisor_pid=supervisor_pid)


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
