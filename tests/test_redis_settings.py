"""``[redis] mode`` and its settings: each deployment's keys from the file and the environment,
and every mistake named before start-up."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import load_settings
from gateway.redisclient import describe
from gateway.settings import ConfigError, Settings


def test_single_is_the_default_and_sentinel_mode_comes_from_the_environment() -> None:
    s = load_settings(None, {"GATEWAY_REDIS_URL": "redis://127.0.0.1:6379/0",
                             "GATEWAY_UPSTREAM_URL": "mock"})
    assert s.redis is not None and s.redis.mode == "single"
    s = load_settings(None, {"GATEWAY_REDIS_MODE": "sentinel", "GATEWAY_UPSTREAM_URL": "mock",
                             "GATEWAY_REDIS_SENTINELS": "10.0.0.1:26379, 10.0.0.2:26379",
                             "GATEWAY_REDIS_SERVICE_NAME": "gw",
                             "GATEWAY_REDIS_PASSWORD": "data-secret",
                             "GATEWAY_REDIS_SENTINEL_PASSWORD": "sentinel-secret"})
    assert s.redis is not None
    assert (s.redis.mode, s.redis.sentinels, s.redis.service_name) == (
        "sentinel", ("10.0.0.1:26379", "10.0.0.2:26379"), "gw")
    assert "secret" not in describe(s.redis) and "10.0.0.2:26379" in describe(s.redis)


def test_a_cluster_url_with_a_password_is_described_without_it() -> None:
    s = Settings.from_mapping({"redis": {"mode": "cluster",
                                         "url": "rediss://gw:hunter2@node1:6379"}})
    assert s.redis is not None and describe(s.redis) == "rediss://gw:***@node1:6379 (cluster)"


@pytest.mark.parametrize("redis, setting", [
    ({"mode": "replicated"}, "redis.mode"),
    ({"mode": "cluster", "url": "unix:///run/redis.sock"}, "redis.url"),
    ({"mode": "cluster", "url": "redis://node1:6379/3"}, "redis.url"),
    ({"mode": "sentinel", "service_name": "gw"}, "redis.sentinels"),
    ({"mode": "sentinel", "sentinels": ["host-without-port"], "service_name": "gw"},
     "redis.sentinels"),
    ({"mode": "sentinel", "sentinels": ["h:26379"]}, "redis.service_name"),
    ({"mode": "sentinel", "sentinels": ["h:26379"], "service_name": "gw", "ca_file": "/ca"},
     "redis.ca_file"),
    ({"sentinels": ["h:26379"]}, "redis.sentinels"),
    ({"password": "p"}, "redis.password"),
    ({"url": "redis://h:6379/0", "ca_file": "/ca.pem"}, "redis.ca_file"),
])
def test_invalid_redis_modes_name_the_setting(redis: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping({"redis": redis})
    assert info.value.setting == setting
