"""Client keys: who may call the gateway, and with which limits. No aiohttp imports.

Keys are only ever held as SHA-256 digests. A presented key is hashed and looked up by digest,
so no comparison ever runs over the secret itself, and nothing here can leak it.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Protocol

from .request_info import ClientKey
from .settings import DEMO_KEY, KeySettings, Settings

log = logging.getLogger("gateway.auth")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class KeyStore(Protocol):
    async def lookup(self, key: str) -> ClientKey | None:
        """The caller behind ``key``, or None when the key is unknown or revoked."""


def client_key(k: KeySettings) -> ClientKey:
    return ClientKey(name=k.name, requests_per_minute=k.limits.requests_per_minute,
                     burst=k.limits.burst,
                     max_concurrent_streams=k.limits.max_concurrent_streams, models=k.models)


class ConfigKeyStore:
    """Keys from the config file; with none there and the mock upstream, the demo key."""

    def __init__(self, settings: Settings) -> None:
        keys = list(settings.keys)
        if not keys and settings.upstream.is_mock:
            keys.append(KeySettings(name="demo", sha256=digest(DEMO_KEY), limits=settings.limits))
            log.warning("no [[keys]] configured: accepting the demo key %r (mock upstream only)",
                        DEMO_KEY)
        self._by_digest = {k.sha256: client_key(k) for k in keys}

    async def lookup(self, key: str) -> ClientKey | None:
        return self._by_digest.get(digest(key))


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
