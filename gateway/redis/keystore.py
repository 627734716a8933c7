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

A revoked key's open streams end too: the key each one was looked up with carries its digest
(``StoredClientKey``), and ``revoked`` asks Redis about all of a process's streaming keys in one
``HMGET`` (``InFlight.end_revoked``, every ``key_cache_seconds``).

A record is read as data someone else wrote (an older gateway, an operator's ``HSET``): one that
is not what ``StoredKey.record`` writes is a ``DamagedRecord``, never an exception past this
module. ``gateway keys list`` names it; its key gets 403 (``KeyRecordDamaged``) with one log
line per cache period, until the operator revokes the key and adds it again.
"""

from __future__ import annotations

import datetime
import logging
import math
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import orjson
from redis.exceptions import WatchError

from ..auth import KeyStore
from ..errors import KeyRecordDamaged, ServiceUnavailable, bounded
from ..request_info import ClientKey
from ..settings import MAX_INT, Limits, RedisSettings, hash_key
from .batcher import RedisBatcher
from .breaker import RedisBreaker
from .topology import REDIS_ERRORS, RedisClient

log = logging.getLogger("gateway.keys")

KEY_PREFIX = "sk-gw-"
MAX_CACHED = 10_000
"""Known keys remembered at most; beyond it the one confirmed longest ago is forgotten first
(only ever for another known key)."""
MAX_CACHED_UNKNOWN = 1_000
"""Unknown digests remembered at most, apart from the known keys; the oldest goes first."""

_BUDGET = ("tokens_per_minute", "tokens_per_day", "usd_per_day", "usd_per_month")
"""A key's token and spend limits, in its record only when set."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,63}")


def store_keys(prefix: str) -> tuple[str, str]:
    """The records hash and the names hash."""
    return f"{prefix}:{{keys}}:records", f"{prefix}:{{keys}}:names"


@dataclass(slots=True)
class StoredClientKey(ClientKey):
    """A caller whose key is in Redis, with the key's digest: so that ``RedisKeyStore.revoked``
    can tell later whether the key its streams were opened with is still there. The digest is
    no secret, but no log line or metric shows it (``repr=False``; they show the name)."""

    sha256: str = field(default="", repr=False)


class DamagedRecord(ValueError):
    """A record in Redis that is not one ``StoredKey.record`` writes: ``problem`` says what is
    wrong; ``name`` is the key's name where one can be read (else None)."""

    def __init__(self, sha256: str, name: str | None, problem: str) -> None:
        super().__init__(problem)
        self.sha256 = sha256
        self.name = name
        self.problem = problem

    @property
    def label(self) -> str:
        """The name, or the digest's short id (as ``gateway keys list`` shows it)."""
        return self.name if self.name is not None else self.sha256[:8] + "…"


@dataclass(frozen=True, slots=True)
class StoredKey:
    """One key's record in Redis: everything but the key."""

    name: str
    sha256: str
    limits: Limits
    models: frozenset[str] | None
    created: str

    def client_key(self) -> StoredClientKey:
        return StoredClientKey(name=self.name,
                               requests_per_minute=self.limits.requests_per_minute,
                               burst=self.limits.burst,
                               max_concurrent_streams=self.limits.max_concurrent_streams,
                               models=self.models, budget=self.limits.budget,
                               sha256=self.sha256)

    def record(self) -> bytes:
        return orjson.dumps({
            "name": self.name,
            "requests_per_minute": self.limits.requests_per_minute,
            "burst": self.limits.burst,
            "max_concurrent_streams": self.limits.max_concurrent_streams,
            **{name: getattr(self.limits, name) for name in _BUDGET
               if getattr(self.limits, name)},
            "models": None if self.models is None else sorted(self.models),
            "created": self.created,
        })

    @classmethod
    def from_record(cls, sha256: str, raw: bytes | str) -> StoredKey:
        """The record, checked as the CLI and the config check limits; ``DamagedRecord``
        naming the first thing wrong with it otherwise (and nothing else raises)."""
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:  # not UTF-8 either
            raise DamagedRecord(sha256, None, "the record is not JSON") from None
        if not isinstance(data, dict):
            raise DamagedRecord(sha256, None, "the record is not a JSON object")
        name = data.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise DamagedRecord(sha256, None, f"name: not a key name: {_shown(data, 'name')}")

        def fail(problem: str) -> DamagedRecord:
            return DamagedRecord(sha256, name, problem)

        rpm = data.get("requests_per_minute")
        if not (_is_number(rpm) and math.isfinite(rpm) and 0 < rpm <= MAX_INT):
            raise fail("requests_per_minute: must be a finite number above 0, got "
                       + _shown(data, "requests_per_minute"))
        for count in ("burst", "max_concurrent_streams"):
            value = data.get(count)
            if not (_is_number(value) and isinstance(value, int) and 1 <= value <= MAX_INT):
                raise fail(f"{count}: must be a whole number from 1 to {MAX_INT}, got "
                           + _shown(data, count))
        for limit in _BUDGET:  # absent: no such limit (records written before they existed)
            value = data.get(limit, 0)
            if not (_is_number(value) and math.isfinite(value) and 0 <= value <= MAX_INT
                    and (isinstance(value, int) or limit.startswith("usd"))):
                raise fail(f"{limit}: must be a number from 0 to {MAX_INT}"
                           f"{'' if limit.startswith('usd') else ' (whole)'}, got "
                           + _shown(data, limit))
        models = data.get("models")
        if models is not None and not (isinstance(models, list)
                                       and all(isinstance(m, str) for m in models)):
            raise fail(f"models: must be null or a list of names, got {_shown(data, 'models')}")
        created = data.get("created", "")
        if not isinstance(created, str):
            raise fail(f"created: must be a string, got {_shown(data, 'created')}")
        return cls(name=name, sha256=sha256,
                   limits=Limits(requests_per_minute=float(rpm), burst=data["burst"],
                                 max_concurrent_streams=data["max_concurrent_streams"],
                                 **{limit: data.get(limit, 0) for limit in _BUDGET}),
                   models=None if models is None else frozenset(models), created=created)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(data: Mapping[str, Any], field_name: str) -> str:
    """A field's value as JSON, bounded (a record is anyone's data)."""
    if field_name not in data:
        return "nothing (the field is missing)"
    return bounded(orjson.dumps(data[field_name]).decode(), 40)


def _text(value: bytes | str) -> str:
    """A field or value of the store's hashes, which anyone with Redis access can write."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


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


async def list_keys(client: RedisClient, prefix: str
                    ) -> tuple[list[StoredKey], list[DamagedRecord]]:
    """Every record, by name: the keys, and apart from them the records that are damaged (one
    whose name cannot be read is named from the names hash where that holds its digest)."""
    records, names = store_keys(prefix)
    keys: list[StoredKey] = []
    damaged: list[DamagedRecord] = []
    for sha, raw in (await client.hgetall(records)).items():
        try:
            keys.append(StoredKey.from_record(_text(sha), raw))
        except DamagedRecord as e:
            damaged.append(e)
    if any(d.name is None for d in damaged):
        by_digest = {_text(sha): _text(name) for name, sha in
                     (await client.hgetall(names)).items()}
        for d in damaged:
            d.name = d.name or by_digest.get(d.sha256)
    return sorted(keys, key=lambda k: k.name), sorted(damaged, key=lambda d: d.label)


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
    if raw is not None:
        try:
            return StoredKey.from_record(sha256, raw)
        except DamagedRecord:
            pass  # revoking is how a damaged record is mended: it is gone all the same
    # A name whose record was lost or damaged: the name is cleaned up all the same.
    return StoredKey(name=name, sha256=sha256, limits=Limits(), models=None, created="")


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
        # digest -> refused as damaged until (monotonic): one log line per key and period
        self._damaged: dict[str, float] = {}

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
        if self._damaged.get(sha, 0.0) > now:
            raise _damaged()
        if known is None and cached_only:
            return None  # a throttled client's guess: not worth a round trip
        if self._breaker.up_for(self._records):
            try:
                raw = await self._batch.execute("HGET", self._records, sha)
            except REDIS_ERRORS as exc:
                self._breaker.failed(exc, self._records)
            else:
                if raw:
                    return self._found(sha, raw, now)
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

    def _found(self, sha: str, raw: bytes, now: float) -> ClientKey:
        """The key a record describes, remembered; a damaged record's key is refused."""
        try:
            found = StoredKey.from_record(sha, raw).client_key()
        except DamagedRecord as e:
            self._known.pop(sha, None)
            _remember(self._damaged, sha, now + self._ttl, MAX_CACHED_UNKNOWN)
            # By name only: the digest stays out of the logs (``keys list`` shows its id).
            log.error("the key %s is refused with 403: its record in Redis is damaged (%s); "
                      "revoke it and add it again",
                      repr(e.name) if e.name else "whose record has no readable name (gateway "
                      "keys list names it)", e.problem)
            raise _damaged() from None
        self._damaged.pop(sha, None)
        _remember(self._known, sha, (now + self._ttl, found), MAX_CACHED)
        return found

    async def revoked(self, keys: Sequence[ClientKey]) -> list[ClientKey]:
        """Those of ``keys`` (the objects themselves) whose record is gone from Redis, asked in
        one ``HMGET``; from now on this process refuses them at once. The others are the first
        store's (the config's) to answer. While Redis is unreachable, none is known revoked: a
        revocation needs Redis too."""
        stored = [k for k in keys if isinstance(k, StoredClientKey)]
        first = await self._first.revoked([k for k in keys if not isinstance(k, StoredClientKey)])
        if not stored or not self._breaker.up_for(self._records):
            return first
        digests = list(dict.fromkeys(k.sha256 for k in stored))
        try:
            records = await self._batch.execute("HMGET", self._records, *digests)
        except REDIS_ERRORS as exc:
            self._breaker.failed(exc, self._records)
            return first
        gone = {sha for sha, raw in zip(digests, records, strict=True) if not raw}
        until = time.monotonic() + self._ttl
        for sha in gone:
            self._known.pop(sha, None)
            _remember(self._unknown, sha, until, MAX_CACHED_UNKNOWN)
        return first + [k for k in stored if k.sha256 in gone]

    async def close(self) -> None:
        await self._batch.close()


def _damaged() -> KeyRecordDamaged:
    return KeyRecordDamaged("This API key's record in the gateway's key store is damaged, so "
                            "the key cannot be used; the gateway's operator must revoke it and "
                            "add it again")


def _remember(cache: dict[str, Any], sha: str, entry: Any, most: int) -> None:
    """Put ``entry`` last in ``cache`` (insertion order: oldest first), dropping the oldest if
    ``cache`` holds ``most`` already."""
    cache.pop(sha, None)
    if len(cache) >= most:
        del cache[next(iter(cache))]
    cache[sha] = entry
