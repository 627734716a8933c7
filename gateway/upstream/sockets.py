"""The upstream's WebSocket mode (``GET /v1/responses`` upgraded: xAI's
``wss://api.x.ai/v1/responses``), opened with the operator's key.

The HTTP/1.1 client (``upstream/client.py``) speaks no WebSocket, so this one leans on
aiohttp's client, one ``ClientSession`` for the app's life, opened at the first socket (a
gateway whose clients never use WebSocket mode never opens it). Each client socket gets its
own upstream socket, opened at its first turn and kept for its life (``stream/socket.py``).

A refused handshake becomes the gateway's error as an HTTP answer would (``from_upstream``:
the operator's credentials refused are a 502 that says nothing of them); no route to the
upstream, ``UpstreamUnreachable``; no answer within the connect timeout, ``UpstreamTimeout``.
"""

from __future__ import annotations

import asyncio

import aiohttp

from ..errors import GatewayError, UpstreamTimeout, UpstreamUnreachable
from ..request_info import RequestInfo
from ..settings import StreamSettings
from .errors import from_upstream
from .secrets import Secrets
from .upstreams import UpstreamSet


def socket_url(base_url: str) -> str:
    """``http(s)://host/v1`` -> ``ws(s)://host/v1/responses``."""
    base = base_url.rstrip("/")
    scheme, rest = base.split("://", 1)
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/responses"


class UpstreamSockets:
    def __init__(self, base_url: str, api_key: str, settings: StreamSettings,
                 secrets: Secrets) -> None:
        self.url = socket_url(base_url)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._settings = settings
        self.secrets = secrets
        self._session: aiohttp.ClientSession | None = None

    async def connect(self) -> aiohttp.ClientWebSocketResponse:
        if self._session is None:
            # No cap on connections: each open client socket holds one to the upstream for its
            # life (aiohttp's default of 100 would leave the 101st waiting for a free one).
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), auto_decompress=False, trust_env=False)
        settings = self._settings
        try:
            async with asyncio.timeout(settings.connect_timeout_seconds):
                return await self._session.ws_connect(
                    self.url, headers=self._headers, autoping=True,
                    heartbeat=settings.keepalive_seconds,
                    max_msg_size=settings.max_event_bytes, compress=0)
        except aiohttp.WSServerHandshakeError as e:
            raise _refused(e, self.secrets) from None
        except TimeoutError:
            raise UpstreamTimeout("Timed out opening the upstream's WebSocket") from None
        except (aiohttp.ClientError, OSError) as e:
            raise UpstreamUnreachable(
                f"The upstream's WebSocket is unreachable ({type(e).__name__})") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class SocketUpstreams:
    """Every upstream's WebSocket mode, and the choice of the one a client socket keeps for
    its life: made at its first turn as a request's first try is (the turn's model, where
    its ``previous_response_id`` was made), and never moved."""

    def __init__(self, upstreams: UpstreamSet, by_name: dict[str, UpstreamSockets]) -> None:
        self.upstreams = upstreams
        self.by_name = by_name

    def choose(self, info: RequestInfo, model: str, pinned: str | None) -> UpstreamSockets:
        return self.by_name[self.upstreams.pick(info, model, pinned)]

    async def close(self) -> None:
        for sockets in self.by_name.values():
            await sockets.close()


def _refused(e: aiohttp.WSServerHandshakeError, secrets: Secrets) -> GatewayError:
    # aiohttp has read the answer's status but not its body; the status says enough.
    status = e.status if 400 <= e.status < 600 else 502
    return from_upstream(status, b"", {}, secrets.text)
