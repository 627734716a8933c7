"""Every typed key for state shared through the application or a request."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from .context import RequestInfo
from .settings import Settings

if TYPE_CHECKING:
    from .auth import KeyStore
    from .catalog import ModelCatalog
    from .handlers.health import UpstreamProbe
    from .metrics import Metrics
    from .ratelimit import Limiter
    from .upstream import UpstreamClient
    from .streams import StreamRegistry

SETTINGS = web.AppKey("settings", Settings)
UPSTREAM = web.AppKey("upstream", "UpstreamClient")
KEYSTORE = web.AppKey("keystore", "KeyStore")
LIMITER = web.AppKey("limiter", "Limiter")
STREAMS = web.AppKey("streams", "StreamRegistry")
METRICS = web.AppKey("metrics", "Metrics")
UPSTREAM_PROBE = web.AppKey("upstream_probe", "UpstreamProbe")
MODEL_CATALOG = web.AppKey("model_catalog", "ModelCatalog")

REQUEST_INFO = web.RequestKey("request_info", RequestInfo)
