"""The command line: ``gateway serve``, ``gateway keys``, ``gateway mock-upstream``.

It builds the settings (``config.py``: the file, then ``GATEWAY_*`` variables over it) and
hands them to the app factory; the only variable read after that is the upstream key's own,
named by the settings, which ``create_app`` reads at start-up (``[upstream] api_key_env``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import math
import os
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from .config import check_demo_on_loopback, check_upstream_key, load_settings
from .settings import MAX_INT, ConfigError, Limits, Settings

if TYPE_CHECKING:
    from .redis.topology import RedisClient

log = logging.getLogger("gateway")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s",
                        stream=sys.stderr)


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _settings_from_args(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    server = settings.server
    overrides = {k: v for k in ("host", "port", "workers")
                 if (v := getattr(args, k, None)) is not None}
    if overrides:
        settings = dataclasses.replace(settings, server=dataclasses.replace(server, **overrides))
    return settings


def serve(args: argparse.Namespace) -> int:
    """Run the gateway (``gateway.server.workers``: one process, or a supervisor and N workers)
    until SIGTERM or SIGINT, which stop it gracefully."""
    from .accesslog import setup_access_log
    from .server.workers import serve as run

    settings = _settings_from_args(args)
    if settings.server.workers < 1:
        raise ConfigError("--workers", "must be at least 1")
    check_upstream_key(settings, os.environ)  # before the port is taken: exit 2, naming it
    check_demo_on_loopback(settings)
    setup_access_log()  # one bare JSON line per request on stdout; diagnostics stay on stderr
    return run(settings)


def mock_upstream(args: argparse.Namespace) -> int:
    from .mock.upstream import BACKLOG, MOCK_STATE, create_mock_app

    _use_uvloop()
    app = create_mock_app(args.style, name=args.name)
    if args.fail_status:
        forced: dict[str, object] = {"status": args.fail_status}
        if args.retry_after is not None:
            forced["error_headers"] = {"Retry-After": str(args.retry_after)}
        app[MOCK_STATE].forced = forced
    web.run_app(app, host=args.host, port=args.port,
                handler_cancellation=True, backlog=BACKLOG, access_log=None,
                print=lambda msg: log.info("mock upstream (%s) on http://%s:%d/v1", args.style,
                                           args.host, args.port))
    return 0


def keys(args: argparse.Namespace) -> int:
    """``gateway keys add|list|revoke``: the key store in Redis, shared by every instance."""
    settings = load_settings(args.config)
    if settings.redis is None:
        print("gateway keys: no Redis is configured; set [redis] url in the config file "
              "(--config) or GATEWAY_REDIS_URL", file=sys.stderr)
        return 2
    return asyncio.run(_keys(args, settings))


async def _keys(args: argparse.Namespace, settings: Settings) -> int:
    from .redis.keystore import KeyStoreError
    from .redis.topology import REDIS_ERRORS, close, connect, describe

    assert settings.redis is not None
    # An operator's command, not the hot path: a longer timeout than the gateway's own.
    client = connect(settings.redis, timeout=max(settings.redis.timeout_seconds, 5.0), retries=1)
    commands: dict[str, Callable[[argparse.Namespace, Settings, RedisClient],
                                 Awaitable[int | None]]] = {
        "add": _keys_add, "list": _keys_list, "revoke": _keys_revoke}
    try:
        return await commands[args.keys_command](args, settings, client) or 0
    except KeyStoreError as e:
        print(f"gateway keys: {e}", file=sys.stderr)
        return 1
    except REDIS_ERRORS as e:
        print(f"gateway keys: Redis at {describe(settings.redis)} failed: "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        await close(client)


async def _keys_add(args: argparse.Namespace, settings: Settings, client: RedisClient) -> None:
    from .redis.keystore import KeyStoreError, add_key

    assert settings.redis is not None
    if any(k.name == args.name for k in settings.keys):
        raise KeyStoreError(f"a key named {args.name!r} is in the config file already")
    given = {"requests_per_minute": args.rpm, "burst": args.burst,
             "max_concurrent_streams": args.max_streams, "tokens_per_minute": args.tpm,
             "tokens_per_day": args.tpd, "usd_per_day": args.usd_per_day,
             "usd_per_month": args.usd_per_month}
    limits = dataclasses.replace(settings.limits,
                                 **{k: v for k, v in given.items() if v is not None})
    if limits.requests_per_minute <= 0 or limits.burst < 1 or limits.max_concurrent_streams < 1:
        raise KeyStoreError("--rpm must be positive, --burst and --max-streams at least 1")
    models = frozenset(m.strip() for m in args.models.split(",") if m.strip()) \
        if args.models else None
    raw_key, stored = await add_key(client, settings.redis.key_prefix, args.name, limits, models)
    print(raw_key)  # the only time the key exists in the clear
    print(f"added key {stored.name!r} ({_limits_text(stored.limits)}, models: "
          f"{', '.join(sorted(models)) if models else 'all'}). Store the key now: it is not "
          "kept anywhere and cannot be shown again.", file=sys.stderr)


async def _keys_list(args: argparse.Namespace, settings: Settings, client: RedisClient) -> int:
    """The table on stdout, damaged records in it as DAMAGED rows (each named, and what is
    wrong with it said on stderr). Exit status 1 if any is damaged: the listing is whole, but
    every gateway refuses a damaged record's key (403) until the operator acts, and a script
    or a check that runs ``keys list`` should notice."""
    from .ratelimit.redis import spend_of
    from .redis.keystore import list_keys, store_keys

    assert settings.redis is not None
    keys, damaged = await list_keys(client, settings.redis.key_prefix)
    rows = [("NAME", "SOURCE", "RPM", "BURST", "STREAMS", "TPM", "TPD", "USD/DAY", "USD/MONTH",
             "SPENT TODAY", "SPENT MONTH", "MODELS", "SHA256", "CREATED")]
    listed = [(k.name, "config", k.limits, k.models, k.sha256, "") for k in settings.keys]
    listed += [(k.name, "redis", k.limits, k.models, k.sha256, k.created) for k in keys]
    spent = await spend_of(client, settings.redis.key_prefix, [row[0] for row in listed])
    for (name, source, limits, models, sha256, created), (today, month) in zip(
            listed, spent, strict=True):
        rows.append((name, source, f"{limits.requests_per_minute:g}", str(limits.burst),
                     str(limits.max_concurrent_streams), _limit(limits.tokens_per_minute),
                     _limit(limits.tokens_per_day), _usd_limit(limits.usd_per_day),
                     _usd_limit(limits.usd_per_month), f"${today:.6f}", f"${month:.6f}",
                     ",".join(sorted(models)) if models else "*",
                     sha256[:8] + "…", created))  # an id to tell keys apart, not the hash
    rows += [(d.label, "redis", "?", "?", "?", "?", "?", "?", "?", "?", "?", "?",
              d.sha256[:8] + "…", "DAMAGED") for d in damaged]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    records = store_keys(settings.redis.key_prefix)[0]
    for d in damaged:
        mend = (f"revoke it ('gateway keys revoke {d.name}') and add it again" if d.name else
                f"delete it from {records} (HDEL; its field is the digest that starts "
                f"{d.sha256[:8]}), since no name leads to it")
        print(f"gateway keys: the record of key {d.label!r} is damaged: {d.problem}. Every "
              f"gateway refuses its key with 403 until you {mend}.", file=sys.stderr)
    return 1 if damaged else 0


async def _keys_revoke(args: argparse.Namespace, settings: Settings, client: RedisClient) -> None:
    from .redis.keystore import KeyStoreError, revoke_key

    assert settings.redis is not None
    if any(k.name == args.name for k in settings.keys):
        raise KeyStoreError(f"the key {args.name!r} is in the config file; remove it there and "
                            "restart the gateway")
    stored = await revoke_key(client, settings.redis.key_prefix, args.name)
    print(f"revoked key {stored.name!r}; every gateway refuses it within "
          f"{settings.redis.key_cache_seconds:g}s", file=sys.stderr)


def _limits_text(limits: Limits) -> str:
    text = (f"{limits.requests_per_minute:g} requests/min, burst {limits.burst}, "
            f"{limits.max_concurrent_streams} streams")
    for value, unit in ((limits.tokens_per_minute, "tokens/min"),
                        (limits.tokens_per_day, "tokens/day")):
        if value:
            text += f", {value:,} {unit}"
    for usd, per in ((limits.usd_per_day, "day"), (limits.usd_per_month, "month")):
        if usd:
            text += f", ${usd:g}/{per}"
    return text


def _limit(value: int) -> str:
    return f"{value:,}" if value else "-"


def _usd_limit(value: float) -> str:
    return f"${value:g}" if value else "-"


def _amount(text: str) -> float:
    """A finite number from 0 (0: no such limit), or argparse's exit with status 2."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and 0 <= value <= MAX_INT):
        raise argparse.ArgumentTypeError(f"must be a finite number from 0, got {text!r}")
    return value


def _tokens(text: str) -> int:
    """A whole number of tokens from 0 (0: no such limit)."""
    return 0 if text.strip() == "0" else _count(text)


def _positive_number(text: str) -> float:
    """A finite number above 0: argparse names the option and exits with status 2 otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= MAX_INT):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text!r}")
    return value


def _count(text: str) -> int:
    """A whole number from 1 to the 64-bit limit, or argparse's exit with status 2."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if not 1 <= value <= MAX_INT:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_INT}, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--config", help="TOML settings file (environment: GATEWAY_<SECTION>_<KEY>)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int, help="processes sharing the port")
    p.set_defaults(func=serve)
    p = sub.add_parser("mock-upstream", help="run the built-in xAI-like mock upstream")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--style", choices=("xai", "openai"), default="xai",
                   help="the dialect it speaks unless a request's mock options say otherwise: "
                        "xAI's (each tool call whole, xAI's error body) or OpenAI's")
    p.add_argument("--name", help="say this name in every answer (an x-mock-upstream header, "
                                  "and the default text starts with it): which of several "
                                  "upstreams answered")
    p.add_argument("--fail-status", type=int, help="answer every POST with this error status")
    p.add_argument("--retry-after", type=int, help="with --fail-status: a Retry-After header")
    p.set_defaults(func=mock_upstream)
    p = sub.add_parser("keys", help="add, list or revoke client keys kept in Redis")
    p.add_argument("--config", help="TOML settings file; its [redis] says where the keys are")
    keys_sub = p.add_subparsers(dest="keys_command", required=True)
    k = keys_sub.add_parser("add", help="create a key and print it, once")
    k.add_argument("--name", required=True, help="unique name (logs, metrics, revoke)")
    k.add_argument("--rpm", type=_positive_number,
                   help="requests per minute (default: [limits])")
    k.add_argument("--burst", type=_count,
                   help="requests in a row before the per-minute rate applies "
                        "(default: [limits])")
    k.add_argument("--max-streams", type=_count, help="simultaneous streams (default: [limits])")
    k.add_argument("--tpm", type=_tokens, help="tokens per minute (default: [limits]; 0: none)")
    k.add_argument("--tpd", type=_tokens, help="tokens per UTC day (default: [limits]; 0: none)")
    k.add_argument("--usd-per-day", type=_amount,
                   help="dollars per UTC day, at [models.prices] (default: [limits]; 0: none)")
    k.add_argument("--usd-per-month", type=_amount,
                   help="dollars per UTC month (default: [limits]; 0: none)")
    k.add_argument("--models", help="comma-separated model allow-list (default: all)")
    keys_sub.add_parser("list", help="names and limits (never the keys)")
    k = keys_sub.add_parser("revoke", help="delete a key; every instance refuses it shortly")
    k.add_argument("name")
    for k in keys_sub.choices.values():
        k.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.set_defaults(func=keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"gateway: {e}", file=sys.stderr)
        return 2
