"""The model list: the upstream's, with aliases added, cached per app.

The upstream is asked at most once per ``[models] list_cache_seconds`` (0: every time); callers
arriving while it is being asked wait for that one answer. Each alias whose target the upstream
lists appears as a model of its own (a copy of the target's entry under the alias's name); the
upstream names stay listed, since they remain usable. What a caller sees is then filtered to
its key's allow-list, per request (the cache is shared by all keys).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from .errors import UpstreamProtocolError
from .request_info import ClientKey
from .settings import ModelSettings

Entry = dict[str, Any]


class ModelCatalog:
    def __init__(self, settings: ModelSettings) -> None:
        self._ttl = settings.list_cache_seconds
        self._aliases: Mapping[str, str] = settings.aliases
        self._entries: list[Entry] | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()

    async def entries(self, fetch: Callable[[], Awaitable[Any]]) -> list[Entry]:
        """Every model, from the cache or from ``fetch()`` (the upstream's ``GET models``)."""
        if self._entries is not None and time.monotonic() < self._expires:
            return self._entries
        async with self._lock:
            if self._entries is not None and time.monotonic() < self._expires:
                return self._entries  # fetched while we waited
            entries = self._with_aliases(await fetch())
            if self._ttl > 0:
                self._entries = entries
                self._expires = time.monotonic() + self._ttl
            return entries

    def _with_aliases(self, listing: Any) -> list[Entry]:
        data = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(data, list) or not all(
                isinstance(e, dict) and isinstance(e.get("id"), str) for e in data):
            raise UpstreamProtocolError("The upstream's model list is not a list of models")
        by_id = {e["id"]: e for e in data}
        aliases = [{**by_id[target], "id": alias} for alias, target in self._aliases.items()
                   if target in by_id and alias not in by_id]
        return list(data) + aliases


def visible(entries: list[Entry], key: ClientKey | None) -> list[Entry]:
    """The models ``key`` may use."""
    if key is None or key.models is None:
        return entries
    return [e for e in entries if key.may_use(e["id"])]
