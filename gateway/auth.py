"""Client keys: who may call the gateway, and with which limits. No aiohttp imports.

Keys are only ever held as SHA-256 digests. A presented key is hashed and looked up by digest,
so no comparison ever runs over the secret itself, and nothing here can leak it.

Unknown keys are throttled per client address (``AuthFailureThrottle``): each one is a guess and
may cost a remote lookup (a Redis ``HGET``), so a client that keeps presenting them is refused
with 429 for a while, without any lookup, while the keys this process knows keep working.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

from .addresses import client_block
from .request_info import ClientKey
from .settings import DEMO_KEY, KeySettings, Settings, hash_key

log = logging.getLogger("gateway.auth")


MAX_TRACKED_CLIENTS = 10_000
"""Client addresses whose failures are remembered at most (about 1 MB)."""


class AuthFailureThrottle:
    """Failed authentications per client address: a token bucket each, ``per_minute`` failures
    in a row, then one every ``60 / per_minute`` seconds; ``per_minute = 0`` turns it off.

    Only failures take tokens, so a client that never fails is never tracked. Memory is bounded:
    at most ``max_clients`` addresses; when full, buckets that have refilled (they carry no
    information) go first, then the least recently failed, down to 90% so that the sweep is
    rare. IPv6 clients count per /64, the block one host commonly holds. Each process keeps its
    own buckets (with N workers a client may fail N times as often).
    """

    def __init__(self, per_minute: float, max_clients: int = MAX_TRACKED_CLIENTS) -> None:
        self._rate = per_minute / 60.0
        self._capacity = max(per_minute, 1.0)
        self._max_clients = max_clients
        # client -> (tokens, monotonic time of that count); insertion order = last failure
        self._buckets: dict[str, tuple[float, float]] = {}

    def wait(self, client: str, now: float | None = None) -> float:
        """Seconds until ``client`` may fail again; 0 when it may now."""
        if self._rate <= 0 or not self._buckets:
            return 0.0
        entry = self._buckets.get(client_block(client))
        if entry is None:
            return 0.0
        tokens = self._refilled(entry, time.monotonic() if now is None else now)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self._rate

    def failed(self, client: str, now: float | None = None) -> None:
        """Take one token from ``client``'s bucket."""
        if self._rate <= 0:
            return
        now = time.monotonic() if now is None else now
        block = client_block(client)
        entry = self._buckets.pop(block, None)  # re-inserted last: the most recent failure
        if entry is None and len(self._buckets) >= self._max_clients:
            self._make_room(now)
        tokens = self._capacity if entry is None else self._refilled(entry, now)
        self._buckets[block] = (max(tokens - 1.0, 0.0), now)

    def __len__(self) -> int:
        return len(self._buckets)

    def _refilled(self, entry: tuple[float, float], now: float) -> float:
        tokens, at = entry
        return min(self._capacity, tokens + (now - at) * self._rate)

    def _make_room(self, now: float) -> None:
        for block in [b for b, e in self._buckets.items()
                      if self._refilled(e, now) >= self._capacity]:
            del self._buckets[block]
        excess = len(self._buckets) - self._max_clients * 9 // 10
        for block in list(self._buckets)[:max(excess, 0)]:
            del self._buckets[block]


class KeyStore(Protocol):
    async def lookup(self, key: str, *, cached_only: bool = False) -> ClientKey | None:
        """The caller behind ``key``, or None when the key is unknown or revoked.

        ``cached_only``: answer from what this process knows (the config, keys it has seen),
        never asking a remote store about a key it has not seen: for a client throttled for
        its failures, whose guesses must cost nothing.
        """

    async def revoked(self, keys: Sequence[ClientKey]) -> list[ClientKey]:
        """Those of ``keys`` (each one this store answered, the objects themselves) that have
        been revoked since: their open streams end (``InFlight.end_revoked``)."""


def client_key(k: KeySettings) -> ClientKey:
    return ClientKey(name=k.name, requests_per_minute=k.limits.requests_per_minute,
                     burst=k.limits.burst,
                     max_concurrent_streams=k.limits.max_concurrent_streams, models=k.models,
                     budget=k.limits.budget)


class ConfigKeyStore:
    """Keys from the config file; with none there and the mock upstream, the demo key."""

    def __init__(self, settings: Settings) -> None:
        keys = list(settings.keys)
        if settings.uses_demo_key:
            keys.append(KeySettings(name="demo", sha256=hash_key(DEMO_KEY), limits=settings.limits))
            log.warning("no [[keys]] configured: accepting the demo key %r (mock upstream only)",
                        DEMO_KEY)
        self._by_digest = {k.sha256: client_key(k) for k in keys}

    async def lookup(self, key: str, *, cached_only: bool = False) -> ClientKey | None:
        return self._by_digest.get(hash_key(key))

    async def revoked(self, keys: Sequence[ClientKey]) -> list[ClientKey]:
        """None: the config's keys change only with the config, at a restart."""
        return []


def bearer_token(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key from ``Authorization: Bearer <key>`` or ``x-api-key``; None if malformed."""
    if authorization:
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            return None
        return token
    if x_api_key:
        return x_api_key.strip() or None
    return None
