"""Every typed key for state shared through the application (a request's own state is
``request_info.REQUEST_INFO``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from .settings import Settings

if TYPE_CHECKING:
    from .auth import AuthFailureThrottle, KeyStore
    from .catalog import ModelCatalog
    from .inflight import InFlight
    from .metrics import Metrics
    from .ratelimit import Limiter
    from .readiness import UpstreamProbe
    from .records import ResponseRecords
    from .stream.proxy import Proxy
    from .upstream.upstreams import UpstreamSet
    from .upstream.sockets import SocketUpstreams

# Typed by annotation: the classes are imported for type checkers only, so that this module
# stays free of import cycles.
SETTINGS = web.AppKey("settings", Settings)
UPSTREAMS: web.AppKey[UpstreamSet] = web.AppKey("upstreams")
KEYSTORE: web.AppKey[KeyStore] = web.AppKey("keystore")
AUTH_FAILURES: web.AppKey[AuthFailureThrottle] = web.AppKey("auth_failures")
LIMITER: web.AppKey[Limiter] = web.AppKey("limiter")
IN_FLIGHT: web.AppKey[InFlight] = web.AppKey("in_flight")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
UPSTREAM_PROBE: web.AppKey[UpstreamProbe] = web.AppKey("upstream_probe")
MODEL_CATALOG: web.AppKey[ModelCatalog] = web.AppKey("model_catalog")
PROXY: web.AppKey[Proxy] = web.AppKey("proxy")
UPSTREAM_SOCKETS: web.AppKey[SocketUpstreams] = web.AppKey("upstream_sockets")
RECORDS: web.AppKey[ResponseRecords] = web.AppKey("response_records")
