"""Typed, frozen settings, validated once at start-up.

Settings come from a TOML file and the environment (``config.py`` reads them; this module does
no I/O). Every leaf setting ``[section] key`` can be overridden by ``GATEWAY_<SECTION>_<KEY>``
(``GATEWAY_UPSTREAM_URL``, ``GATEWAY_REDIS_URL``, ``GATEWAY_STREAM_KEEPALIVE_SECONDS``, ...).
``GATEWAY_REDIS_URL`` also enables Redis when the file has no ``[redis]`` section; setting it to
an empty string disables Redis.

Nothing here reads the environment at import time, and this module imports nothing else from the
package, so that the CLI, tests and tools can build settings however they like.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

XAI_URL = "https://api.x.ai/v1"
DEMO_KEY = "sk-gateway-demo"
"""Accepted by the embedded default (mock upstream, no ``[[keys]]``); logged at start-up."""


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
    # Unknown keys one client address may present per minute (and in a row) before it gets 429
    # for a while: each costs a key-store lookup (a Redis HGET). 0 turns the throttle off.
    auth_failures_per_minute: float = 30.0


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

    @property
    def is_mock(self) -> bool:
        return self.url in ("mock", "")

    @property
    def url_given(self) -> bool:
        return self.url != ""


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
class Limits:
    requests_per_minute: float = 60.0
    burst: int = 10
    max_concurrent_streams: int = 8


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
class ModelSettings:
    # Client-facing name -> upstream name.
    aliases: Mapping[str, str] = field(default_factory=dict)
    list_cache_seconds: float = 60.0


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

    def upstream_api_key(self, environ: Mapping[str, str]) -> str:
        return self.upstream.api_key or environ.get(self.upstream.api_key_env, "")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Settings:
        """Build and validate settings from a TOML-shaped mapping (tests call this directly)."""
        return _build(data)


SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "upstream": UpstreamSettings,
    "redis": RedisSettings,
    "limits": Limits,
    "stream": StreamSettings,
    "vision": VisionSettings,
}


def _build(data: Mapping[str, Any]) -> Settings:
    known = set(SECTIONS) | {"keys", "models"}
    for section in data:
        if section not in known:
            raise ConfigError(section, f"unknown section (known: {', '.join(sorted(known))})")
    server = _section(data, "server", ServerSettings)
    upstream = _section(data, "upstream", UpstreamSettings)
    redis = _section(data, "redis", RedisSettings) if "redis" in data else None
    limits = _section(data, "limits", Limits)
    stream = _section(data, "stream", StreamSettings)
    vision = _section(data, "vision", VisionSettings)

    _check(0 < server.port < 65536 or server.port == 0, "server.port", "must be 0..65535")
    _check(server.workers >= 1, "server.workers", "must be at least 1")
    _check(server.drain_seconds >= 0, "server.drain_seconds", "must not be negative")
    for name in ("header_timeout_seconds", "body_timeout_seconds", "keepalive_timeout_seconds"):
        _check(getattr(server, name) > 0, f"server.{name}", "must be positive")
    _check(server.max_connections >= 1, "server.max_connections", "must be at least 1")
    _check(server.auth_failures_per_minute >= 0, "server.auth_failures_per_minute",
           "must not be negative (0 turns the throttle off)")
    _check(upstream.url in ("", "mock") or upstream.url.startswith(("http://", "https://")),
           "upstream.url", 'must be an http(s) URL or "mock"')
    _check(upstream.max_retries >= 0, "upstream.max_retries", "must not be negative")
    _check(upstream.max_answer_bytes > 0, "upstream.max_answer_bytes", "must be positive")
    _check(len({h.lower() for h in upstream.forward_headers}) == len(upstream.forward_headers),
           "upstream.forward_headers", "names a header twice (names ignore case)")
    for header in upstream.forward_headers:
        _check(_HEADER_NAME.fullmatch(header) is not None, "upstream.forward_headers",
               f"{header!r} is not a header name")
        _check(header.lower() not in _NEVER_FORWARDED, "upstream.forward_headers",
               f"{header!r} is not the client's to pass on (credentials, or the gateway's own "
               f"framing of the request)")
    if redis is not None:
        _check(redis.url.startswith(("redis://", "rediss://", "unix://")), "redis.url",
               "must be a redis://, rediss:// or unix:// URL")
        _check(redis.failure_policy in ("fail_open", "fail_closed"), "redis.failure_policy",
               'must be "fail_open" or "fail_closed"')
        _check(redis.timeout_seconds > 0, "redis.timeout_seconds", "must be positive")
        _check(redis.lease_seconds >= 1, "redis.lease_seconds", "must be at least 1")
        _check(redis.key_cache_seconds >= 0, "redis.key_cache_seconds", "must not be negative")
        _check(bool(redis.key_prefix) and not any(c in redis.key_prefix for c in "{} \t\n"),
               "redis.key_prefix", "must be non-empty, without braces or spaces")
        _check_redis_mode(redis)
    _check_limits(limits, "limits")
    for name in ("keepalive_seconds", "connect_timeout_seconds", "first_byte_timeout_seconds",
                 "idle_timeout_seconds"):
        _check(getattr(stream, name) > 0, f"stream.{name}", "must be positive")
    _check(stream.max_body_bytes > 0, "stream.max_body_bytes", "must be positive")
    _check(vision.stream_fallback in ("sse", "json", "off"), "vision.stream_fallback",
           'must be "sse", "json" or "off"')
    _check(vision.max_image_bytes > 0, "vision.max_image_bytes", "must be positive")

    keys = tuple(_key(i, entry, limits) for i, entry in enumerate(_list(data, "keys")))
    names = [k.name for k in keys]
    dup = {n for n in names if names.count(n) > 1}
    _check(not dup, "keys", f"duplicate key names: {', '.join(sorted(dup))}")

    models_data = data.get("models", {})
    _check(isinstance(models_data, Mapping), "models", "must be a table")
    # Aliases sit in [models.aliases], or directly as `client-name = "upstream-name"` in [models].
    aliases = models_data.get("aliases", {k: v for k, v in models_data.items()
                                          if isinstance(v, str)})
    _check(isinstance(aliases, Mapping)
           and all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()),
           "models.aliases", "must map model names to model names")
    cache = models_data.get("list_cache_seconds", 60.0)
    _check(isinstance(cache, (int, float)) and cache >= 0, "models.list_cache_seconds",
           "must be a non-negative number")
    models = ModelSettings(aliases=dict(aliases), list_cache_seconds=float(cache))

    return Settings(server=server, upstream=upstream, redis=redis, limits=limits, keys=keys,
                    stream=stream, vision=vision, models=models)


_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")
_NEVER_FORWARDED = frozenset((
    "authorization", "proxy-authorization", "x-api-key", "cookie", "host", "content-length",
    "content-type", "content-encoding", "transfer-encoding", "connection", "keep-alive", "te",
    "upgrade", "trailer", "accept-encoding", "expect", "x-request-id"))
"""Never passed on: the client's credentials, and what the gateway sets itself."""


def _check(ok: bool, setting: str, problem: str) -> None:
    if not ok:
        raise ConfigError(setting, problem)


def _check_limits(limits: Limits, where: str) -> None:
    _check(limits.requests_per_minute > 0, f"{where}.requests_per_minute", "must be positive")
    _check(limits.burst >= 1, f"{where}.burst", "must be at least 1")
    _check(limits.max_concurrent_streams >= 1, f"{where}.max_concurrent_streams",
           "must be at least 1")


def _check_redis_mode(redis: RedisSettings) -> None:
    _check(redis.mode in ("single", "cluster", "sentinel"), "redis.mode",
           f'must be "single", "cluster" or "sentinel", got {redis.mode!r}')
    if redis.mode == "cluster":
        _check(redis.url.startswith(("redis://", "rediss://")), "redis.url",
               "must be a redis:// or rediss:// URL of one cluster node (mode = cluster)")
        _check(urlsplit(redis.url).path.strip("/") in ("", "0"), "redis.url",
               "a cluster has only database 0 (mode = cluster)")
    if redis.mode == "sentinel":
        _check(bool(redis.sentinels), "redis.sentinels",
               'must list the sentinels as "host:port" (mode = sentinel)')
        for address in redis.sentinels:
            host, _, port = address.rpartition(":")
            # Never echoed whole: "user:password@host" would put a password in the error.
            shown = f"***@{address.rpartition('@')[2]}" if "@" in address else address
            _check("@" not in address and bool(host) and port.isdigit()
                   and 0 < int(port) < 65536, "redis.sentinels",
                   f'{shown!r} is not "host:port" (a password goes in sentinel_password)')
        _check(bool(redis.service_name), "redis.service_name",
               "must name the primary the sentinels watch (mode = sentinel)")
    else:
        for name in ("sentinels", "service_name", "username", "password", "sentinel_password"):
            _check(not getattr(redis, name), f"redis.{name}",
                   "is for mode = sentinel only (elsewhere the user and password go in the URL)")
    _check(not redis.ca_file or (redis.mode != "sentinel" and redis.url.startswith("rediss://")),
           "redis.ca_file", "needs a rediss:// URL (TLS; not offered with mode = sentinel)")


def _list(data: Mapping[str, Any], name: str) -> list[Any]:
    value = data.get(name, [])
    _check(isinstance(value, list), name, "must be an array of tables ([[keys]])")
    return value


def _section(data: Mapping[str, Any], name: str, cls: type) -> Any:
    raw = data.get(name, {})
    _check(isinstance(raw, Mapping), name, "must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{name}.{key}", f"unknown setting (known: {', '.join(fields)})")
        values[key] = _coerce(f"{name}.{key}", value, str(fields[key].type))
    return cls(**values)


def _coerce(setting: str, value: Any, type_name: str) -> Any:
    if type_name == "bool":
        _check(isinstance(value, bool), setting, "must be true or false")
    elif type_name == "int":
        _check(isinstance(value, int) and not isinstance(value, bool), setting,
               f"must be an integer, got {value!r}")
    elif type_name == "float":
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), setting,
               f"must be a number, got {value!r}")
        value = float(value)
    elif type_name == "str":
        _check(isinstance(value, str), setting, f"must be a string, got {value!r}")
    elif type_name.startswith("tuple"):
        _check(isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
               setting, "must be a list of strings")
        value = tuple(value)
    return value


def _key(index: int, entry: Any, defaults: Limits) -> KeySettings:
    where = f"keys[{index}]"
    _check(isinstance(entry, Mapping), where, "must be a table")
    allowed = {"name", "key", "sha256", "requests_per_minute", "burst",
               "max_concurrent_streams", "models"}
    for k in entry:
        _check(k in allowed, f"{where}.{k}",
               f"unknown setting (known: {', '.join(sorted(allowed))})")
    name = entry.get("name")
    _check(isinstance(name, str) and bool(name), f"{where}.name", "must be a non-empty string")
    where = f"keys[{name}]"
    if "key" in entry:
        _check("sha256" not in entry, where, 'give "key" or "sha256", not both')
        _check(isinstance(entry["key"], str) and len(entry["key"]) >= 8, f"{where}.key",
               "must be a string of at least 8 characters")
        digest = hash_key(entry["key"])
    else:
        digest = entry.get("sha256", "")
        _check(isinstance(digest, str) and len(digest) == 64
               and all(c in "0123456789abcdef" for c in digest.lower()),
               f"{where}.sha256", "must be 64 hex digits (sha256 of the key)")
        digest = digest.lower()
    limits = Limits(
        requests_per_minute=float(_coerce(f"{where}.requests_per_minute",
                                          entry.get("requests_per_minute",
                                                    defaults.requests_per_minute), "float")),
        burst=_coerce(f"{where}.burst", entry.get("burst", defaults.burst), "int"),
        max_concurrent_streams=_coerce(f"{where}.max_concurrent_streams",
                                       entry.get("max_concurrent_streams",
                                                 defaults.max_concurrent_streams), "int"),
    )
    _check_limits(limits, where)
    models = entry.get("models")
    if models is not None:
        _check(isinstance(models, list) and all(isinstance(m, str) for m in models),
               f"{where}.models", "must be a list of model names")
        models = frozenset(models)
    return KeySettings(name=name, sha256=digest, limits=limits, models=models)


def hash_key(key: str) -> str:
    """The only form in which a client key is ever stored or compared: its SHA-256, in hex (a
    key read from a header may hold lone surrogates; they are hashed, not refused here)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
