"""The command line a newcomer runs: `gateway serve` on the embedded default, and start-up
refusing invalid settings with a message that names the setting."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from openai import AsyncOpenAI

from gateway.settings import DEMO_KEY

from servers import ROOT, accepts, clean_environ, free_port, run_cli, spawn, wait_until


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
