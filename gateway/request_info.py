"""What the gateway knows about one request, filled in as it passes through.

The middlewares create it, the handler and relay fill it, the access log and metrics read it
once the response is done. Nothing in it is a secret: a key appears only by its name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .settings import TokenBudget

if TYPE_CHECKING:
    from .errors import GatewayError
    from .ratelimit.charges import Charge


@dataclass(slots=True)
class ClientKey:
    """An authenticated caller: its name, limits and model allow-list (never the key itself)."""

    name: str
    requests_per_minute: float
    burst: int
    max_concurrent_streams: int
    models: frozenset[str] | None = None
    budget: TokenBudget | None = None  # token and spend limits, if any

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(slots=True)
class RequestInfo:
    request_id: str
    route: str
    client_ip: str
    started: float = field(default_factory=time.monotonic)
    key: ClientKey | None = None
    body: Any = None  # the parsed JSON body, once read
    body_bytes: int = 0  # its size as sent (a token reservation estimates the prompt by it)
    model: str | None = None
    stream: bool = False
    status: int = 0
    first_byte: float | None = None  # monotonic time the first event reached the client
    chunks: int = 0
    bytes_out: int = 0
    usage: dict[str, Any] | None = None
    outcome: str = ""
    # completed | client_disconnect | upstream_error | timeout | shutdown | refused | error;
    # left empty until something decides, and "completed" if nothing did.
    error: str | None = None  # the error code the client was sent (status or frame), if any
    upstream_error: str | None = None  # UpstreamFailure.kind when the upstream caused it
    limit_headers: dict[str, str] = field(default_factory=dict)
    charge: Charge | None = None  # what a key with token or spend limits was charged
    upstream: str | None = None  # the upstream's name (the last one tried), never its URL
    pinned: str | None = None  # the upstream that holds the stored response it names

    def note_error(self, err: GatewayError) -> None:
        """What the client was told and why. An outcome already decided (a shutdown, a
        disconnect) stands."""
        self.error = err.code
        self.upstream_error = err.kind
        self.outcome = self.outcome or err.outcome

    def add_stream(self, events: int, bytes_out: int, usage: dict[str, Any] | None) -> None:
        """What a relayed stream sent, and the last usage it reported."""
        self.chunks += events
        self.bytes_out += bytes_out
        self.usage = usage or self.usage

    @property
    def ttfb_seconds(self) -> float | None:
        return None if self.first_byte is None else self.first_byte - self.started


REQUEST_INFO = web.RequestKey("request_info", RequestInfo)
"""Where a request's ``RequestInfo`` is kept (``request[REQUEST_INFO]``): beside the class, so the
byte path reads it without importing the app's keys."""
