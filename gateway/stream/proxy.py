"""The upstream call and the relay of its answer: what every handler's tail needs, built once per
app (where the upstream client is opened, since only there is the operator's key known) and
handed to handlers as ``app[PROXY]``. The byte path reads nothing from ``request.app``.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import orjson
from aiohttp import web

from ..errors import SSE_HEADERS
from ..inflight import InFlight
from ..metrics import Metrics
from ..records import Recorder
from ..request_info import REQUEST_INFO
from ..settings import Settings
from ..upstream.client import UpstreamClient
from ..upstream.http1 import UpstreamResponse
from .answers import PlainAnswers, response_headers
from .client_stream import ClientStream
from .dialect import CHAT, Dialect
from .recording import RecordingRelay
from .relay import StreamRelay
from .render import Rewrite, StreamRenderer


class Proxy:
    def __init__(self, upstream: UpstreamClient, settings: Settings, in_flight: InFlight,
                 metrics: Metrics) -> None:
        self.upstream = upstream
        self.stream_settings = settings.stream
        self.secrets = upstream.secrets  # built once, where the operator's key is known
        self.in_flight = in_flight
        self.open_streams = metrics.open_streams
        self.forward_headers = settings.upstream.forward_headers
        self.plain = PlainAnswers(in_flight, settings.stream.first_byte_timeout_seconds,
                                  settings.upstream.max_answer_bytes, self.secrets)

    def post(self, request: web.Request, path: str, body: dict[str, Any]
             ) -> Awaitable[UpstreamResponse]:
        """The upstream call for a checked body. It is serialized here, once: the upstream sees
        exactly what the gateway checked (one value per key, whatever the client sent), and the
        parsed body need not be kept while the answer streams."""
        return self.upstream.request("POST", path, body=orjson.dumps(body),
                                     headers=self._headers(request, "application/json"))

    def get(self, request: web.Request, path: str, method: str = "GET"
            ) -> Awaitable[UpstreamResponse]:
        """A request without a body (``GET``, or ``method``: a stored response's ``DELETE``,
        its ``cancel``)."""
        return self.upstream.request(method, path, headers=self._headers(request, None))

    def _headers(self, request: web.Request, content_type: str | None) -> dict[str, str]:
        """The gateway's own (the request id, the body's type) and the client's that
        ``[upstream] forward_headers`` names (xAI's ``x-grok-conv-id``), as they came."""
        headers = {name: value for name in self.forward_headers
                   if (value := request.headers.get(name))}
        headers["X-Request-ID"] = request[REQUEST_INFO].request_id
        if content_type is not None:
            headers["Content-Type"] = content_type
        return headers

    async def stream(self, request: web.Request, call: Awaitable[UpstreamResponse], *,
                     dialect: Dialect = CHAT, rewrite: Rewrite | None = None,
                     recorder: Recorder | None = None) -> web.StreamResponse:
        """Relay the upstream's event stream to the client (``gateway/stream/relay.py``); with
        a ``recorder``, the response it creates is recorded first (``stream/recording.py``)."""
        info = request[REQUEST_INFO]
        settings = self.stream_settings
        renderer = StreamRenderer(dialect, rewrite=rewrite, secrets=self.secrets,
                                  max_event_bytes=settings.max_event_bytes)
        headers = {**SSE_HEADERS, **response_headers(info)}
        if recorder is None:
            relay = StreamRelay(ClientStream(request), renderer, settings, info, headers,
                                self.secrets)
        else:
            relay = RecordingRelay(ClientStream(request), renderer, settings, info, headers,
                                   self.secrets, recorder=recorder)
        self.open_streams.inc()
        try:
            with self.in_flight.track_stream(relay, info.key):  # shutdown, revocation
                return await relay.run(call)
        finally:
            self.open_streams.dec()
