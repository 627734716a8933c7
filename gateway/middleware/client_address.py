"""Which address a request comes from: the peer's, or the last hop of ``X-Forwarded-For`` when
the peer is a trusted proxy (``[server] trusted_proxies``). The last hop, never the first: every
hop before the trusted proxy's own is whatever the client chose to write."""

from __future__ import annotations

import ipaddress

from aiohttp import web


def client_ip(request: web.Request, trusted: tuple[str, ...]) -> str:
    peer = request.remote or ""
    forwarded = request.headers.get("X-Forwarded-For")
    if forwarded and peer in trusted:
        candidate = forwarded.split(",")[-1].strip()
        try:
            return str(ipaddress.ip_address(candidate))
        except ValueError:
            pass
    return peer
