"""``[redis] mode`` and its settings: each deployment's keys from the file and the environment,
and every mistake named before start-up."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from gateway.config import load_settings
from gateway.redis.lifecycle import open_redis
from gateway.redis.topology import describe, safe_url
from gateway.schema import settings_from
from gateway.settings import ConfigError, RedisSettings

from servers import free_port


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
    s = settings_from({"redis": {"mode": "cluster",
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
        settings_from({"redis": redis})
    assert info.value.setting == setting


@pytest.mark.parametrize("url, shown", [
    ("redis://:hunter2@h:6379/0", "redis://:***@h:6379/0"),
    ("rediss://gw:hunter2@h:6380/0", "rediss://gw:***@h:6380/0"),
    ("redis://hunter2@h:6379/0", "redis://***@h:6379/0"),
    ("redis://h:6379/0?password=hunter2", "redis://h:6379/0?password=***"),
    ("redis://h:6379/0?username=gw&password=hunter2&ssl_cert_reqs=none",
     "redis://h:6379/0?username=gw&password=***&ssl_cert_reqs=none"),
    ("redis://h:6379/0", "redis://h:6379/0"),
])
def test_safe_url_hides_a_password_in_the_userinfo_and_in_the_query(url: str, shown: str) -> None:
    assert safe_url(url) == shown


def test_no_repr_of_the_settings_and_no_config_error_shows_a_password() -> None:
    s = settings_from({"redis": {"mode": "sentinel", "sentinels": ["h:26379"],
                                         "service_name": "gw", "password": "data-hunter2",
                                         "sentinel_password": "sentinel-hunter2"}})
    assert s.redis is not None and "hunter2" not in repr(s) + repr(s.redis)
    s = settings_from({"redis": {"url": "redis://gw:url-hunter2@h:6379/0"}})
    assert "hunter2" not in repr(s)
    with pytest.raises(ConfigError) as info:
        settings_from({"redis": {"mode": "sentinel", "service_name": "gw",
                                         "sentinels": ["gw:entry-hunter2@h:26379"]}})
    assert info.value.setting == "redis.sentinels" and "hunter2" not in str(info.value)


async def test_an_unreachable_redis_is_logged_without_the_password_in_its_query(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"redis://127.0.0.1:{free_port()}/0?password=query-hunter2"
    async with open_redis(RedisSettings(url=url, timeout_seconds=0.5)) as (_, breaker):
        assert not breaker.up
    assert "is not answering" in caplog.text and "127.0.0.1" in caplog.text
    assert "hunter2" not in caplog.text
