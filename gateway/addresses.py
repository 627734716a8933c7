"""Client addresses: which one a request comes from, the unit a client is limited by, and
whether an address is among those allowed. Used per connection (the connection share), per
failed key (the auth-failure throttle) and per request (the access log, ``/metrics``)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from aiohttp import web

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_ip(request: web.Request, trusted: tuple[str, ...]) -> str:
    """The peer's address, or the last hop of ``X-Forwarded-For`` when the peer is a trusted
    proxy (``[server] trusted_proxies``). The last hop, never the first: every hop before the
    trusted proxy's own is whatever the client chose to write."""
    peer = request.remote or ""
    forwarded = request.headers.get("X-Forwarded-For")
    if forwarded and peer in trusted:
        candidate = forwarded.split(",")[-1].strip()
        try:
            return str(ipaddress.ip_address(candidate))
        except ValueError:
            pass
    return peer


def client_block(address: str) -> str:
    """The unit a client is limited by: its IPv4 address, or its IPv6 /64 (one host is handed a
    whole /64, and picks any address in it)."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False).network_address) + "/64"


def networks(spelled: Iterable[str]) -> tuple[Network, ...]:
    """Addresses and CIDRs as networks (an address is a network of one); ``ValueError`` for a
    string that is neither."""
    return tuple(ipaddress.ip_network(s, strict=False) for s in spelled)


def allowed(address: str, among: tuple[Network, ...]) -> bool:
    """Whether ``address`` (IPv4-mapped IPv6 read as IPv4) is in one of ``among``."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in among)
