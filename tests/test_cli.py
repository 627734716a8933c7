"""The command line a newcomer runs: `gateway serve` on the embedded default, and start-up
refusing invalid settings with a message that names the setting."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import requests
from openai import AsyncOpenAI

from gateway.settings import DEMO_KEY

from conftest import KEY
from servers import (
    ROOT,
    GatewayProcess,
    accepts,
    clean_environ,
    free_port,
    run_cli,
    running,
    spawn,
    wait_until,
)


async def test_gateway_serve_with_no_config_streams_from_the_mock_with_the_demo_key(
        tmp_path: Path) -> None:
    port = free_port()
    stderr = tmp_path / "stderr.log"
    with open(stderr, "wb") as err:
        proc = spawn([sys.executable, "-m", "gateway", "serve", "--port", str(port)], cwd=ROOT,
                     env=clean_environ(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=err)
    try:
        wait_until(lambda: accepts(port), 20, f"gateway serve on port {port}")
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/api/v1", api_key=DEMO_KEY,
                             max_retries=0)
        stream = await client.chat.completions.create(
            model="grok-4", messages=[{"role": "user", "content": "Hello"}], stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "Ah, the meaning of life is forty-two, as everyone knows."
        await client.close()
        stranger = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-not-demo-1",
                               max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await stranger.models.list()
        await stranger.close()
        log = stderr.read_text()
        assert f"accepting the demo key '{DEMO_KEY}'" in log
        assert "the built-in mock" in log
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


@pytest.mark.parametrize("toml, env, message", [
    ('[stream]\nkeepalive_seconds = "soon"\n', {},
     "invalid setting stream.keepalive_seconds: must be a number, got 'soon'"),
    ("[upstream]\nurl = \"ftp://example\"\n", {},
     'invalid setting upstream.url: must be an http(s) URL or "mock"'),
    ("", {"GATEWAY_SERVER_PORT": "eighty"},
     "invalid setting server.port: must be an integer, got 'eighty'"),
    ("[server\n", {}, "is not valid TOML"),
])
def test_invalid_settings_stop_start_up_naming_the_setting(
        tmp_path: Path, toml: str, env: dict[str, str], message: str) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(toml)
    result = run_cli("serve", "--config", str(config), "--port", str(free_port()),
                     env=clean_environ(**env))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_the_deploy_config_without_the_upstream_key_refuses_to_start_naming_it() -> None:
    """It used to start on the built-in mock, and production clients got mock answers, 200."""
    port = free_port()
    result = run_cli("serve", "--config", str(ROOT / "deploy" / "gateway.toml"),
                     "--port", str(port))
    assert result.returncode == 2
    assert result.stderr.startswith("gateway: invalid setting upstream.api_key: XAI_API_KEY "
                                    "is not set"), result.stderr
    assert "Traceback" not in result.stderr and not accepts(port)


def test_a_config_file_without_an_upstream_url_or_key_stops_start_up(tmp_path: Path) -> None:
    gateway = GatewayProcess(tmp_path, "nokey", {"server": {"port": free_port()},
                                                 "keys": [{"name": "alice", "key": KEY}]})
    gateway.start()
    assert gateway.wait(20) == 2
    assert "XAI_API_KEY is not set" in gateway.stderr()
    assert "listening" not in gateway.stderr() and "the built-in mock at" not in gateway.stderr()


async def test_url_mock_runs_the_mock_without_a_key(tmp_path: Path) -> None:
    gateway = GatewayProcess(tmp_path, "mock", {"server": {"port": free_port()},
                                                "upstream": {"url": "mock"},
                                                "keys": [{"name": "alice", "key": KEY}]})
    with running(gateway):
        client = AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0)
        reply = await client.chat.completions.create(
            model="grok-4", messages=[{"role": "user", "content": "Hello"}])
        await client.close()
    assert reply.choices[0].message.content == \
        "Ah, the meaning of life is forty-two, as everyone knows."
    assert "the built-in mock" in gateway.stderr()


def test_the_mock_upstream_is_imported_only_when_it_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import sys, gateway.app, gateway.cli, gateway.server.workers; "
         "print('gateway.mock.upstream' in sys.modules, 'gateway.mock.replies' in sys.modules)"],
        cwd=ROOT, env=clean_environ(), capture_output=True, text=True, timeout=30)
    assert result.stdout.split() == ["False", "False"], result.stderr


@pytest.mark.parametrize("style, error", [("xai", {"code": "Some requested entity was not found"}),
                                          ("openai", {"type": "invalid_request_error"})])
def test_the_mock_upstream_speaks_the_style_it_is_started_with(style: str, error: dict[str, str]
                                                                ) -> None:
    port = free_port()
    proc = spawn([sys.executable, "-m", "gateway", "mock-upstream", "--port", str(port),
                  "--style", style], cwd=ROOT, env=clean_environ(), stdin=subprocess.DEVNULL,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: accepts(port), 20, f"gateway mock-upstream on port {port}")
        answer = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=10,
                               json={"model": "grok-99", "messages": [{"role": "user",
                                                                        "content": "hi"}]})
        assert answer.status_code == 404
        body = answer.json()
        inner = body["error"] if isinstance(body["error"], dict) else body
        assert error.items() <= inner.items(), body
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "127.0.0.1.nip.io"])
def test_the_demo_key_is_never_served_past_loopback(host: str) -> None:
    """With no configuration, ``--host 0.0.0.0`` served the built-in mock with the public demo
    key on every interface: it now stops at start-up, exit status 2, saying how to add keys."""
    result = run_cli("serve", "--host", host, "--port", str(free_port()), timeout=30)
    assert result.returncode == 2
    assert "server.host" in result.stderr and "[[keys]]" in result.stderr
    assert "Traceback" not in result.stderr


PAST_BOUNDS = [
    ({"chunks": 10**9}, "chunks"), ({"chunk_bytes": 10**9}, "chunk_bytes"),
    ({"chunks": 4096, "chunk_bytes": 65536}, "'chunks' times 'chunk_bytes'"),
    ({"answer_bytes": 10**12}, "answer_bytes"), ({"headers_delay": 10**7}, "headers_delay"),
    ({"chunk_delay": "soon"}, "chunk_delay")]


@pytest.mark.parametrize("command", ["serve", "mock-upstream"])
def test_the_mock_refuses_options_past_its_bounds_in_process_and_standalone(command: str) -> None:
    """The mock's options are the client's: one request for a billion chunks took the embedded
    default's process from 52 to 307 MB. Past its bounds an option is a 400 naming it, from the
    mock inside ``gateway serve`` and from ``gateway mock-upstream`` alike."""
    port = free_port()
    proc = spawn([sys.executable, "-m", "gateway", command, "--port", str(port)], cwd=ROOT,
                 env=clean_environ(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: accepts(port), 20, f"gateway {command} on port {port}")
        for mock, option in PAST_BOUNDS:
            answer = requests.post(
                f"http://127.0.0.1:{port}/v1/chat/completions", timeout=10,
                headers={"Authorization": f"Bearer {DEMO_KEY}"},
                json={"model": "grok-4", "stream": True, "mock": mock,
                      "messages": [{"role": "user", "content": "hi"}]})
            assert answer.status_code == 400, mock
            assert option in answer.text and "mock option" in answer.text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
