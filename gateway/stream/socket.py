"""One client WebSocket in the Responses API's WebSocket mode, relayed to the upstream's.

The life of a socket::

    IDLE ──response.create, admitted──> TURN ──terminal message──> IDLE
      │  └─refused: one error message─┘   │
      └── client closes, idle timeout, revoked, going away ──> CLOSED

- IDLE: the client's messages are read (with them aiohttp answers pings; ``heartbeat`` pings
  the client and closes a socket whose pong does not come). No message for
  ``[stream] idle_timeout_seconds`` closes the socket (1000). A message larger than
  ``[stream] max_body_bytes`` is refused by aiohttp itself, which closes with 1009.
- A text message is one ``response.create`` (``handlers/socket.py`` admits it: its fields, the
  model allow-list, the vision rules, its ``previous_response_id`` the key's own, one
  rate-limit token and a stream slot). A refused one gets one error message
  (``GatewayError.socket_message``) and the socket stays open.
- TURN: one at a time (another ``response.create`` meanwhile is refused). The upstream socket
  is opened at the first turn, with the operator's key (``upstream/sockets.py``), and kept for
  the client socket's life. The request goes up; the upstream's messages come back text frame
  for text frame, unchanged, until the turn's terminal message (``response.completed``,
  ``incomplete``, ``failed``, ``error``). Each is parsed, which decides: one that holds the
  operator's key, whole or in part, goes out with it taken out; a model alias is set back; the
  ``response.created`` message's response is recorded as the key's before it goes out.
  An upstream that closes, sends what is not a JSON object, or is silent past the first-byte
  or idle timeout ends the turn with an error message (and is reopened at the next turn). An
  upstream socket that closed between turns (the upstream's own idle limit) is replaced at
  the next turn, which goes up again on the new one.
- The turn is a request as far as shutdown is concerned (``InFlight.track``): the drain waits
  for it, and past the drain time ``stop`` ends it (``gateway_restarting``, then 1001). The
  socket itself is told to ``go_away`` when the drain begins: it closes (1001) at once if idle,
  else when its turn ends. A revoked key's socket gets an ``api_key_revoked`` message and is
  closed (1008) within ``key_cache_seconds`` (``InFlight.end_revoked``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from ..errors import (
    GatewayError,
    InvalidRequest,
    KeyRevoked,
    ShuttingDown,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from ..inflight import InFlight
from ..ratelimit.spend import Spend
from ..records import Recorder, created_id
from ..request_info import RequestInfo
from ..settings import StreamSettings
from ..upstream.errors import redact_strings
from ..upstream.sockets import SocketUpstreams, UpstreamSockets
from .dialect import usage_of
from .render import Rewrite

log = logging.getLogger("gateway")

_CLOSED = frozenset((WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR))
TURN_ENDS = frozenset(("response.completed", "response.incomplete", "response.failed", "error"))


@dataclass(slots=True)
class Turn:
    """One admitted ``response.create``: what goes up, and what its answer needs."""

    payload: str  # the message as the upstream gets it
    release: Callable[[], Awaitable[None]]  # the stream slot back
    recorder: Recorder | None = None
    rewrite: Rewrite | None = None
    model: str = ""  # as the upstream knows it: which upstreams serve it
    pinned: str | None = None  # the upstream its previous_response_id was made on
    spend: Spend | None = None  # the key's token and spend limits, reserved at admission
    usage: dict[str, Any] | None = None  # from the message that ended the turn
    events: int = 0  # messages relayed


Admit = Callable[[str], Awaitable[Turn]]
"""Checks one client message; returns its turn or raises the ``GatewayError`` that refuses it."""


class SocketSession:
    def __init__(self, ws: web.WebSocketResponse, upstreams: SocketUpstreams,
                 settings: StreamSettings, info: RequestInfo, in_flight: InFlight,
                 admit: Admit) -> None:
        self.ws = ws
        self.upstreams = upstreams
        self.settings = settings
        self.info = info
        self.in_flight = in_flight
        self.admit = admit
        self.upstream: aiohttp.ClientWebSocketResponse | None = None
        self.chosen: UpstreamSockets | None = None  # at the first turn, for the socket's life
        self.turn: asyncio.Task[None] | None = None
        self.leaving = False  # shutdown: close once the turn ends
        self.ending: asyncio.Task[None] | None = None

    async def run(self) -> None:
        ws = self.ws
        try:
            while not ws.closed:
                try:
                    msg = await ws.receive(timeout=self.settings.idle_timeout_seconds)
                except TimeoutError:
                    if self.turn is None:
                        await ws.close(code=WSCloseCode.OK, message=b"idle timeout")
                    continue
                if msg.type is WSMsgType.TEXT:
                    if self.turn is not None:
                        await self._error(InvalidRequest(
                            "A response is in progress on this socket; send the next "
                            "response.create once it is done", code="response_in_progress"))
                    elif self.leaving:
                        await self._error(ShuttingDown("The gateway is restarting; open a "
                                                       "new socket"))
                    else:
                        self.turn = asyncio.ensure_future(self._turn(msg.data))
                elif msg.type is WSMsgType.BINARY:
                    await self._error(InvalidRequest("Send each message as JSON text"))
                else:  # closed, closing, or an error (aiohttp closed it: 1009 for a message
                    break  # over max_msg_size)
        finally:
            if self.turn is not None:
                self.turn.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.turn
            if self.upstream is not None:
                await self.upstream.close()

    # What ``InFlight`` calls.

    def go_away(self) -> None:
        self.leaving = True
        if self.turn is None:
            self._end(None, WSCloseCode.GOING_AWAY)

    def stop(self) -> None:
        self._end(ShuttingDown("The gateway is restarting; retry the request"),
                  WSCloseCode.GOING_AWAY)

    def revoke(self) -> None:
        self._end(KeyRevoked("This API key was revoked; the socket closes"),
                  WSCloseCode.POLICY_VIOLATION)

    def _end(self, err: GatewayError | None, code: int) -> None:
        if self.ending is None and not self.ws.closed:
            self.ending = asyncio.ensure_future(self._ending(err, code))

    async def _ending(self, err: GatewayError | None, code: int) -> None:
        turn = self.turn
        if turn is not None and turn is not asyncio.current_task():
            turn.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await turn
        if err is not None:
            self.info.note_error(err)
            await self._error(err)
        with contextlib.suppress(Exception):
            await self.ws.close(code=code)

    # One turn.

    async def _turn(self, text: str) -> None:
        try:
            turn = await self.admit(text)
        except GatewayError as err:
            self.turn = None
            await self._error(err)
            return
        last: str | None = None
        try:
            with self.in_flight.track(self):
                last = await self._relay(turn)
        except GatewayError as err:
            await self._drop_upstream()
            self.info.note_error(err)
            last = err.socket_message()
        except (ConnectionError, RuntimeError) as e:  # the client left mid-turn
            log.debug("a socket's client left mid-turn: %s", type(e).__name__)
        finally:
            # One shielded step: a second cancellation cannot come between the two.
            await asyncio.shield(_turn_over(turn, self.info))
            # Over before its last message goes out: the client may send the next turn as
            # soon as it has read it, and finds the slot free and the socket ready.
            self.turn = None
        if last is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.send_str(last)
        if self.leaving:
            self._end(None, WSCloseCode.GOING_AWAY)

    async def _relay(self, turn: Turn) -> str:
        """Sends the turn's messages but its last, which it returns."""
        msg = await self._sent(turn)
        while True:
            if msg.type is not WSMsgType.TEXT:
                raise UpstreamProtocolError(
                    "The upstream's WebSocket closed mid-response" if msg.type in _CLOSED
                    else "The upstream sent a message that is not JSON text")
            out, kind = await self._checked(msg.data, turn)
            self.info.chunks += 1
            turn.events += 1
            self.info.bytes_out += len(out)
            if kind in TURN_ENDS:
                return out
            if turn.spend is not None and turn.spend.cut and \
                    (past := turn.spend.over(None, turn.events)) is not None:
                raise past  # on_token_overrun = "cut": the turn ends here, as a stream would
            await self.ws.send_str(out)
            msg = await self._received(self.settings.idle_timeout_seconds)

    async def _sent(self, turn: Turn) -> aiohttp.WSMessage:
        """The turn sent up, and the upstream's first answer to it. A socket kept from an
        earlier turn that the upstream has closed meanwhile (an idle limit of its own) is
        replaced, once."""
        kept = self.upstream is not None and not self.upstream.closed
        if not kept:
            if self.chosen is None:
                self.chosen = self.upstreams.choose(self.info, turn.model, turn.pinned)
            self.upstream = await self.chosen.connect()
        assert self.upstream is not None
        try:
            await self.upstream.send_str(turn.payload)
            msg: aiohttp.WSMessage | None = await self._received(
                self.settings.first_byte_timeout_seconds)
        except ConnectionError:
            if not kept:
                raise UpstreamProtocolError("The upstream's WebSocket closed at once") from None
            msg = None
        if kept and (msg is None or msg.type in _CLOSED):
            await self._drop_upstream()
            return await self._sent(turn)
        assert msg is not None
        return msg

    async def _received(self, timeout: float) -> aiohttp.WSMessage:
        assert self.upstream is not None
        try:
            return await self.upstream.receive(timeout=timeout)
        except TimeoutError:
            raise UpstreamTimeout(f"The upstream sent nothing for {timeout:g} seconds") from None

    async def _checked(self, text: str, turn: Turn) -> tuple[str, Any]:
        """One upstream message as it goes out, and its type; decided on its parsed value."""
        raw = text.encode("utf-8", "surrogatepass")
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            raise UpstreamProtocolError("The upstream sent a message that is not a JSON object")
        kind = obj.get("type")
        if turn.spend is not None and kind != "error":
            turn.spend.answered = True  # the upstream took the turn: from here on, it costs
        if kind == "response.created" and turn.recorder is not None:
            await turn.recorder(created_id(obj))  # before the id reaches the client
        elif kind in TURN_ENDS:
            turn.usage = usage_of(obj.get("response"))
            self.info.usage = _summed(self.info.usage, turn.usage)  # the socket's, so far
        secrets = self.upstreams.upstreams.secrets  # every upstream's key
        changed = False
        if secrets.probes and secrets.may_hold(raw, obj):
            clean = redact_strings(obj, secrets.text)
            changed, obj = clean != obj, clean
        if turn.rewrite is not None:
            turn.rewrite(obj)
            changed = True
        return (orjson.dumps(obj).decode() if changed else text), kind

    async def _drop_upstream(self) -> None:
        """After a failed turn the upstream socket's state is unknown: the next turn opens a
        new one."""
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            with contextlib.suppress(Exception):
                await upstream.close()

    async def _error(self, err: GatewayError) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.send_str(err.socket_message())


async def _turn_over(turn: Turn, info: RequestInfo) -> None:
    """The turn's charge settled as a stream's is (``ratelimit/spend.py``), then its stream
    slot given back."""
    try:
        if turn.spend is not None:
            await turn.spend.settle(info, turn.usage, turn.events)
    finally:
        await turn.release()


def _summed(total: dict[str, Any] | None, usage: dict[str, Any] | None, nested: bool = True
            ) -> dict[str, Any] | None:
    """A socket's usage: its turns' counts added up (and those of its ``*_details``, one level
    down: the upstream's nesting is not followed further), for its one log line and the token
    metrics; what is not a count is the latest turn's."""
    if not total or not usage:
        return usage or total
    out = dict(usage)
    for name, value in total.items():
        now = usage.get(name)
        if nested and isinstance(value, dict) and isinstance(now, dict):
            out[name] = _summed(value, now, nested=False)
        elif type(value) is int and type(now) is int:
            out[name] = value + now
    return out
