"""A free loopback port for a server that another process will open: the one helper the tests
(``tests/servers.py``) and the benchmarks (``scripts/benchlib``) share.

A server in the same process binds port 0 and reads back the port it got
(``run_mock_upstream`` does); a child process (a ``gateway serve --port``, a redis-server, a
sentinel, nginx) takes its port on its command line, so the number has to be known before it
starts. The kernel picks one that is free now; it is not held, so another process may take it
before the child binds: callers start their server at once and fail loudly when it cannot bind,
rather than talk to a stranger. It lives beside the mock upstream because both are the test
infrastructure the package ships, importable from the tests and the scripts with no path edit.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on or is bound to at the time of the call."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
