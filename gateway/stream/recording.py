"""A Responses stream that records the response it creates before the client learns its id.

The id arrives in the stream's ``response.created`` event (the renderer notes it: ``Kind.CREATED``,
``gateway/stream/dialect.py``, on the exact path every Responses event takes). The read that holds
it is not written yet: the relay is PAUSED (the upstream not read, the watchdog counting the
pause as for a slow client) while the record is written (``records.Recorder``: one ``SET`` in
Redis' batch of that moment), then the read goes out and the stream goes on. So a retrieval
right after the stream ends, on any process, finds the record. A read that also ends the
stream (a short answer, whole in one read) is held by the relay anyway until ``_close``, which
waits for the record first.

Only ``POST responses`` that the upstream stores (``store`` not false) take this relay;
chat, and a stored stream replayed (``GET responses/{id}?stream=true``), take ``StreamRelay``
itself and pay nothing for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from ..records import Recorder, created_id
from ..upstream.http1 import UpstreamResponse
from .relay import State, StreamRelay

log = logging.getLogger("gateway.records")


class RecordingRelay(StreamRelay):
    # No __slots__: a relay of several upstreams that records is both this and a
    # ``FailoverRelay`` (``stream/failover.py``), and two bases may not both add slots.

    def __init__(self, *args: Any, recorder: Recorder, **rest: Any) -> None:
        super().__init__(*args, **rest)
        self.recorder = recorder
        self.recording: asyncio.Future[None] | None = None

    def _send(self, out: bytes, done: bool, failure: Any) -> None:
        created = self.renderer.created
        if created is None:
            super()._send(out, done, failure)
            return
        self.renderer.created = None
        self.recording = asyncio.ensure_future(self.recorder(created_id(created)))
        if done or failure is not None or not out or self.state is not State.STREAMING:
            super()._send(out, done, failure)  # held until ``_close``, which waits for it
            return
        assert self.upstream is not None and self.watchdog is not None
        self.state = State.PAUSED
        self.upstream.pause_reading()
        self.watchdog.pause()
        self.drainer = asyncio.get_running_loop().create_task(self._send_when_recorded(out))

    async def _recorded(self) -> None:
        recording = self.recording
        if recording is not None:
            try:
                await asyncio.shield(recording)
            except Exception:  # a bug (a recorder logs what it could not write)
                log.exception("recording a created response failed")

    async def _send_when_recorded(self, out: bytes) -> None:
        await self._recorded()
        if self.state is not State.PAUSED:
            return  # the stream ended meanwhile: the id never reaches the client
        if self.info.first_byte is None:
            self.info.first_byte = time.monotonic()
        try:
            self.client.write(out)
        except Exception as e:  # noqa: BLE001 (a client gone: the end)
            self.finish(e)
            return
        await self._resume_when_drained()

    async def _close(self, reason: BaseException | None, task: asyncio.Future[UpstreamResponse]
                     ) -> web.StreamResponse:
        try:
            await self._recorded()
        except asyncio.CancelledError:  # the client left: the one way out still runs
            self._release(task, clean=False)
            raise
        return await super()._close(reason, task)
