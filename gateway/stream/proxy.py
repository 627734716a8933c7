"""The upstream call and the relay of its answer: what every handler's tail needs, built once per
app (where the upstream clients are opened, since only there are the operator's keys known) and
handed to handlers as ``app[PROXY]``. The byte path reads nothing from ``request.app``.

With one upstream the call is its client's, as it always was. With several it is an ``Attempts``
(``gateway/upstream/upstreams.py``): the upstream chosen by the request's model and affinity
(``x-grok-conv-id``, or a Responses request's ``prompt_cache_key``), moved to the next one on a
failure before any output, and a stream is relayed by ``FailoverRelay``
(``gateway/stream/failover.py``), which can still move it after the headers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

import orjson
from aiohttp import web

from ..errors import SSE_HEADERS
from ..inflight import InFlight
from ..metrics import Metrics
from ..ratelimit.spend import Spend
from ..records import Recorder
from ..request_info import REQUEST_INFO, RequestInfo
from ..settings import Settings
from ..upstream.http1 import UpstreamResponse
from ..upstream.router import union_of_lists
from ..upstream.upstreams import Attempts, UpstreamSet
from .answers import PlainAnswers, response_headers
from .client_stream import ClientStream
from .dialect import CHAT, Dialect
from .failover import FailoverRelay, RecordingFailoverRelay
from .preamble import PreambleHeld
from .recording import RecordingRelay
from .relay import StreamRelay
from .render import Rewrite, StreamRenderer

AFFINITY_HEADER = "x-grok-conv-id"


class Proxy:
    def __init__(self, upstreams: UpstreamSet, settings: Settings, in_flight: InFlight,
                 metrics: Metrics) -> None:
        self.upstreams = upstreams
        self.upstream = upstreams.only  # one upstream: its client, nothing to choose
        self.name = upstreams.members[0].name
        self.stream_settings = settings.stream
        self.secrets = upstreams.secrets  # built once, where the operators' keys are known
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
        info = request[REQUEST_INFO]
        headers = self._headers(request, info, "application/json")
        if self.upstream is not None:
            info.upstream = self.name
            return self.upstream.request("POST", path, body=orjson.dumps(body), headers=headers)
        model = body.get("model")
        key = request.headers.get(AFFINITY_HEADER) or body.get("prompt_cache_key")
        return self.upstreams.attempts(
            info, "POST", path, orjson.dumps(body), headers,
            model=model if isinstance(model, str) else None,
            affinity=key if isinstance(key, str) and key else None,
            pinned=info.pinned)  # where the response it continues lives (handlers/owned)

    def get(self, request: web.Request, path: str, method: str = "GET"
            ) -> Awaitable[UpstreamResponse]:
        """A request without a body (``GET``, or ``method``: a stored response's ``DELETE``,
        its ``cancel``): on the upstream that holds the response, where one is named."""
        info = request[REQUEST_INFO]
        headers = self._headers(request, info, None)
        if self.upstream is not None:
            return self.upstream.request(method, path, headers=headers)
        return self.upstreams.attempts(info, method, path, None, headers, pinned=info.pinned)

    async def model_list(self, request: web.Request) -> Any:
        """The upstreams' model lists as one (``union_of_lists``): each filtered by its
        ``models``. An upstream that fails is left out; when all fail, the first one's error."""
        if self.upstream is not None:
            return await self.plain.fetch_json(self.get(request, "models"))
        members = self.upstreams.members
        headers = self._headers(request, request[REQUEST_INFO], None)
        listings = await asyncio.gather(
            *(self.plain.fetch_json(m.client.request("GET", "models", headers=headers))
              for m in members), return_exceptions=True)
        if all(isinstance(listing, BaseException) for listing in listings):
            raise listings[0]
        return union_of_lists(members, listings)

    def _headers(self, request: web.Request, info: RequestInfo, content_type: str | None
                 ) -> dict[str, str]:
        """The gateway's own (the request id, the body's type) and the client's that
        ``[upstream] forward_headers`` names (xAI's ``x-grok-conv-id``), as they came."""
        headers = {name: value for name in self.forward_headers
                   if (value := request.headers.get(name))}
        headers["X-Request-ID"] = info.request_id
        if content_type is not None:
            headers["Content-Type"] = content_type
        return headers

    async def stream(self, request: web.Request, call: Awaitable[UpstreamResponse], *,
                     dialect: Dialect = CHAT, rewrite: Rewrite | None = None,
                     hide_usage: bool = False, spend: Spend | None = None,
                     recorder: Recorder | None = None) -> web.StreamResponse:
        """Relay the upstream's event stream to the client (``gateway/stream/relay.py``);
        ``hide_usage``: drop the usage chunk the gateway asked for and the client did not;
        with a ``recorder``, the response it creates is recorded first
        (``stream/recording.py``)."""
        info = request[REQUEST_INFO]
        settings = self.stream_settings
        relay: StreamRelay
        renderer: StreamRenderer
        headers = {**SSE_HEADERS, **response_headers(info)}
        args = (ClientStream(request), settings, info, headers, self.secrets, spend)
        if isinstance(call, Attempts):
            call.deferred = True  # judged when the stream ends
            renderer = PreambleHeld(dialect, hold=dialect.responses_api and call.may_move,
                                    rewrite=rewrite, secrets=self.secrets,
                                    max_event_bytes=settings.max_event_bytes,
                                    hide_usage=hide_usage)
            relay = FailoverRelay(args[0], renderer, *args[1:], tries=call) \
                if recorder is None else \
                RecordingFailoverRelay(args[0], renderer, *args[1:], tries=call,
                                       recorder=recorder)
        else:
            renderer = StreamRenderer(dialect, rewrite=rewrite, secrets=self.secrets,
                                      max_event_bytes=settings.max_event_bytes,
                                      hide_usage=hide_usage)
            relay = StreamRelay(args[0], renderer, *args[1:]) if recorder is None else \
                RecordingRelay(args[0], renderer, *args[1:], recorder=recorder)
        self.open_streams.inc()
        try:
            with self.in_flight.track_stream(relay, info.key):  # shutdown, revocation
                return await relay.run(call)
        finally:
            self.open_streams.dec()
