"""The response records of one process, in memory: the default without ``[redis]``.

Bounded twice: each record is forgotten after the retention time, and past ``MAX_RECORDS`` the
oldest goes first, so that a flood of created responses cannot take the process's memory (its
owner then gets 404 for that response, as for any unknown id). Lost at a restart, and not
shared between workers: configure ``[redis]`` for records that every process sees and that
outlive a restart.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from . import Record, valid_id

MAX_RECORDS = 100_000
"""Records kept at most (each some 200 bytes of Python objects)."""


class MemoryRecords:
    def __init__(self, retention_seconds: float, max_records: int = MAX_RECORDS) -> None:
        self._retention = retention_seconds
        self._max = max_records
        # response id -> (forgotten at (monotonic), record); oldest first
        self._records: OrderedDict[str, tuple[float, Record]] = OrderedDict()

    async def record(self, response_id: str, owner: str, upstream: str = "") -> None:
        records = self._records
        records.pop(response_id, None)
        while len(records) >= self._max:
            records.popitem(last=False)
        records[response_id] = (time.monotonic() + self._retention, Record(owner, upstream))

    async def get(self, response_id: str) -> Record | None:
        if not valid_id(response_id):
            return None
        found = self._records.get(response_id)
        if found is None:
            return None
        if found[0] <= time.monotonic():
            del self._records[response_id]
            return None
        return found[1]

    async def forget(self, response_id: str) -> None:
        self._records.pop(response_id, None)

    async def close(self) -> None:
        self._records.clear()
