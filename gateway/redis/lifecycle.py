"""The app's Redis, from start-up to shutdown: one client and one breaker, shared by the rate
limiter and the key store, opened and closed in one place (the app's cleanup context), and the
health answer that readiness reports.

Why shared: an outage is then noticed, logged and probed once, whichever of them met it first,
and one sentinel follower keeps the one client's connections on the current primary. Why it
never fails start-up: a Redis that does not answer yet only opens the breaker, and the failure
policy applies until Redis answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ClusterError

from ..settings import RedisSettings
from ..tasks import cancel_and_wait
from .breaker import RedisBreaker
from .topology import (
    REDIS_ERRORS,
    RedisClient,
    close,
    connect,
    describe,
    follow_sentinel_primary,
    ping,
    primaries_answering,
)

log = logging.getLogger("gateway.redis")


async def redis_health(client: RedisClient) -> str | None:
    """None when every primary answers; on a cluster with some down, how many answer; raises
    when none does."""
    if not isinstance(client, RedisCluster):
        await ping(client)
        return None
    answering, primaries = await primaries_answering(client)
    if answering == 0:
        raise ClusterError(f"none of the cluster's {primaries} primaries answers")
    if answering < primaries:
        return (f"degraded: {answering} of {primaries} primaries answer (keys on them are "
                "served from Redis)")
    return None


@contextlib.asynccontextmanager
async def open_redis(settings: RedisSettings
                     ) -> AsyncIterator[tuple[RedisClient, RedisBreaker]]:
    """The app's Redis client and breaker, open for the app's whole life.

    A Redis that does not answer at start-up does not stop the gateway: the breaker opens and
    the failure policy applies until Redis answers.
    """
    client = connect(settings)
    breaker = RedisBreaker(client, settings)
    follower = asyncio.get_running_loop().create_task(follow_sentinel_primary(client, settings))
    try:
        try:
            await ping(client)
        except REDIS_ERRORS as exc:
            breaker.failed(exc)
        else:
            log.info("rate limits and keys shared through Redis at %s (prefix %r)",
                     describe(settings), settings.key_prefix)
        yield client, breaker
    finally:
        await cancel_and_wait(follower)
        await breaker.close()
        await close(client)
