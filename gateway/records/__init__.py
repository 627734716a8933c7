"""Who owns each stored response: the record the gateway keeps of every response created
through it, so that only the key that created one may read, list, delete, cancel, resume or
continue it.

Why: the gateway serves many client keys from one upstream account, and a stored response
belongs to the account. Without a record any client could reach another's conversation by its
id. With one, a response of another key's, and one the gateway never saw, do not exist: 404,
and the upstream is not asked (``handlers/owned.py``).

A record is small (the key's name and, with several upstreams, the upstream's name: a few
dozen bytes in Redis, ``docs/api.md`` gives the memory per million records) and kept for
``[responses] retention_seconds``, as long as the upstream keeps the response. Two backends
share the ``ResponseRecords`` interface: ``records/memory.py`` (one process, bounded) and
``records/redis.py`` (every process and host, chosen like the rate limiter's when ``[redis]``
is configured).

Ids come from the upstream (an answer, an event) and from clients (a path, a body): both are
hostile. Only an id that ``valid_id`` accepts is ever recorded or looked up; any other is no
response at all.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from ..request_info import RequestInfo
from ..settings import DEFAULT_UPSTREAM

log = logging.getLogger("gateway.records")

MAX_ID_CHARS = 128
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-.:]{0,%d}" % (MAX_ID_CHARS - 1))
"""xAI's ids are UUIDs, OpenAI's ``resp_`` and hex: letters, digits and a few separators, far
under the bound. Nothing else may become part of a Redis key or an upstream path."""


def valid_id(value: Any) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Record:
    owner: str  # the client key's name
    upstream: str = ""  # the upstream that holds the response ("" while there is only one)

    def encode(self) -> bytes:
        """The compact stored form: a JSON array, the upstream left out while it is empty."""
        return orjson.dumps([self.owner, self.upstream] if self.upstream else [self.owner])

    @classmethod
    def decode(cls, raw: bytes | str) -> Record | None:
        """A stored record, or None for one this gateway did not write (no owner: no access)."""
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(value, list) or not 1 <= len(value) <= 2 or \
                not all(isinstance(v, str) for v in value) or not value[0]:
            return None
        return cls(*value)


class ResponseRecords(Protocol):
    """Where the records live. ``get`` of an invalid id is None (never an error)."""

    async def record(self, response_id: str, owner: str, upstream: str = "") -> None:
        """Remember the response's owner for the retention time; never raises (a record that
        could not be written is logged: its owner then gets 404 for it, as for any unknown
        id)."""

    async def get(self, response_id: str) -> Record | None: ...

    async def forget(self, response_id: str) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Recorder:
    """What an answer that creates a response calls with the response's id, before the id
    reaches the client: a retrieval right after the answer ends must find the record."""

    records: ResponseRecords
    owner: str
    info: RequestInfo | None = None  # its ``upstream`` made the response

    async def __call__(self, response_id: Any) -> None:
        if valid_id(response_id):
            upstream = self.info.upstream if self.info is not None else None
            # The one upstream of ``[upstream]`` alone goes unnamed: a few bytes a record, and
            # its records still lead there once more upstreams are added beside it.
            if upstream == DEFAULT_UPSTREAM:
                upstream = None
            await self.records.record(response_id, self.owner, upstream or "")
        elif response_id is not None:
            log.warning("a response id from the upstream was not recorded: not an id this "
                        "gateway accepts (at most %d letters, digits, '_-.:')", MAX_ID_CHARS)


def created_id(obj: Any) -> Any:
    """The id of the response a parsed answer (a ``response`` object) or a
    ``response.created`` event holds; None when it holds none."""
    if not isinstance(obj, dict):
        return None
    inner = obj.get("response")
    if isinstance(inner, dict):
        obj = inner
    return obj.get("id") if obj.get("object", "response") == "response" else None
