"""Requests being relayed, tracked so that a graceful shutdown can let them finish or end them
cleanly, and streams by their key, so that a revoked key's streams end.

Streams and plain requests alike register while they wait on the upstream. On shutdown
``drain`` waits for them up to the drain time, then tells each one to ``stop``: a stream then
ends with a ``gateway_restarting`` error frame, a plain request with a 503 of that code (see
``gateway.stream.relay`` and ``gateway.stream.answers``). A request that registers after that is
stopped at once. Stopping is a message to the request, never a cancellation of its task: a cancelled
handler means its client left.

A stream registers with its key too (``track_stream``). One task per process
(``gateway/monitoring.py``) calls ``end_revoked`` every ``key_cache_seconds``: the key store is
asked once about the distinct keys that have open streams, and each stream of a revoked key is
told to ``revoke`` (it ends with an ``api_key_revoked`` frame). A stream so costs nothing per
event, and nothing per stream but a dictionary entry.

A WebSocket (the Responses API's WebSocket mode) lives longer than any request: it registers
for its whole life with ``track_socket``, its key watched like a stream's, and is told to
``go_away`` when the drain begins (it closes with 1001 once its turn, if one runs, ends). Only
its turns are requests that the drain waits for (``track``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Protocol

from .request_info import ClientKey

log = logging.getLogger("gateway.inflight")


class Stoppable(Protocol):
    def stop(self) -> None:
        """End now, telling the client the gateway is restarting."""


class Revocable(Stoppable, Protocol):
    def revoke(self) -> None:
        """End now, telling the client its key was revoked."""


class Socket(Revocable, Protocol):
    def go_away(self) -> None:
        """The gateway is shutting down: close once the turn in progress, if any, ends."""


class KeyCheck(Protocol):
    """What ``end_revoked`` asks (``KeyStore.revoked``, ``gateway/auth.py``)."""

    async def revoked(self, keys: Sequence[ClientKey]) -> list[ClientKey]: ...


class InFlight:
    """Every relayed request, so shutdown can wait for them and then stop the rest."""

    def __init__(self) -> None:
        self._open: set[Stoppable] = set()
        self._streams: dict[Revocable, ClientKey] = {}  # open streams, by their key
        self._idle = asyncio.Event()
        self._idle.set()
        self._hurry = asyncio.Event()
        self._closed = False
        self._sockets: set[Socket] = set()
        self._draining = False

    def __len__(self) -> int:
        return len(self._open)

    @contextlib.contextmanager
    def track(self, request: Stoppable) -> Iterator[None]:
        self._add(request)
        try:
            yield
        finally:
            self._discard(request)

    @contextlib.contextmanager
    def track_stream(self, stream: Revocable, key: ClientKey | None) -> Iterator[None]:
        """``track``, and the stream's key remembered, for ``end_revoked``. (One context
        manager, not ``track`` nested in a second: every stream pays for each one.)"""
        if key is not None:
            self._streams[stream] = key
        self._add(stream)
        try:
            yield
        finally:
            self._streams.pop(stream, None)
            self._discard(stream)

    @contextlib.contextmanager
    def track_socket(self, socket: Socket, key: ClientKey | None) -> Iterator[None]:
        """A WebSocket, for its whole life: its key watched as a stream's (``end_revoked``),
        and told to go away when the drain begins. Not a request the drain waits for."""
        if key is not None:
            self._streams[socket] = key
        self._sockets.add(socket)
        if self._draining:
            socket.go_away()
        try:
            yield
        finally:
            self._streams.pop(socket, None)
            self._sockets.discard(socket)

    def _add(self, request: Stoppable) -> None:
        self._open.add(request)
        self._idle.clear()
        if self._closed:
            request.stop()  # the drain time is over; this request was still on its way in

    def _discard(self, request: Stoppable) -> None:
        self._open.discard(request)
        if not self._open:
            self._idle.set()

    async def end_revoked(self, store: KeyCheck) -> int:
        """Ask ``store`` once about the keys of the open streams; end the streams of those
        revoked. The number of streams ended."""
        if not self._streams:
            return 0
        # Distinct by identity (one lookup's answer is shared by the streams it admitted);
        # the list keeps them alive, so no id is reused while the store is asked.
        keys = list({id(k): k for k in self._streams.values()}.values())
        revoked = {id(k): k.name for k in await store.revoked(keys)}
        ended = [s for s, k in self._streams.items() if id(k) in revoked]
        for stream in ended:
            stream.revoke()
        if ended:
            log.warning("ended %d open streams of revoked keys: %s", len(ended),
                        ", ".join(sorted(set(revoked.values()))))
        return len(ended)

    def stop_waiting(self) -> None:
        """End a drain in progress now (a second SIGTERM or Ctrl-C)."""
        self._hurry.set()

    async def drain(self, seconds: float) -> None:
        """Tell the sockets to go away, wait up to ``seconds`` for open requests to end, then
        stop the rest."""
        self._draining = True
        for socket in list(self._sockets):
            socket.go_away()
        if self._open:
            log.info("draining %d open requests for up to %gs", len(self._open), seconds)
            idle = asyncio.ensure_future(self._idle.wait())
            hurry = asyncio.ensure_future(self._hurry.wait())
            try:
                await asyncio.wait((idle, hurry), timeout=seconds,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                idle.cancel()
                hurry.cancel()
        self._closed = True
        remaining = list(self._open)
        for request in remaining:
            request.stop()
        if remaining:
            log.warning("ended %d requests still open after the drain time", len(remaining))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._idle.wait()
