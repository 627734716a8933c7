"""Client keys kept in Redis, so that an operator can add, list and revoke keys at run time on
every gateway instance at once (``gateway keys ...``).

Layout, under one hash tag so that it works on Redis Cluster and one MULTI covers both (on a
cluster the whole store sits on one shard, so ``list`` reads every key with one ``HGETALL``;
lookups are cached per process, so that shard sees one ``HGET`` per key and cache period)::

    <prefix>:{keys}:records  hash  sha256 of a key -> JSON record (name, limits, models, created)
    <prefix>:{keys}:names    hash  key name -> sha256 of the key (names are unique; revoke by name)

Only digests are stored: the raw key is printed once by ``gateway keys add`` and exists nowhere
else, not in Redis, not in a log line.

``RedisKeyStore`` looks a key up in the config first, then in Redis, and remembers each answer,
found or not, for ``key_cache_seconds``: a lookup costs one ``HGET`` per key and cache period, and
a revoked key stops working on every instance within that period. While Redis is down, answers
already cached are kept (revoking needs Redis too, so they cannot have changed since); a key seen
by no one yet gets 503, since it can be neither accepted nor refused.

Known keys and unknown digests are remembered apart, each with its own bound: anyone can make up
unknown keys by the thousand, and they must never push a known key out of the cache (it would
then fail for a whole Redis outage). A client throttled for its failures (``auth.py``) gets
answers from the cache only: its guesses never reach Redis.
"""

from __future__ import annotations

import datetime
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson
from redis.exceptions import WatchError

from ..auth import KeyStore
from ..errors import ServiceUnavailable
from ..request_info import ClientKey
from ..settings import Limits, RedisSettings, hash_key
from .batcher import RedisBatcher
from .breaker import RedisBreaker
from .topology import REDIS_ERRORS, RedisClient

KEY_PREFIX = "sk-gw-"
MAX_CACHED = 10_000
"""Known keys remembered at most; beyond it the one confirmed longest ago is forgotten first
(only ever for another known key)."""
MAX_CACHED_UNKNOWN = 1_000
"""Unknown digests remembered at most, apart from the known keys; the oldest goes first."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,63}")


def store_keys(prefix: str) -> tuple[str, str]:
    """The records hash and the names hash."""
    return f"{prefix}:{{keys}}:records", f"{prefix}:{{keys}}:names"


@dataclass(frozen=True, slots=True)
class StoredKey:
    """One key's record in Redis: everything but the key."""

    name: str
    sha256: str
    limits: Limits
    models: frozenset[str] | None
    created: str

    def client_key(self) -> ClientKey:
        return ClientKey(name=self.name, requests_per_minute=self.limits.requests_per_minute,
                         burst=self.limits.burst,
                         max_concurrent_streams=self.limits.max_concurrent_streams,
                         models=self.models)

    def record(self) -> bytes:
        return orjson.dumps({
            "name": self.name,
            "requests_per_minute": self.limits.requests_per_minute,
            "burst": self.limits.burst,
            "max_concurrent_streams": self.limits.max_concurrent_streams,
            "models": None if self.models is None else sorted(self.models),
            "created": self.created,
        })

    @classmethod
    def from_record(cls, sha256: str, raw: bytes | str) -> StoredKey:
        data: dict[str, Any] = orjson.loads(raw)
        models = data.get("models")
        return cls(name=data["name"], sha256=sha256,
                   limits=Limits(requests_per_minute=float(data["requests_per_minute"]),
                                 burst=int(data["burst"]),
                                 max_concurrent_streams=int(data["max_concurrent_streams"])),
                   models=None if models is None else frozenset(models),
                   created=data.get("created", ""))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class KeyStoreError(Exception):
    """An operator's request that cannot be done (a name taken, unknown, or invalid)."""


def check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise KeyStoreError(f"invalid key name {name!r}: use 1-64 letters, digits, '.', '_' "
                            "or '-', starting with a letter or digit")


async def add_key(client: RedisClient, prefix: str, name: str, limits: Limits,
                  models: frozenset[str] | None = None) -> tuple[str, StoredKey]:
    """Create a key; return it (the only time it exists in the clear) and its record."""
    check_name(name)
    raw_key = KEY_PREFIX + secrets.token_urlsafe(32)
    stored = StoredKey(name=name, sha256=hash_key(raw_key), limits=limits, models=models,
                       created=datetime.datetime.now(datetime.UTC)
                       .isoformat(timespec="seconds"))
    records, names = store_keys(prefix)
    try:
        async with client.pipeline(transaction=True) as pipe:
            await pipe.watch(names)
            if await pipe.hexists(names, name):
                raise KeyStoreError(f"a key named {name!r} exists already; revoke it first")
            pipe.multi()
            pipe.hset(names, name, stored.sha256)
            pipe.hset(records, stored.sha256, stored.record())
            await pipe.execute()
    except WatchError:
        raise KeyStoreError(f"the key {name!r} was changed meanwhile; try again") from None
    return raw_key, stored


async def list_keys(client: RedisClient, prefix: str) -> list[StoredKey]:
    records, _ = store_keys(prefix)
    found = await client.hgetall(records)
    keys = [StoredKey.from_record(_text(sha), raw) for sha, raw in found.items()]
    return sorted(keys, key=lambda k: k.name)


async def revoke_key(client: RedisClient, prefix: str, name: str) -> StoredKey:
    """Delete a key by name; every instance refuses it within ``key_cache_seconds``."""
    records, names = store_keys(prefix)
    try:
        async with client.pipeline(transaction=True) as pipe:
            await pipe.watch(names)
            sha = await pipe.hget(names, name)
            if sha is None:
                raise KeyStoreError(f"no key named {name!r} in Redis")
            raw = await pipe.hget(records, sha)
            pipe.multi()
            pipe.hdel(names, name)
            pipe.hdel(records, sha)
            await pipe.execute()
    except WatchError:
        raise KeyStoreError(f"the key {name!r} was changed meanwhile; try again") from None
    sha256 = _text(sha)
    if raw is None:  # a name whose record was lost: the name is cleaned up all the same
        return StoredKey(name=name, sha256=sha256, limits=Limits(), models=None, created="")
    return StoredKey.from_record(sha256, raw)


class RedisKeyStore:
    """Keys from another store (the config) first, then from Redis, with a short local cache."""

    def __init__(self, first: KeyStore, client: RedisClient, settings: RedisSettings,
                 breaker: RedisBreaker) -> None:
        self._first = first
        self._batch = RedisBatcher(client)
        self._records = store_keys(settings.key_prefix)[0]
        self._ttl = settings.key_cache_seconds
        self._breaker = breaker
        # digest -> (trusted until (monotonic), the key); a stale entry still serves in an outage
        self._known: dict[str, tuple[float, ClientKey]] = {}
        # digest -> refused until (monotonic)
        self._unknown: dict[str, float] = {}

    async def lookup(self, key: str, *, cached_only: bool = False) -> ClientKey | None:
        found = await self._first.lookup(key, cached_only=cached_only)
        if found is not None:
            return found
        sha = hash_key(key)
        now = time.monotonic()
        known = self._known.get(sha)
        if known is not None and known[0] > now:
            return known[1]
        refused_until = self._unknown.get(sha)
        if refused_until is not None and refused_until > now:
            return None
        if known is None and cached_only:
            return None  # a throttled client's guess: not worth a round trip
        if self._breaker.up_for(self._records):
            try:
                raw = await self._batch.execute("HGET", self._records, sha)
            except REDIS_ERRORS as exc:
                self._breaker.failed(exc, self._records)
            else:
                if raw:
                    found = StoredKey.from_record(sha, raw).client_key()
                    _remember(self._known, sha, (now + self._ttl, found), MAX_CACHED)
                    return found
                self._known.pop(sha, None)  # revoked
                _remember(self._unknown, sha, now + self._ttl, MAX_CACHED_UNKNOWN)
                return None
        if known is not None:
            return known[1]
        if refused_until is not None:
            return None
        raise ServiceUnavailable("The gateway cannot check this API key now because its key "
                                 "store (Redis) is unreachable; retry shortly",
                                 headers={"Retry-After": "1"})

    async def close(self) -> None:
        await self._batch.close()


def _remember(cache: dict[str, Any], sha: str, entry: Any, most: int) -> None:
    """Put ``entry`` last in ``cache`` (insertion order: oldest first), dropping the oldest if
    ``cache`` holds ``most`` already."""
    cache.pop(sha, None)
    if len(cache) >= most:
        del cache[next(iter(cache))]
    cache[sha] = entry
