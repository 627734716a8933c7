"""The command line: ``gateway serve``, ``gateway mock-upstream``.

It is the only place that reads files and the environment into settings.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys

from aiohttp import web

from .settings import ConfigError, Settings, load_settings

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
    overrides = {k: v for k in ("host", "port", "workers") if (v := getattr(args, k, None)) is not None}
    if overrides:
        settings = dataclasses.replace(settings, server=dataclasses.replace(server, **overrides))
    return settings


def serve(args: argparse.Namespace) -> int:
    from .app import create_app

    settings = _settings_from_args(args)
    _use_uvloop()
    app = create_app(settings)
    web.run_app(app, host=settings.server.host, port=settings.server.port,
                handler_cancellation=True, access_log=None,
                shutdown_timeout=settings.server.drain_seconds + 10,
                print=lambda msg: log.info("listening on http://%s:%d", settings.server.host,
                                           settings.server.port))
    return 0


def mock_upstream(args: argparse.Namespace) -> int:
    from .mock_upstream import create_mock_app

    _use_uvloop()
    web.run_app(create_mock_app(), host=args.host, port=args.port, handler_cancellation=True,
                access_log=None, print=lambda msg: log.info(
                    "mock upstream on http://%s:%d/v1", args.host, args.port))
    return 0


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
    p.set_defaults(func=mock_upstream)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"gateway: {e}", file=sys.stderr)
        return 2
