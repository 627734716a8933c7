"""Settings from where an operator keeps them: a TOML file, then ``GATEWAY_<SECTION>_<KEY>``
environment variables over it; validated by ``schema.py``. The only module of the two that
reads a file or the environment."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from typing import Any

from .schema import settings_from
from .settings import SECTIONS, XAI_URL, ConfigError, Settings


def load_settings(path: str | None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (if any), apply ``GATEWAY_*`` overrides, validate."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("--config", f"{path} is not valid TOML: {e}") from None
    data = _apply_environment(data, environ)
    settings = settings_from(data)
    if not settings.upstream.url_given and not settings.upstreams:
        # The built-in mock only for the embedded default: no file, no GATEWAY_* setting and no
        # key. A deployment that forgot its key must not answer clients from the mock with 200s;
        # it gets xAI, and ``check_upstream_key`` stops ``gateway serve`` naming the variable.
        configured = bool(path) or bool(data)
        url = "mock" if not configured and not settings.upstream_api_key(environ) else XAI_URL
        settings = dataclasses.replace(
            settings, upstream=dataclasses.replace(settings.upstream, url=url))
    return settings


def check_upstream_key(settings: Settings, environ: Mapping[str, str]) -> None:
    """A real upstream needs its key at start-up (``gateway serve``), not at the first request.

    Not part of ``load_settings``: ``gateway keys`` reads the same file without the key.
    """
    if settings.upstreams:
        for entry in settings.upstreams:
            if entry.api_key_env and not environ.get(entry.api_key_env):
                raise ConfigError(f"upstreams[{entry.name}].api_key_env",
                                  f"{entry.api_key_env} is not set (the upstream's key)")
        return
    if settings.upstream.is_mock or settings.upstream_api_key(environ):
        return
    where = settings.upstream.api_key_env
    raise ConfigError("upstream.api_key", (f"{where} is not set" if where else "it is empty")
                      + " (the upstream's key: set it, or [upstream] api_key); for the built-in "
                      'mock upstream instead, set [upstream] url = "mock"')




def check_demo_on_loopback(settings: Settings) -> None:
    """The demo key is public: a gateway that accepts it listens on loopback only, so that
    ``--host 0.0.0.0`` on the embedded default does not serve anyone who can reach the host."""
    host = settings.server.host
    if settings.uses_demo_key and not _loopback(host):
        raise ConfigError("server.host", f"{host!r} is not a loopback address, and with no "
                          "client keys configured the gateway accepts the public demo key; "
                          "add keys ([[keys]] in the --config file) to serve on other addresses")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve to anything


def _apply_environment(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            name = f"GATEWAY_{section}_{f.name}".upper()
            if name not in environ:
                continue
            raw = environ[name]
            if section == "redis" and f.name == "url" and raw == "":
                data.pop("redis", None)
                continue
            data.setdefault(section, {})[f.name] = _parse_env_value(raw, f.type)
    return data


def _parse_env_value(raw: str, type_name: Any) -> Any:
    t = str(type_name)
    if t == "bool":
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if t in ("int", "float"):
        try:
            return int(raw) if t == "int" else float(raw)
        except ValueError:
            return raw  # validation names the setting
    if t.startswith("tuple"):
        return [part.strip() for part in raw.split(",") if part.strip()]
    return raw
