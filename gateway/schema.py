"""The settings' schema: which sections and keys a configuration may hold, the type and range of
each, checked once at start-up. Pure: a TOML-shaped mapping in (``config.py`` reads the file and
the environment into one), frozen ``Settings`` out, or a ``ConfigError`` naming the setting and
what it got."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from .addresses import networks
from .settings import (
    MAX_INT,
    SECTIONS,
    ConfigError,
    KeySettings,
    Limits,
    ModelSettings,
    Price,
    RedisSettings,
    ResponsesSettings,
    ServerSettings,
    Settings,
    StreamSettings,
    UpstreamEntry,
    UpstreamSettings,
    VisionSettings,
    hash_key,
)


def settings_from(data: Mapping[str, Any]) -> Settings:
    """Build and validate settings from a TOML-shaped mapping (tests call this directly)."""
    known = set(SECTIONS) | {"keys", "models", "upstreams"}
    for section in data:
        if section not in known:
            raise ConfigError(section, f"unknown section (known: {', '.join(sorted(known))})")
    server = _section(data, "server", ServerSettings)
    upstream = _section(data, "upstream", UpstreamSettings)
    redis = _section(data, "redis", RedisSettings) if "redis" in data else None
    limits = _section(data, "limits", Limits)
    stream = _section(data, "stream", StreamSettings)
    vision = _section(data, "vision", VisionSettings)
    responses = _section(data, "responses", ResponsesSettings)

    _check(0 < server.port < 65536 or server.port == 0, "server.port", "must be 0..65535")
    _check(server.workers >= 1, "server.workers", "must be at least 1")
    _check(server.drain_seconds >= 0, "server.drain_seconds", "must not be negative")
    for name in ("header_timeout_seconds", "body_timeout_seconds", "keepalive_timeout_seconds"):
        _check(getattr(server, name) > 0, f"server.{name}", "must be positive")
    _check(server.max_connections >= 1, "server.max_connections", "must be at least 1")
    _check(0 <= server.max_connections_per_address <= server.max_connections,
           "server.max_connections_per_address",
           "must be 0 (a quarter of max_connections) up to max_connections")
    if server.max_connections_per_address == 0:
        server = dataclasses.replace(
            server, max_connections_per_address=max(1, server.max_connections // 4))
    try:
        networks(server.metrics_allow)
    except ValueError as e:
        raise ConfigError("server.metrics_allow", f"must list addresses or CIDRs: {e}") from None
    _check(server.auth_failures_per_minute >= 0, "server.auth_failures_per_minute",
           "must not be negative (0 turns the throttle off)")
    _check(upstream.url in ("", "mock") or upstream.url.startswith(("http://", "https://")),
           "upstream.url", 'must be an http(s) URL or "mock"')
    _check(upstream.max_retries >= 0, "upstream.max_retries", "must not be negative")
    _check(upstream.max_answer_bytes > 0, "upstream.max_answer_bytes", "must be positive")
    _check(upstream.max_failovers >= 0, "upstream.max_failovers", "must not be negative")
    _check(upstream.eject_after_failures >= 1, "upstream.eject_after_failures",
           "must be at least 1")
    _check(upstream.eject_seconds > 0, "upstream.eject_seconds", "must be positive")
    _check(upstream.headers_timeout_seconds >= 0, "upstream.headers_timeout_seconds",
           "must not be negative (0: no timeout of its own)")
    _check(len({h.lower() for h in upstream.forward_headers}) == len(upstream.forward_headers),
           "upstream.forward_headers", "names a header twice (names ignore case)")
    for header in upstream.forward_headers:
        _check(_HEADER_NAME.fullmatch(header) is not None, "upstream.forward_headers",
               f"{header!r} is not a header name")
        _check(not _never_forwarded(header), "upstream.forward_headers",
               f"{header!r} is not the client's to pass on (a credential, an identity claim, "
               f"the account the operator's key bills, or the gateway's own framing)")
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
                 "idle_timeout_seconds", "max_duration_seconds"):
        _check(getattr(stream, name) > 0, f"stream.{name}", "must be positive")
    _check(stream.max_body_bytes > 0, "stream.max_body_bytes", "must be positive")
    _check(vision.stream_fallback in ("sse", "json", "off"), "vision.stream_fallback",
           'must be "sse", "json" or "off"')
    _check(vision.max_image_bytes > 0, "vision.max_image_bytes", "must be positive")
    _check(responses.retention_seconds >= 1, "responses.retention_seconds", "must be at least 1")

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
    models = ModelSettings(aliases=dict(aliases), list_cache_seconds=float(cache),
                           prices=_prices(models_data.get("prices", {})))

    upstreams = tuple(_upstream(i, entry) for i, entry in enumerate(_list(data, "upstreams")))
    names = [u.name for u in upstreams]
    dup = {n for n in names if names.count(n) > 1}
    _check(not dup, "upstreams", f"duplicate upstream names: {', '.join(sorted(dup))}")
    if upstreams:
        given = [k for k in ("url", "api_key", "api_key_env") if k in data.get("upstream", {})]
        _check(not given, f"upstream.{given[0] if given else 'url'}",
               "is for one upstream; with [[upstreams]] each one names its own url and key "
               "([upstream] keeps the timeouts and retries that apply to all)")

    return Settings(server=server, upstream=upstream, redis=redis, limits=limits, keys=keys,
                    stream=stream, vision=vision, models=models, upstreams=upstreams,
                    responses=responses)


_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")
_NEVER_FORWARDED = frozenset((
    # Credentials, this provider's and others' (a proxy or an upstream may accept any of them).
    "authorization", "proxy-authorization", "x-api-key", "api-key", "x-goog-api-key",
    "x-auth-token", "ocp-apim-subscription-key", "cookie", "set-cookie",
    # Which account the operator's key bills: the operator's choice, never the client's.
    "openai-organization", "openai-project",
    # Who the client is, as the client would claim it.
    "forwarded", "x-real-ip", "via", "true-client-ip", "cf-connecting-ip",
    # The gateway's own framing of the request.
    "host", "content-length", "content-type", "content-encoding", "transfer-encoding",
    "connection", "proxy-connection", "keep-alive", "te", "upgrade", "trailer",
    "accept-encoding", "expect", "x-request-id"))
"""Never passed on (``x-forwarded-*`` neither): compared with ``_`` read as ``-`` and case
ignored, as the servers behind an upstream may read them."""


def _never_forwarded(header: str) -> bool:
    name = header.lower().replace("_", "-")
    return name in _NEVER_FORWARDED or name.startswith("x-forwarded-")


def _check(ok: bool, setting: str, problem: str) -> None:
    if not ok:
        raise ConfigError(setting, problem)


def _check_limits(limits: Limits, where: str) -> None:
    _check(limits.requests_per_minute > 0, f"{where}.requests_per_minute", "must be positive")
    _check(limits.burst >= 1, f"{where}.burst", "must be at least 1")
    _check(limits.max_concurrent_streams >= 1, f"{where}.max_concurrent_streams",
           "must be at least 1")
    for name in ("tokens_per_minute", "tokens_per_day", "usd_per_day", "usd_per_month"):
        _check(getattr(limits, name) >= 0, f"{where}.{name}", "must not be negative (0: no limit)")
    _check(limits.usd_per_day <= MAX_USD and limits.usd_per_month <= MAX_USD, where,
           f"a dollar limit must be at most {MAX_USD:,} USD")
    _check(limits.default_output_tokens >= 1, f"{where}.default_output_tokens",
           "must be at least 1")
    _check(limits.on_token_overrun in ("finish", "cut"), f"{where}.on_token_overrun",
           'must be "finish" or "cut"')


MAX_USD = 100_000_000
"""The largest dollar limit: in ticks (10^-10 USD) it is 10^18, within a 64-bit integer."""


def _prices(data: Any) -> dict[str, Price]:
    """``[models.prices."<model>"]``: input, output and optional cached_input, USD per million
    tokens."""
    _check(isinstance(data, Mapping), "models.prices", "must be a table of models")
    prices = {}
    for model, entry in data.items():
        where = f"models.prices.{model}"
        _check(isinstance(entry, Mapping), where, "must be a table (input, output, cached_input)")
        unknown = set(entry) - {"input", "output", "cached_input"}
        _check(not unknown, where, f"unknown setting {', '.join(sorted(unknown))} (known: "
               "input, output, cached_input)")
        _check("input" in entry and "output" in entry, where, "needs input and output")
        values = {name: _coerce(f"{where}.{name}", value, "float")
                  for name, value in entry.items()}
        _check(all(0 <= v <= 1_000_000 for v in values.values()), where,
               "prices are USD per million tokens, from 0 to 1,000,000")
        prices[model] = Price(**values)
    return prices


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
        _check(abs(value) <= MAX_INT, setting, f"must fit in 64 bits, got {value!r}")
    elif type_name == "float":
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), setting,
               f"must be a number, got {value!r}")
        _check(math.isfinite(value) and abs(value) <= MAX_INT, setting,
               f"must be a finite number, got {value!r}")
        value = float(value)
    elif type_name == "str":
        _check(isinstance(value, str), setting, f"must be a string, got {value!r}")
    elif type_name.startswith("tuple"):
        _check(isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
               setting, "must be a list of strings")
        value = tuple(value)
    return value


_PER_KEY = {"requests_per_minute": "float", "burst": "int", "max_concurrent_streams": "int",
            "tokens_per_minute": "int", "tokens_per_day": "int", "usd_per_day": "float",
            "usd_per_month": "float"}
"""The limits a key may set for itself; the rest of ``[limits]`` is the gateway's."""


_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
"""An upstream's name: a metric label and a log field, so short and plain."""


def _upstream(index: int, entry: Any) -> UpstreamEntry:
    where = f"upstreams[{index}]"
    _check(isinstance(entry, Mapping), where, "must be a table")
    fields = {f.name: f for f in dataclasses.fields(UpstreamEntry)}
    for k in entry:
        _check(k in fields, f"{where}.{k}", f"unknown setting (known: {', '.join(fields)})")
    name = entry.get("name")
    _check(isinstance(name, str) and _UPSTREAM_NAME.fullmatch(name) is not None,
           f"{where}.name", "must be 1 to 64 letters, digits, '_', '.' or '-'")
    where = f"upstreams[{name}]"
    values = {k: _coerce(f"{where}.{k}", v, str(fields[k].type)) for k, v in entry.items()}
    upstream = UpstreamEntry(**values)
    _check(upstream.url.startswith(("http://", "https://")) and len(upstream.url) > 8,
           f"{where}.url", "must be an http(s) URL")
    _check(("api_key" in entry) != ("api_key_env" in entry), where,
           'give "api_key" or "api_key_env" (the variable that holds it), one of them '
           '(api_key = "" for an upstream that takes none)')
    _check(upstream.weight > 0, f"{where}.weight", "must be positive")
    _check(bool(upstream.models) and all(upstream.models), f"{where}.models",
           'must list model name patterns ("grok-4*"); leave it out for every model')
    _check(upstream.max_concurrent >= 0, f"{where}.max_concurrent",
           "must not be negative (0: no cap)")
    return upstream


def _key(index: int, entry: Any, defaults: Limits) -> KeySettings:
    where = f"keys[{index}]"
    _check(isinstance(entry, Mapping), where, "must be a table")
    allowed = {"name", "key", "sha256", "models", *_PER_KEY}
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
    limits = dataclasses.replace(defaults, **{
        name: _coerce(f"{where}.{name}", entry[name], kind)
        for name, kind in _PER_KEY.items() if name in entry})
    _check_limits(limits, where)
    models = entry.get("models")
    if models is not None:
        _check(isinstance(models, list) and all(isinstance(m, str) for m in models),
               f"{where}.models", "must be a list of model names")
        models = frozenset(models)
    return KeySettings(name=name, sha256=digest, limits=limits, models=models)
