"""Processes the bench starts, and what they cost.

Every server runs in its own session (``started``), so that stopping it stops its workers too,
and its cost is read from /proc for the whole process tree: the scheduler's nanosecond count of
every thread (/proc/PID/task/TID/schedstat) where the kernel keeps one, the coarse clock ticks
(SC_CLK_TCK) of /proc/PID/stat otherwise.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository: servers run from there
TICK = os.sysconf("SC_CLK_TCK")
SCHEDSTAT = Path("/proc/self/schedstat").exists()


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout}s")


def wait_file(path: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear after {timeout}s")
        time.sleep(0.05)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (nginx workers, gateway workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def process_cpu(pid: int) -> float:
    """CPU seconds of one process: its threads' nanosecond counts where the kernel keeps them
    (a thread that exits takes its count along; these processes keep theirs)."""
    if SCHEDSTAT:
        total = 0
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        return total / 1e9
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    return 0.0


def cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants."""
    return sum(process_cpu(p) for p in process_tree(pid))


def child_cpu() -> float:
    """CPU seconds of the finished child processes (the wrk runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1]) * 1024
    return total


class Target:
    """Something a client calls: a proxy, or the upstream itself (``direct``). ``procs`` are
    the process groups whose CPU is its cost (several for K upstream processes)."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes] | list[subprocess.Popen[bytes]],
                 base: str) -> None:
        self.name, self.base = name, base
        self.procs = proc if isinstance(proc, list) else [proc]
        self.proc = self.procs[0]

    def cpu(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def rss(self, field: str = "VmRSS") -> int:
        return sum(rss_bytes(p.pid, field) for p in self.procs)


@contextlib.contextmanager
def started(cmd: list[str], port: int, env: dict[str, str] | None = None,
            log: Path | None = None, ready: Path | None = None, cwd: Path = ROOT
            ) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` in its own session, in ``cwd`` (``python -m gateway`` runs the gateway
    found there), until the block ends; ready when ``port`` answers (or, given ``ready``, when
    that file appears: several processes can share a port)."""
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=out, stderr=out,
                            cwd=cwd, start_new_session=True)
    try:
        if ready is not None:
            wait_file(ready)
        else:
            wait_port(port)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
