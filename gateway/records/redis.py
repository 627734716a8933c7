"""The response records in Redis, shared by every process and host (chosen when ``[redis]`` is
configured, as the rate limiter's backend is).

Layout: one string per response, ``<prefix>:resp:<response id>`` -> ``Record.encode()`` (a JSON
array: ``["alice"]``), written with ``SET ... EX <retention>``, so Redis forgets it when the
upstream does. No hash tag: on a cluster the records spread over every shard (an id has no
braces: ``valid_id``). Each command goes through the auto-pipelining batcher
(``redis/batcher.py``): a created response costs one ``SET`` in the batch of its moment, a
check one ``GET``.

While Redis is unreachable (the breaker shared with the limiter and the key store is open) a
record is not written (logged; its owner gets 404 for that response) and a check cannot be
answered: 503, since the gateway can neither show nor hide the response.
"""

from __future__ import annotations

import logging

from ..errors import ServiceUnavailable
from ..redis.batcher import RedisBatcher
from ..redis.breaker import RedisBreaker
from ..redis.topology import REDIS_ERRORS, RedisClient
from . import Record, valid_id

log = logging.getLogger("gateway.records")


def record_key(prefix: str, response_id: str) -> str:
    return f"{prefix}:resp:{response_id}"


class RedisRecords:
    def __init__(self, client: RedisClient, prefix: str, retention_seconds: float,
                 breaker: RedisBreaker) -> None:
        self._batch = RedisBatcher(client)
        self._prefix = prefix
        self._retention = max(1, round(retention_seconds))
        self._breaker = breaker

    async def record(self, response_id: str, owner: str, upstream: str = "") -> None:
        key = record_key(self._prefix, response_id)
        if self._breaker.up_for(key):
            try:
                await self._batch.execute("SET", key, Record(owner, upstream).encode(), "EX",
                                          self._retention)
                return
            except REDIS_ERRORS as exc:
                self._breaker.failed(exc, key)
        log.warning("the owner of a response created now was not recorded: Redis is "
                    "unreachable (its key %r will get 404 for it)", owner)

    async def get(self, response_id: str) -> Record | None:
        if not valid_id(response_id):
            return None
        key = record_key(self._prefix, response_id)
        if self._breaker.up_for(key):
            try:
                raw = await self._batch.execute("GET", key)
            except REDIS_ERRORS as exc:
                self._breaker.failed(exc, key)
            else:
                return None if raw is None else Record.decode(raw)
        raise ServiceUnavailable("The gateway cannot check who owns this response now because "
                                 "its store (Redis) is unreachable; retry shortly",
                                 headers={"Retry-After": "1"})

    async def forget(self, response_id: str) -> None:
        key = record_key(self._prefix, response_id)
        if self._breaker.up_for(key):
            try:
                await self._batch.execute("DEL", key)
                return
            except REDIS_ERRORS as exc:
                self._breaker.failed(exc, key)
        log.warning("the record of a deleted response was not removed: Redis is unreachable "
                    "(Redis forgets it after the retention time)")

    async def close(self) -> None:
        await self._batch.close()
