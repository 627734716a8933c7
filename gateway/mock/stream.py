"""How the mock upstream streams: ``stream_events`` writes a list of events as an SSE response,
paced and broken as the request's ``mock`` options ask (``gateway/mock/upstream.py`` documents
them), and ``MockState`` (``app[MOCK_STATE]``) keeps what the mock saw and did, for tests to
assert on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..stream.client_stream import ClientStream
from . import faults
from .replies import encode_event


@dataclass
class MockState:
    style: str = "xai"  # the default of the ``style`` option, for the whole mock
    models: tuple[str, ...] = ()  # the models it serves (``upstream.MODELS``)
    requests: list[dict[str, Any]] = field(default_factory=list)
    open_streams: int = 0
    peak_open_streams: int = 0  # the most streams open at once
    completed_streams: int = 0
    disconnects: int = 0  # streams whose client (the gateway) went away before the end
    last_disconnect: float = 0.0  # time.monotonic() of the last one
    max_records: int = 1000
    tags: dict[str, int] = field(default_factory=dict)  # requests seen per ``tag`` option
    answer_bytes_sent: int = 0  # of ``answer_bytes`` answers, what the socket took
    name: str | None = None  # said in every answer (``create_mock_app(name=...)``)
    # Options every POST gets, over its own: a mock that always fails ({"status": 500}), one
    # whose streams die ({"disconnect_after": 2}), and so on.
    forced: dict[str, Any] = field(default_factory=dict)
    sockets_opened: int = 0  # WebSocket-mode sockets (``socket.py``)
    _open_waiters: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list,
                                                                  repr=False)

    def stream_opened(self) -> None:
        self.open_streams += 1
        self.peak_open_streams = max(self.peak_open_streams, self.open_streams)
        if self._open_waiters:
            for target, waiter in self._open_waiters:
                if target <= self.open_streams and not waiter.done():
                    waiter.set_result(None)
            self._open_waiters = [w for w in self._open_waiters if not w[1].done()]

    async def wait_until_open(self, target: int, timeout: float) -> None:
        """Return once ``target`` streams are open at the same time, or after ``timeout``."""
        if self.open_streams >= target:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._open_waiters.append((target, waiter))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter, timeout)

    def note_disconnect(self) -> None:
        self.disconnects += 1
        self.last_disconnect = time.monotonic()

    def record(self, request: web.Request, body: Any, raw: bytes = b"") -> None:
        if len(self.requests) < self.max_records:
            self.requests.append({"path": request.path, "method": request.method,
                                  "headers": dict(request.headers), "body": body, "raw": raw})


MOCK_STATE = web.AppKey("mock_state", MockState)
_PACING = ("pause_after", "disconnect_after", "hang_after")
_BATCH_BYTES = 64 * 1024


async def _write_batched(response: web.StreamResponse, events: list[bytes]) -> None:
    batch: list[bytes] = []
    size = 0
    for event in events:
        batch.append(event)
        size += len(event)
        if size >= _BATCH_BYTES:
            await response.write(b"".join(batch))
            batch, size = [], 0
    if batch:
        await response.write(b"".join(batch))


async def stream_events(request: web.Request, events: list[bytes], opts: dict[str, Any],
                        done: bytes | None = b"data: [DONE]\n\n",
                        error_event: Callable[[int], bytes] = faults.chat_error_event
                        ) -> web.StreamResponse:
    """Write ``events`` as an SSE response, misbehaving as ``opts`` asks. ``error_event(n)`` is
    the API's own mid-stream error, sent as the ``n``-th event for ``error_after``."""
    state = request.app[MOCK_STATE]
    fmt = opts.get("format", "oneline")
    if done is not None and not opts.get("no_done"):
        events = events + [encode_event(done[6:-2], fmt) if fmt in ("crlf", "cr") else done]
    for name in ("error_after", "malformed_after"):
        after = opts.get(name)
        if isinstance(after, int):
            bad = error_event(after) if name == "error_after" else b"data: {this is not json\n\n"
            events = events[:after] + [bad]
    inject = opts.get("inject_after")
    if isinstance(inject, int):
        events = events[:inject] + [bytes.fromhex(str(opts.get("inject_hex", "")))] \
            + events[inject:]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    state.stream_opened()
    finished = False
    try:
        if opts.get("first_token_delay"):
            await asyncio.sleep(float(opts["first_token_delay"]))
        delay = float(opts.get("chunk_delay", 0))
        split = opts.get("split")
        if not (delay or split or any(k in opts for k in _PACING)):
            # A burst: events leave back to back, as from a fast upstream, in writes of up to
            # 64 KiB, so that the mock is not what limits a load test.
            await _write_batched(response, events)
            events = []
        for i, event in enumerate(events):
            if i and delay:
                await asyncio.sleep(delay)
            if i == opts.get("pause_after"):
                if isinstance(opts.get("hold_until_open"), int):
                    await state.wait_until_open(opts["hold_until_open"],
                                                float(opts.get("pause", 1)))
                else:
                    await asyncio.sleep(float(opts.get("pause", 1)))
            if i == opts.get("disconnect_after"):
                ClientStream(request).abort()  # the one adapter that touches the transport
                return response
            if i == opts.get("hang_after"):
                await asyncio.sleep(3600)
            if isinstance(split, int) and split > 0:
                for j in range(0, len(event), split):
                    await response.write(event[j:j + split])
            else:
                await response.write(event)
        await response.write_eof()
        finished = True
        state.completed_streams += 1
        return response
    finally:
        state.open_streams -= 1
        if not finished and not opts.get("disconnect_after"):
            state.note_disconnect()
