"""The limiter's Lua scripts in Redis (``token_bucket.lua``, ``renew_leases.lua``,
``budget.lua``): package data,
registered with ``register_script``, run by SHA through the batcher, and loaded again after
``NOSCRIPT`` (a ``SCRIPT FLUSH``, a Redis restart, a promoted replica) at the cost of one extra
round trip, once.

Why here and not through redis-py's ``Script.__call__``: a check is one ``EVALSHA`` in the
batcher's pipeline, with the other commands of that moment, where redis-py's script object
would send it alone, through the client's pool. So the reload that ``Script`` does on
``NOSCRIPT`` is done here, once for every command that met it: a burst after a ``SCRIPT FLUSH``
must not cost a load (and a connection) per check.

What this relies on in redis-py beyond its documented API, pinned by
``tests/test_redis_internals.py``: the object ``register_script`` returns carries the script's
text as ``script`` and its SHA1, the one ``SCRIPT LOAD`` answers, as ``sha``, a plain attribute
that may be set (after a reload, to the SHA Redis gave).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from importlib.resources import files
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from ..redis.batcher import RedisBatcher
from ..redis.topology import RedisClient, node_of


def _script(name: str) -> str:
    return files(__package__).joinpath(name).read_text(encoding="utf-8")


class LimiterScripts:
    """``await scripts.take_token(...)``, ``await scripts.renew(...)``: one ``EVALSHA`` each,
    through the batcher, sent again once after the script was loaded again."""

    def __init__(self, client: RedisClient, batch: RedisBatcher) -> None:
        self._client = client
        self._batch = batch
        self._take = client.register_script(_script("token_bucket.lua"))
        self._renew = client.register_script(_script("renew_leases.lua"))
        self._budget = client.register_script(_script("budget.lua"))
        # (script, cluster primary) -> its latest SCRIPT LOAD: (its number, the load)
        self._reloading: dict[tuple[str, str | None], tuple[int, asyncio.Future[Any]]] = {}
        self._loads = 0  # SCRIPT LOADs started: a command notes it when it is sent

    def take_token(self, bucket: str, streams: str, *args: Any) -> Awaitable[Any]:
        """token_bucket.lua for one key (its KEYS and ARGV: the script's header). The hot
        path's: the run itself is returned, not awaited in one more coroutine."""
        return self._run(self._take, 2, bucket, streams, *args)

    def renew(self, streams: str, lease_ms: int, leases: list[str]) -> Awaitable[Any]:
        """renew_leases.lua for one key (idempotent). EVALSHA as a plain command: redis-py
        refuses pipe.evalsha in a cluster pipeline."""
        return self._run(self._renew, 1, streams, lease_ms, *leases)

    def budget(self, key: str, *args: Any) -> Awaitable[Any]:
        """budget.lua for one key's budget hash (its ARGV: the script's header)."""
        return self._run(self._budget, 1, key, *args)

    async def _run(self, script: Any, numkeys: int, key: str, *rest: Any) -> Any:
        sent = self._loads
        try:
            return await self._batch.execute("EVALSHA", script.sha, numkeys, key, *rest)
        except NoScriptError:
            await self._reload(script, key, sent)
            return await self._batch.execute("EVALSHA", script.sha, numkeys, key, *rest)

    async def _reload(self, script: Any, key: str, sent: int) -> None:
        """One SCRIPT LOAD per script (and cluster primary), however many commands met NOSCRIPT
        together. A command sent when ``_loads`` was ``sent`` is served by a load still running
        or one started after it was sent: a batch that was on the wire while the load ran
        meets NOSCRIPT, its replies perhaps read only after the load has finished, and must
        not load again. Not through the batcher; on a cluster, on the primary of ``key`` only
        (a promoted replica has no scripts; another primary may be down)."""
        node = node_of(self._client, key)
        number, loading = self._reloading.get((script.script, node), (0, None))
        if loading is None or (loading.done() and number <= sent):
            self._loads += 1
            loading = asyncio.ensure_future(self._load(script.script, node))
            self._reloading[(script.script, node)] = (self._loads, loading)
        sha = await asyncio.shield(loading)
        script.sha = sha.decode() if isinstance(sha, bytes) else sha

    async def _load(self, script: str, node: str | None) -> Any:
        if node is None or not isinstance(self._client, RedisCluster):
            return await self._client.script_load(script)
        return await self._client.execute_command(
            "SCRIPT LOAD", script, target_nodes=self._client.get_node(node_name=node))
