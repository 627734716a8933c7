"""One structured JSON line per request, written when its response is done."""

from __future__ import annotations

import logging
import time

import orjson

from .context import RequestInfo

log = logging.getLogger("gateway.access")


def log_request(info: RequestInfo) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    ttfb = info.ttfb_seconds
    log.info(orjson.dumps({
        "request_id": info.request_id,
        "key": info.key.name if info.key else None,
        "route": info.route,
        "client_ip": info.client_ip,
        "model": info.model,
        "status": info.status,
        "stream": info.stream,
        "ttfb_ms": None if ttfb is None else round(ttfb * 1000, 2),
        "duration_ms": round((time.monotonic() - info.started) * 1000, 2),
        "chunks": info.chunks,
        "bytes": info.bytes_out,
        "usage": info.usage,
        "outcome": info.outcome,
    }).decode())
