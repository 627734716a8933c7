"""Settings: TOML plus GATEWAY_* environment, validated once with errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import check_upstream_key, load_settings
from gateway.schema import settings_from
from gateway.settings import ConfigError, Settings, hash_key

CONTRACT = """
[server]
host = "127.0.0.1"
port = 8080
[upstream]
url = "https://api.x.ai/v1"
api_key_env = "XAI_API_KEY"
[redis]
url = "redis://127.0.0.1:6379/0"
[limits]
requests_per_minute = 60
burst = 10
max_concurrent_streams = 8
[[keys]]
name = "alice"
key = "sk-alice-secret"
requests_per_minute = 120
burst = 20
max_concurrent_streams = 4
[[keys]]
name = "bob"
sha256 = "%s"
[stream]
keepalive_seconds = 15
connect_timeout_seconds = 10
first_byte_timeout_seconds = 900
idle_timeout_seconds = 300
max_body_bytes = 20971520
[vision]
stream_fallback = "sse"
""" % hash_key("sk-bob-secret")


def test_the_documented_config_loads(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(CONTRACT)
    s = load_settings(str(path), {"XAI_API_KEY": "xai-123"})
    assert s.upstream.url == "https://api.x.ai/v1"
    assert s.upstream_api_key({"XAI_API_KEY": "xai-123"}) == "xai-123"
    assert s.redis is not None and s.redis.url == "redis://127.0.0.1:6379/0"
    alice, bob = s.keys
    assert (alice.name, alice.limits.burst, alice.limits.max_concurrent_streams) == ("alice", 20, 4)
    assert alice.sha256 == hash_key("sk-alice-secret")
    assert bob.limits.burst == 10  # defaults from [limits]
    assert s.stream.first_byte_timeout_seconds == 900


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(CONTRACT)
    s = load_settings(str(path), {"GATEWAY_UPSTREAM_URL": "http://127.0.0.1:9/v1",
                                  "GATEWAY_STREAM_KEEPALIVE_SECONDS": "2.5",
                                  "GATEWAY_SERVER_PORT": "9000",
                                  "GATEWAY_REDIS_URL": ""})
    assert s.upstream.url == "http://127.0.0.1:9/v1"
    assert s.stream.keepalive_seconds == 2.5
    assert s.server.port == 9000
    assert s.redis is None  # an empty GATEWAY_REDIS_URL turns Redis off


def test_embedded_default_uses_the_mock_without_an_upstream_key() -> None:
    assert load_settings(None, {}).upstream.is_mock
    assert load_settings(None, {"XAI_API_KEY": "x"}).upstream.url == "https://api.x.ai/v1"
    assert load_settings(None, {}).redis is None


def test_any_configuration_without_an_upstream_url_means_xai_never_the_mock(
        tmp_path: Path) -> None:
    """The mock is for the embedded default alone: a deployment that forgot its key must not
    answer from it."""
    server_only = tmp_path / "gateway.toml"
    server_only.write_text("[server]\nport = 9000\n")
    assert load_settings(str(server_only), {}).upstream.url == "https://api.x.ai/v1"
    assert load_settings(None, {"GATEWAY_SERVER_PORT": "9000"}).upstream.url == \
        "https://api.x.ai/v1"
    assert load_settings(None, {"GATEWAY_UPSTREAM_URL": "mock"}).upstream.is_mock


def test_serving_a_real_upstream_without_its_key_is_refused_naming_the_variable(
        tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(CONTRACT)
    settings = load_settings(str(path), {})
    with pytest.raises(ConfigError) as e:
        check_upstream_key(settings, {})
    assert e.value.setting == "upstream.api_key" and "XAI_API_KEY is not set" in str(e.value)
    check_upstream_key(settings, {"XAI_API_KEY": "xai-123"})
    own = settings_from({"upstream": {"url": "http://127.0.0.1:9/v1",
                                              "api_key_env": "MY_UPSTREAM_KEY"}})
    with pytest.raises(ConfigError, match="MY_UPSTREAM_KEY is not set"):
        check_upstream_key(own, {"XAI_API_KEY": "xai-123"})
    check_upstream_key(settings_from({"upstream": {"url": "mock"}}), {})
    check_upstream_key(load_settings(None, {}), {})  # the embedded default: the mock


def test_client_connection_limits_have_safe_defaults_and_come_from_the_environment() -> None:
    server = Settings().server
    assert (server.header_timeout_seconds, server.body_timeout_seconds,
            server.keepalive_timeout_seconds, server.max_connections) == (10, 60, 15, 10_000)
    server = load_settings(None, {"GATEWAY_SERVER_HEADER_TIMEOUT_SECONDS": "2.5",
                                  "GATEWAY_SERVER_MAX_CONNECTIONS": "500"}).server
    assert (server.header_timeout_seconds, server.max_connections) == (2.5, 500)


@pytest.mark.parametrize("data, setting", [
    ({"stream": {"keepalive_seconds": "soon"}}, "stream.keepalive_seconds"),
    ({"stream": {"keepalive_seconds": 0}}, "stream.keepalive_seconds"),
    ({"server": {"port": 70000}}, "server.port"),
    ({"server": {"header_timeout_seconds": 0}}, "server.header_timeout_seconds"),
    ({"server": {"body_timeout_seconds": -1}}, "server.body_timeout_seconds"),
    ({"server": {"keepalive_timeout_seconds": 0}}, "server.keepalive_timeout_seconds"),
    ({"server": {"max_connections": 0}}, "server.max_connections"),
    ({"server": {"max_connections": 1.5}}, "server.max_connections"),
    ({"upstream": {"url": "ftp://x"}}, "upstream.url"),
    ({"upstream": {"max_answer_bytes": 0}}, "upstream.max_answer_bytes"),
    ({"upstream": {"forward_headers": ["Authorization"]}}, "upstream.forward_headers"),
    ({"upstream": {"forward_headers": ["x-api-key"]}}, "upstream.forward_headers"),
    *(({"upstream": {"forward_headers": [name]}}, "upstream.forward_headers") for name in (
        "api-key", "x-goog-api-key", "x_api_key", "X_Api_Key", "set-cookie",
        "openai-organization", "openai-project", "forwarded", "x-forwarded-for",
        "X-Forwarded-Host", "x_forwarded_proto", "x-real-ip", "via", "proxy-connection")),
    ({"upstream": {"forward_headers": ["not a header"]}}, "upstream.forward_headers"),
    ({"upstream": {"forward_headers": ["x-grok-conv-id", "X-Grok-Conv-Id"]}},
     "upstream.forward_headers"),
    ({"vision": {"stream_fallback": "maybe"}}, "vision.stream_fallback"),
    ({"redis": {"failure_policy": "pray"}}, "redis.failure_policy"),
    ({"limits": {"burst": 0}}, "limits.burst"),
    ({"limits": {"requests_per_minute": float("nan")}}, "limits.requests_per_minute"),
    ({"limits": {"requests_per_minute": float("inf")}}, "limits.requests_per_minute"),
    ({"limits": {"burst": 2**64}}, "limits.burst"),
    ({"stream": {"idle_timeout_seconds": float("inf")}}, "stream.idle_timeout_seconds"),
    ({"keys": [{"name": "a", "key": "sk-12345678", "requests_per_minute": float("nan")}]},
     "keys[a].requests_per_minute"),
    ({"keys": [{"name": "a", "key": "sk-12345678", "burst": 99999999999999999999}]},
     "keys[a].burst"),
    ({"stream": {"keepalive": 3}}, "stream.keepalive"),
    ({"bogus": {}}, "bogus"),
    ({"keys": [{"name": "a", "key": "short"}]}, "keys[a].key"),
    ({"keys": [{"name": "a", "sha256": "nothex"}]}, "keys[a].sha256"),
    ({"keys": [{"name": "a", "key": "sk-12345678", "burst": "x"}]}, "keys[a].burst"),
    ({"keys": [{"name": "a", "key": "sk-12345678"}, {"name": "a", "key": "sk-87654321"}]},
     "keys"),
])
def test_invalid_settings_name_the_setting(data: dict, setting: str) -> None:
    with pytest.raises(ConfigError) as e:
        settings_from(data)
    assert e.value.setting == setting
    assert setting in str(e.value)


def test_bad_toml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nport = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(str(bad), {})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(str(tmp_path / "missing.toml"), {})


@pytest.mark.parametrize("spelled", ["nan", "inf", "1e309"])
def test_a_limit_that_is_not_a_finite_number_is_refused_from_the_file(
        tmp_path: Path, spelled: str) -> None:
    """TOML spells NaN and the infinities (and reads 1e309 as one): each stops start-up naming
    the setting, where it was taken and every request with the key was a 500."""
    config = tmp_path / "gateway.toml"
    config.write_text(f"[limits]\nrequests_per_minute = {spelled}\n")
    with pytest.raises(ConfigError) as e:
        load_settings(str(config), {})
    assert e.value.setting == "limits.requests_per_minute"
    assert "finite" in str(e.value)

