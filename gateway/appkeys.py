"""Every typed key for state shared through the application or a request."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from .context import RequestInfo
from .settings import Settings

if TYPE_CHECKING:
    from .auth import KeyStore
    from .ratelimit import Limiter
    from .upstream import UpstreamClient
    from .streams import StreamRegistry

SETTINGS = web.AppKey("settings", Settings)
UPSTREAM = web.AppKey("upstream", "UpstreamClient")
KEYSTORE = web.AppKey("keystore", "KeyStore")
LIMITER = web.AppKey("limiter", "Limiter")
STREAMS = web.AppKey("streams", "StreamRegistry")

REQUEST_INFO = web.RequestKey("request_info", RequestInfo)
