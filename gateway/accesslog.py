"""One structured JSON line per request, written when its response is done.

The ``gateway.access`` logger. ``setup_access_log`` (called by ``gateway serve``) sends it to
stdout as bare JSON lines, one object per line and nothing around it, while diagnostics stay on
stderr; each line is one ``write``, so the lines of several workers sharing stdout do not
interleave. ``[server] access_log = false`` turns the lines off (the errors middleware checks
it). Fields:

==================  =============================================================
``time``            when the response ended, UTC, ISO 8601 with milliseconds
``pid``             the worker process
``request_id``      the client's ``X-Request-ID`` (nginx's ``$request_id``) or a new one
``key``             the client key's name, never the key; null before auth
``route``           the route pattern, e.g. ``/v1/chat/completions``; ``unmatched``
``client_ip``       the client (``X-Forwarded-For`` believed only from trusted proxies)
``model``           as the client asked for it (cut at 256 characters, as any string
                    that reaches the line from a client or the upstream; longer model
                    names are refused with 400 anyway)
``status``          HTTP status sent (a stream's stays 200 whatever happens after it began;
                    499: the client left before any response)
``stream``          whether the client asked for an event stream
``ttfb_ms``         to the first event (stream) or the whole answer (plain); null if none
``duration_ms``     to the end of the response
``chunks``          upstream events relayed
``bytes``           response body bytes relayed
``usage``           the token counts of the upstream's usage object, if it sent one: its
                    integer fields (and those of its ``*_details`` objects), nothing else
``charged``         for a key with token or spend limits: the tokens and dollars it was
                    charged (``{"tokens": .., "usd": ..}``: the usage's, or the estimate
                    for an answer that ended without usage), else null
``outcome``         completed, client_disconnect, upstream_error, timeout, shutdown,
                    refused (429) or error
``error``           the error code the client received (status or stream frame), if any
``upstream``        the name of the upstream that answered (the last one tried), if any
==================  =============================================================
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, TextIO

import orjson

from .errors import bounded
from .request_info import RequestInfo

log = logging.getLogger("gateway.access")
MAX_FIELD_CHARS = 256
"""The longest string field a line carries: a client's string must not size the log."""
_pid = os.getpid()  # cached: a syscall per request otherwise


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def setup_access_log(stream: TextIO | None = None) -> None:
    """Access lines to ``stream`` (stdout), as bare JSON lines, not through the root logger."""
    handler = logging.StreamHandler(sys.stdout if stream is None else stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _bounded(text: str | None) -> str | None:
    return None if text is None else bounded(text, MAX_FIELD_CHARS)


def log_request(info: RequestInfo) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    ttfb = info.ttfb_seconds
    log.info(orjson.dumps({
        "time": _utc(time.time()),
        "pid": _pid,
        "request_id": info.request_id,
        "key": info.key.name if info.key else None,
        "route": info.route,
        "client_ip": info.client_ip,
        "model": _bounded(info.model),
        "status": info.status,
        "stream": info.stream,
        "ttfb_ms": None if ttfb is None else round(ttfb * 1000, 2),
        "duration_ms": round((time.monotonic() - info.started) * 1000, 2),
        "chunks": info.chunks,
        "bytes": info.bytes_out,
        "usage": None if info.usage is None else _token_counts(info.usage),
        "charged": None if info.charge is None else {
            "tokens": info.charge.tokens, "usd": round(info.charge.ticks / 10**10, 10)},
        "outcome": info.outcome,
        "error": _bounded(info.error),
        "upstream": info.upstream,
    }).decode())


_MAX_FIELDS = 32


def _token_counts(usage: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    """The usage object as it goes into a log line: integer counts under short names, one level
    of ``*_details`` objects, at most 32 fields. It comes from the upstream, whose strings are
    not the log's to carry (bound, then log)."""
    out: dict[str, Any] = {}
    for name, value in usage.items():
        if len(out) >= _MAX_FIELDS or not isinstance(name, str) or len(name) > 64:
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            out[name] = value
        elif isinstance(value, dict) and depth == 0 and name.endswith("_details"):
            out[name] = _token_counts(value, 1)
    return out
