"""Typed, frozen settings, validated once at start-up (``schema.py``).

Settings come from a TOML file and the environment (``config.py`` reads them; this module does
no I/O). Every leaf setting ``[section] key`` can be overridden by ``GATEWAY_<SECTION>_<KEY>``
(``GATEWAY_UPSTREAM_URL``, ``GATEWAY_REDIS_URL``, ``GATEWAY_STREAM_KEEPALIVE_SECONDS``, ...).
``GATEWAY_REDIS_URL`` also enables Redis when the file has no ``[redis]`` section; setting it to
an empty string disables Redis.

Nothing here reads the environment at import time, and this module imports nothing else from the
package, so that the CLI, tests and tools can build settings however they like.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

XAI_URL = "https://api.x.ai/v1"
DEFAULT_UPSTREAM = "default"
"""The name of ``[upstream]`` alone: a response record that names no upstream was made there."""
DEMO_KEY = "sk-gateway-demo"
"""Accepted by the embedded default (mock upstream, no ``[[keys]]``); logged at start-up."""
MAX_INT = 2**63 - 1
"""No number setting or limit is larger (nor NaN, nor infinite): Redis, Lua and orjson all
hold it as a 64-bit integer or a double."""


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the setting."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"invalid setting {setting}: {problem}")
        self.setting = setting


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    # Processes sharing the port (SO_REUSEPORT) under one supervisor; see gateway/server/workers.py.
    workers: int = 1
    # Seconds SIGTERM waits for requests in flight before ending them: a stream with an error
    # frame, a request still waiting for the upstream with 503 (code gateway_restarting).
    drain_seconds: float = 30.0
    # Addresses (exact IPs) whose X-Forwarded-For is believed.
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    # One JSON line per request on stdout (gateway/accesslog.py).
    access_log: bool = True
    # Client connections, guarded here as nothing may stand in front (gateway/server/limits.py):
    # a request's line and headers must arrive within header_timeout_seconds of their first byte,
    # its body within body_timeout_seconds of the headers' end (else 408 and the connection
    # closes); a connection with no request in progress closes after keepalive_timeout_seconds
    # (nginx's upstream keepalive_timeout must be shorter); past max_connections open ones, a
    # new connection gets 503 and is closed at once.
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 60.0
    keepalive_timeout_seconds: float = 15.0
    max_connections: int = 10_000
    # Open connections one client address (IPv6: one /64) may hold, so that one host cannot
    # take every slot; trusted_proxies are exempt. 0: a quarter of max_connections.
    max_connections_per_address: int = 0
    # Unknown keys one client address may present per minute (and in a row) before it gets 429
    # for a while: each costs a key-store lookup (a Redis HGET). 0 turns the throttle off.
    auth_failures_per_minute: float = 30.0
    # Who may read /metrics (key names, per-key usage): addresses or CIDRs; others get 403.
    metrics_allow: tuple[str, ...] = ("127.0.0.1", "::1")


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    # "mock" runs the built-in mock upstream in-process. Left empty: xAI, except for the embedded
    # default (no file, no GATEWAY_* setting, no key), which runs the mock (see load_settings).
    url: str = ""
    api_key: str = ""
    api_key_env: str = "XAI_API_KEY"
    # Retries happen only before any byte has reached the client.
    max_retries: int = 1
    retry_backoff_seconds: float = 0.2
    # A plain (non-streamed) answer longer than this is refused with 502 as soon as it passes
    # it, not buffered: the gateway holds a plain answer whole before it sends it on.
    max_answer_bytes: int = 32 * 1024 * 1024
    # Client request headers passed on to the upstream as they came (bounded). xAI routes the
    # requests of one x-grok-conv-id to the same server, so that its prompt cache hits.
    forward_headers: tuple[str, ...] = ("x-grok-conv-id",)
    # With several upstreams ([[upstreams]]): how many times one request may move to another
    # before its first output; consecutive failures that put an upstream out of the choice,
    # and for how long (then one trial request brings it back, or puts it out again).
    max_failovers: int = 2
    eject_after_failures: int = 3
    eject_seconds: float = 30.0
    # With several upstreams: a try whose response headers have not come within this many
    # seconds moves to the next upstream (0: never; a plain answer's headers come only once it
    # is whole, so set it above the slowest plain answer). [stream] first_byte_timeout_seconds
    # still bounds the whole wait.
    headers_timeout_seconds: float = 0.0

    @property
    def is_mock(self) -> bool:
        return self.url in ("mock", "")

    @property
    def url_given(self) -> bool:
        return self.url != ""


@dataclass(frozen=True, slots=True)
class UpstreamEntry:
    """One upstream of several (``[[upstreams]]``), or ``[upstream]`` alone as ``default``.
    Its name is the operator's: metrics, logs and ``/readyz`` show it, clients never."""

    name: str
    url: str
    api_key: str = field(default="", repr=False)
    api_key_env: str = ""
    weight: float = 1.0
    # Shell patterns (fnmatch) of the models it serves, matched after aliases.
    models: tuple[str, ...] = ("*",)
    max_concurrent: int = 0  # open requests at most; 0: no cap

    def key(self, environ: Mapping[str, str]) -> str:
        return self.api_key or (environ.get(self.api_key_env, "") if self.api_key_env else "")


@dataclass(frozen=True, slots=True)
class RedisSettings:
    # The URL, passwords: repr=False, so that no repr of the settings (a log line, a traceback's
    # locals) shows a secret.
    url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    key_prefix: str = "gw"
    # What to do when Redis does not answer: keep limiting per process, or refuse with 503.
    failure_policy: str = "fail_open"
    timeout_seconds: float = 0.25
    # A stream's concurrency lease expires unless renewed; a crashed process frees slots this fast.
    lease_seconds: float = 10.0
    # How long a key looked up in Redis is trusted before it is looked up again (revocation delay).
    key_cache_seconds: float = 2.0
    # "single" (url: the server), "cluster" (url: any one node; the rest are discovered) or
    # "sentinel" (sentinels + service_name find the primary; url is not used).
    mode: str = "single"
    ca_file: str = ""  # rediss://: verify against this CA bundle instead of the system's
    sentinels: tuple[str, ...] = ()  # "host:port" of each sentinel
    service_name: str = ""  # the primary's name as the sentinels know it
    username: str = ""  # sentinel mode: the data nodes' ACL user and password (elsewhere:
    password: str = field(default="", repr=False)  # in the URL)
    # sentinel mode: the sentinels' own password, if any
    sentinel_password: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class TokenBudget:
    """A key's token and spend limits (``gateway/ratelimit/budget.py``); 0: no such limit."""

    tokens_per_minute: int = 0
    tokens_per_day: int = 0
    usd_per_day: float = 0.0
    usd_per_month: float = 0.0

    @property
    def spends(self) -> bool:
        """A dollar limit is set: every model the key uses must have a price."""
        return self.usd_per_day > 0 or self.usd_per_month > 0

    @property
    def counts_tokens(self) -> bool:
        return self.tokens_per_minute > 0 or self.tokens_per_day > 0


@dataclass(frozen=True, slots=True)
class Limits:
    requests_per_minute: float = 60.0
    burst: int = 10
    max_concurrent_streams: int = 8
    tokens_per_minute: int = 0
    tokens_per_day: int = 0
    usd_per_day: float = 0.0
    usd_per_month: float = 0.0
    # What a request reserves for its answer when it names no output cap (max_tokens, ...).
    default_output_tokens: int = 1024
    # A stream that passes what its key had left: "finish" (the key goes into debt and waits
    # it off) or "cut" (the stream ends with a token_limit_exceeded error frame).
    on_token_overrun: str = "finish"

    @property
    def budget(self) -> TokenBudget | None:
        """The token and spend limits, None when none is set (the common key: no checks)."""
        budget = TokenBudget(self.tokens_per_minute, self.tokens_per_day, self.usd_per_day,
                             self.usd_per_month)
        return budget if budget.spends or budget.counts_tokens else None


@dataclass(frozen=True, slots=True)
class KeySettings:
    name: str
    sha256: str
    limits: Limits
    models: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class StreamSettings:
    keepalive_seconds: float = 15.0
    connect_timeout_seconds: float = 10.0
    first_byte_timeout_seconds: float = 900.0
    idle_timeout_seconds: float = 300.0
    # The longest a stream may last, from its request's arrival: then it ends with an error
    # frame (stream_max_duration), so that no stream holds its lease and connection for ever.
    max_duration_seconds: float = 3600.0
    max_body_bytes: int = 20 * 1024 * 1024
    # An upstream event larger than this is a broken stream, not something to buffer.
    max_event_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class VisionSettings:
    # How a vision request with "stream": true is answered: "sse", "json" or "off" (see
    # docs/vision-fallback.md).
    stream_fallback: str = "sse"
    # Largest image, decoded, in a data: URL.
    max_image_bytes: int = 10 * 1024 * 1024
    # Models that take image input: shell-style patterns matched against the client's model
    # name and the upstream name it is aliased to (xAI: grok-4 and its variants, *-vision-*).
    models: tuple[str, ...] = ("grok-4*", "*vision*")


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens."""

    input: float
    output: float
    cached_input: float | None = None


@dataclass(frozen=True, slots=True)
class ModelSettings:
    # Client-facing name -> upstream name.
    aliases: Mapping[str, str] = field(default_factory=dict)
    list_cache_seconds: float = 60.0
    # Model name (upstream or client-facing) -> its price, for spend limits.
    prices: Mapping[str, Price] = field(default_factory=dict)

    def price_of(self, model: str, upstream_model: str) -> Price | None:
        return self.prices.get(model) or self.prices.get(upstream_model)


@dataclass(frozen=True, slots=True)
class ResponsesSettings:
    # How long the gateway remembers which key created a stored response (its owner): as long
    # as the upstream keeps the response (xAI: 30 days).
    retention_seconds: float = 30 * 86400.0


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = ServerSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    redis: RedisSettings | None = None
    limits: Limits = Limits()
    keys: tuple[KeySettings, ...] = ()
    stream: StreamSettings = StreamSettings()
    vision: VisionSettings = VisionSettings()
    models: ModelSettings = ModelSettings()
    responses: ResponsesSettings = ResponsesSettings()
    # Several upstreams; empty: ``[upstream]`` alone, as one named ``default``.
    upstreams: tuple[UpstreamEntry, ...] = ()

    @property
    def uses_mock(self) -> bool:
        """The built-in mock upstream: ``[upstream] url = "mock"`` and no ``[[upstreams]]``."""
        return not self.upstreams and self.upstream.is_mock

    @property
    def uses_demo_key(self) -> bool:
        """No client key configured and the built-in mock upstream: the public demo key is
        accepted (``auth.ConfigKeyStore``), so the gateway may serve only this host."""
        return not self.keys and self.uses_mock

    def upstream_api_key(self, environ: Mapping[str, str]) -> str:
        return self.upstream.api_key or environ.get(self.upstream.api_key_env, "")

    @property
    def upstream_entries(self) -> tuple[UpstreamEntry, ...]:
        """Every upstream: ``[[upstreams]]``, or ``[upstream]`` as one named ``default``."""
        if self.upstreams:
            return self.upstreams
        return (UpstreamEntry(DEFAULT_UPSTREAM, self.upstream.url, self.upstream.api_key,
                              self.upstream.api_key_env),)


SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "upstream": UpstreamSettings,
    "redis": RedisSettings,
    "limits": Limits,
    "stream": StreamSettings,
    "vision": VisionSettings,
    "responses": ResponsesSettings,
}


def hash_key(key: str) -> str:
    """The only form in which a client key is ever stored or compared: its SHA-256, in hex (a
    key read from a header may hold lone surrogates; they are hashed, not refused here)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
