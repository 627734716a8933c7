"""The gateway behind a real nginx running deploy/nginx.conf, in front of two gateway processes.

nginx, the two ``gateway serve`` processes and the mock upstream (in a thread of this process,
so its ``MockState`` is readable) are started once for the module, on free loopback ports.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.stream.sse import KEEPALIVE

from clients import AUTH, blocks, chat_body
from conftest import KEY
from processes import NGINX_CONF, NginxProcess, ThreadedMockUpstream, render_nginx_conf
from servers import GatewayProcess, free_port, running, wait_until_async

TINY_KEY = "sk-test-tiny-0000000000003"


def gateway_config(port: int, upstream: str) -> dict[str, Any]:
    return {
        "server": {"port": port, "drain_seconds": 2.0},
        "upstream": {"url": upstream, "api_key": "xai-operator-secret-key", "max_retries": 0},
        "stream": {"keepalive_seconds": 0.5},
        "limits": {"requests_per_minute": 6000, "burst": 1000, "max_concurrent_streams": 100},
        "keys": [{"name": "alice", "key": KEY},
                 {"name": "tiny", "key": TINY_KEY, "burst": 1, "requests_per_minute": 1}],
    }


class Deployment:
    def __init__(self, mock: ThreadedMockUpstream, gateways: list[GatewayProcess],
                 nginx: NginxProcess) -> None:
        self.mock = mock
        self.gateways = gateways
        self.nginx = nginx
        self.url = nginx.url

    def gateway_line(self, request_id: str) -> dict[str, Any] | None:
        for g in self.gateways:
            for line in g.access_lines():
                if line["request_id"] == request_id:
                    return line
        return None


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    directory = tmp_path_factory.mktemp("nginx-deployment")
    with ThreadedMockUpstream() as mock:
        gateways = [GatewayProcess(directory, f"gateway{i}",
                                   gateway_config(free_port(), mock.url)) for i in (1, 2)]
        with running(*gateways):
            nginx = NginxProcess([f"127.0.0.1:{g.port}" for g in gateways])
            try:
                nginx.start()
                yield Deployment(mock, gateways, nginx)
            finally:
                nginx.stop()


async def fetch(url: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
                method: str = "POST") -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, url, json=body, headers=headers) as r:
            return r.status, dict(r.headers), await r.read()


async def test_first_chunk_reaches_the_client_while_the_upstream_is_paused(
        deployment: Deployment) -> None:
    async with aiohttp.ClientSession() as s:
        started = time.monotonic()
        async with s.post(f"{deployment.url}/v1/chat/completions", headers=AUTH,
                          json=chat_body(stream=True, pause_after=1, pause=3)) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "text/event-stream"
            first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 2.5)
            elapsed = time.monotonic() - started
    assert first.startswith(b'data: {"id":"chatcmpl-mock"')
    assert elapsed < 1.5  # the upstream's pause is 3 s: nothing buffered it


async def test_keepalive_comments_pass_during_a_long_pause(deployment: Deployment) -> None:
    body = chat_body(stream=True, pause_after=1, pause=2.0)
    arrivals: list[tuple[float, bytes]] = []
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{deployment.url}/v1/chat/completions", headers=AUTH, json=body) as r:
            assert r.status == 200
            started = time.monotonic()
            async with asyncio.timeout(10):
                async for chunk in r.content.iter_any():
                    arrivals.append((time.monotonic() - started, chunk))
    pings = [t for t, chunk in arrivals for _ in range(chunk.count(KEEPALIVE))]
    # [stream] keepalive_seconds = 0.5 during a 2 s pause: three or four pings, each passed on
    # by nginx as it was written (not held until the pause ended).
    assert len(pings) >= 3
    # Spread over the pause (pings held back by a buffer would arrive together: span ~0).
    assert pings[-1] - pings[0] >= 0.9
    raw = b"".join(chunk for _, chunk in arrivals)
    assert raw.endswith(b"data: [DONE]\n\n")
    # The same events, byte for byte, as a gateway sends them without nginx.
    _, _, direct = await fetch(f"{deployment.gateways[0].url}/v1/chat/completions",
                               chat_body(stream=True), AUTH)
    assert raw.replace(KEEPALIVE, b"") == direct


async def test_auth_and_rate_limit_refusals_pass_unchanged(deployment: Deployment) -> None:
    url = "/v1/chat/completions"
    bad = {"Authorization": "Bearer sk-not-a-valid-key-000000"}
    for stream in (False, True):
        # The SSE frame only for a client whose Accept names the event stream.
        headers = {**bad, "Accept": "text/event-stream"} if stream else bad
        via_nginx = await fetch(deployment.url + url, chat_body(stream=stream), headers)
        direct = await fetch(deployment.gateways[0].url + url, chat_body(stream=stream), headers)
        assert via_nginx[0] == direct[0] == 401
        assert via_nginx[2] == direct[2]
        assert via_nginx[1]["Content-Type"] == direct[1]["Content-Type"]
        if stream:
            assert via_nginx[2].startswith(b'data: {"error":{') and via_nginx[2].endswith(b"\n\n")
            assert orjson.loads(via_nginx[2][6:])["error"]["code"] == "invalid_api_key"

    # The "tiny" key has a burst of 1 in each process: by the third request one has refused.
    refused = None
    for _ in range(4):
        status, headers, raw = await fetch(deployment.url + url, chat_body(stream=True),
                                           {"Authorization": f"Bearer {TINY_KEY}",
                                            "Accept": "text/event-stream"})
        if status == 429:
            refused = headers, raw
            break
        assert status == 200
    assert refused is not None, "no 429 from either process"
    headers, raw = refused
    assert headers["Content-Type"] == "text/event-stream"
    assert int(headers["Retry-After"]) >= 1 and int(headers["retry-after-ms"]) >= 1
    assert headers["x-ratelimit-limit-requests"] == "1"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n") and raw.count(b"\n\n") == 1
    error = orjson.loads(raw[6:])["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"


async def test_error_frames_and_gateway_errors_pass_unchanged(deployment: Deployment) -> None:
    url = "/v1/chat/completions"
    # An upstream error inside the stream becomes the gateway's error frame, last in the stream.
    via_nginx = await fetch(deployment.url + url, chat_body(stream=True, error_after=2), AUTH)
    direct = await fetch(deployment.gateways[1].url + url,
                         chat_body(stream=True, error_after=2), AUTH)
    assert via_nginx[0] == direct[0] == 200
    assert via_nginx[2] == direct[2]
    last = blocks(via_nginx[2])[-1]
    assert orjson.loads(last[6:])["error"]["code"] == "mock_failure"
    # The gateway's own 503 (the upstream's, passed on) is not replaced by nginx's error page.
    via_nginx = await fetch(deployment.url + url, chat_body(stream=False, status=503), AUTH)
    direct = await fetch(deployment.gateways[1].url + url,
                         chat_body(stream=False, status=503), AUTH)
    assert via_nginx[0] == direct[0] == 503
    assert via_nginx[2] == direct[2]
    assert orjson.loads(via_nginx[2])["error"]["code"] == "upstream_http_503"


async def test_requests_spread_over_both_processes_with_one_request_id(
        deployment: Deployment) -> None:
    ids = [f"spread-{uuid.uuid4().hex[:12]}" for _ in range(10)]
    for rid in ids:
        # A forged X-Forwarded-For: nginx appends the address it saw, which the gateway takes.
        status, headers, _ = await fetch(f"{deployment.url}/v1/models", None,
                                         {**AUTH, "X-Request-ID": rid,
                                          "X-Forwarded-For": "203.0.113.7"}, method="GET")
        assert status == 200
        assert headers["X-Request-ID"] == rid
    served_by = {}
    for g in deployment.gateways:
        for line in g.access_lines():
            if line["request_id"] in ids:
                served_by[line["request_id"]] = g.name
                assert line["client_ip"] == "127.0.0.1"
                assert line["key"] == "alice"
    assert set(served_by) == set(ids)
    assert set(served_by.values()) == {"gateway1", "gateway2"}
    # nginx's log line carries the same id, and names the process that served it.
    ports = {g.name: g.port for g in deployment.gateways}
    # (nginx writes its line once the response is sent: the client may read it first.)
    await wait_until_async(lambda: set(ids) <= {line["request_id"] for line in
                                                 deployment.nginx.access_lines()}, 2, "nginx")
    nginx_lines = {line["request_id"]: line for line in deployment.nginx.access_lines()}
    for rid in ids:
        assert nginx_lines[rid]["upstream"] == f"127.0.0.1:{ports[served_by[rid]]}"

    # Without a client id, nginx's $request_id is the one everybody uses.
    status, headers, _ = await fetch(f"{deployment.url}/v1/models", None, AUTH, method="GET")
    rid = headers["X-Request-ID"]
    assert len(rid) == 32 and int(rid, 16) >= 0
    await wait_until_async(lambda: deployment.gateway_line(rid) is not None, 2, "gateway log")
    await wait_until_async(lambda: any(line["request_id"] == rid
                                       for line in deployment.nginx.access_lines()), 2, "nginx")


async def test_a_client_disconnect_at_nginx_cancels_the_upstream_request(
        deployment: Deployment) -> None:
    state = deployment.mock.state
    await wait_until_async(lambda: state.open_streams == 0, 5, "earlier streams to end")
    before = state.disconnects
    rid = f"leaver-{uuid.uuid4().hex[:12]}"
    async with aiohttp.ClientSession() as s:
        r = await s.post(f"{deployment.url}/v1/chat/completions",
                         json=chat_body(stream=True, pause_after=1, pause=10),
                         headers={**AUTH, "X-Request-ID": rid})
        assert r.status == 200
        assert (await r.content.readuntil(b"\n\n")).startswith(b"data: ")
        assert state.open_streams == 1
        left = time.monotonic()
        r.close()  # the client goes away mid-stream
    await wait_until_async(lambda: state.disconnects == before + 1, 3, "the upstream to see it")
    assert state.open_streams == 0
    assert state.last_disconnect - left < 2.0
    await wait_until_async(lambda: deployment.gateway_line(rid) is not None, 3, "gateway log")
    line = deployment.gateway_line(rid)
    assert line is not None and line["outcome"] == "client_disconnect"


async def test_body_size_limit_and_large_bodies(deployment: Deployment) -> None:
    # Above client_body_buffer_size (1 MiB): nginx buffers it to a file, then passes it on.
    big = chat_body(stream=False)
    big["messages"][0]["content"] = "x" * (2 * 1024 * 1024)
    status, _, raw = await fetch(f"{deployment.url}/v1/chat/completions", big, AUTH)
    assert status == 200, raw
    # Above client_max_body_size (20 MiB, the gateway's own limit): nginx refuses it, in the
    # error shape OpenAI clients parse.
    huge = chat_body(stream=False)
    huge["messages"][0]["content"] = "x" * (20 * 1024 * 1024 + 1)
    status, headers, raw = await fetch(f"{deployment.url}/v1/chat/completions", huge,
                                       {**AUTH, "X-Request-ID": "too-big-1"})
    assert status == 413
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Request-ID"] == "too-big-1"
    assert orjson.loads(raw)["error"]["code"] == "request_too_large"


async def test_nginx_own_errors_are_openai_shaped_and_metrics_stay_local(
        deployment: Deployment) -> None:
    dead = NginxProcess([f"127.0.0.1:{free_port()}"])  # nothing listens there
    try:
        dead.start()
        status, headers, raw = await fetch(f"{dead.url}/v1/chat/completions",
                                           chat_body(stream=True), AUTH)
    finally:
        dead.stop()
    assert status == 502
    assert headers["Content-Type"] == "application/json"
    assert len(headers["X-Request-ID"]) == 32
    error = orjson.loads(raw)["error"]
    assert error["code"] == "gateway_unavailable" and error["type"] == "server_error"
    # /metrics answers through nginx on loopback only (the config allows 127.0.0.1 and ::1).
    status, _, raw = await fetch(f"{deployment.url}/metrics", method="GET")
    assert status == 200 and b"gateway_requests_total" in raw


def _slow_client(port: int, payload: bytes, source: str | None = None) -> socket.socket:
    """A connection to nginx that sends ``payload`` and then nothing, from ``source`` (another
    loopback address, as another host would be) when given."""
    s = socket.create_connection(("127.0.0.1", port), timeout=20,
                                 source_address=None if source is None else (source, 0))
    s.sendall(payload)
    return s


def _closed_by_peer(s: socket.socket) -> bytes:
    """Wait for nginx to close the connection; what it sent first (if anything)."""
    received = b""
    try:
        while chunk := s.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


async def test_slow_clients_are_cut_by_nginx_timeouts(deployment: Deployment) -> None:
    port = deployment.nginx.port
    # Slowloris: a header that never ends; and a body that stops after 10 of 1000 bytes.
    header_only = _slow_client(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n")
    body_stalled = _slow_client(port, (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        "X-Request-ID: stalled-body-1\r\nContent-Length: 1000\r\n\r\n").encode() + b'{"model":')
    opened = time.monotonic()
    try:
        # Others are served meanwhile.
        status, _, raw = await fetch(f"{deployment.url}/v1/chat/completions",
                                     chat_body(stream=True), AUTH)
        assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
        # client_header_timeout and client_body_timeout are 10 s.
        loop = asyncio.get_running_loop()
        got = await asyncio.gather(loop.run_in_executor(None, _closed_by_peer, header_only),
                                   loop.run_in_executor(None, _closed_by_peer, body_stalled))
        waited = time.monotonic() - opened
    finally:
        header_only.close()
        body_stalled.close()
    assert 9.0 <= waited <= 15.0
    assert b"200 OK" not in got[0] and b"200 OK" not in got[1]
    # nginx buffers request bodies: the stalled one never reached a gateway process.
    assert deployment.gateway_line("stalled-body-1") is None


async def test_one_address_cannot_take_every_connection_from_another(
        deployment: Deployment) -> None:
    """Uploads that never end, from one address: past its ``limit_conn`` share nginx answers
    429 in the error shape at once, and another address is served as before."""
    share = int(re.search(r"limit_conn per_address (\d+);", NGINX_CONF.read_text())[1])
    stalled_upload = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n").encode() + b'{"model":'
    port = deployment.nginx.port
    held = [_slow_client(port, stalled_upload, "127.0.0.2") for _ in range(share)]
    try:
        await asyncio.sleep(0.5)  # nginx has read every head: each counts against the share
        extra = _slow_client(port, stalled_upload, "127.0.0.2")
        held.append(extra)
        refused = await asyncio.get_running_loop().run_in_executor(None, _closed_by_peer, extra)
        assert refused.startswith(b"HTTP/1.1 429 ")
        err = orjson.loads(refused.partition(b"\r\n\r\n")[2])["error"]
        assert (err["type"], err["code"]) == ("rate_limit_error", "too_many_connections")
        connector = aiohttp.TCPConnector(local_addr=("127.0.0.3", 0))
        async with aiohttp.ClientSession(connector=connector) as s, s.post(
                f"{deployment.url}/v1/chat/completions", json=chat_body(stream=True),
                headers=AUTH) as r:
            assert r.status == 200 and (await r.read()).endswith(b"data: [DONE]\n\n")
    finally:
        for sock in held:
            sock.close()


async def test_websocket_mode_passes_through_and_plain_requests_beside_it_are_untouched(
        deployment: Deployment) -> None:
    """The upgrade reaches the gateway (a turn answered over the socket, the key checked from
    the upgrade's headers); a plain request beside it is answered as ever."""
    url = deployment.url.replace("http://", "ws://") + "/api/v1/responses"
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(url, headers=AUTH) as ws:
            await ws.send_str(orjson.dumps({"type": "response.create", "model": "grok-4",
                                            "input": "hi"}).decode())
            kinds = []
            while not kinds or kinds[-1] != "response.completed":
                kinds.append(orjson.loads((await ws.receive(timeout=10)).data)["type"])
        assert kinds[0] == "response.created"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await s.ws_connect(url)  # no key: 401, no socket
        assert refused.value.status == 401
    status, headers, _ = await fetch(f"{deployment.url}/api/v1/chat/completions",
                                     chat_body(stream=False), AUTH)
    assert status == 200


def test_the_tested_config_is_the_shipped_one(tmp_path: Path) -> None:
    """Only the lines marked ``# site:`` differ between deploy/nginx.conf and what runs."""
    shipped = NGINX_CONF.read_text().splitlines()
    rendered = render_nginx_conf(tmp_path, 8999, ["127.0.0.1:1", "127.0.0.1:2"]).splitlines()
    unmarked = [line for line in shipped if "# site:" not in line]
    assert [line for line in rendered if line in unmarked] == unmarked
    for directive in ("proxy_buffering off;", "proxy_http_version 1.1;",
                      'proxy_set_header Connection "";', "client_max_body_size 20m;",
                      "proxy_read_timeout 3600s;", "keepalive 64;"):
        assert any(line.strip() == directive for line in unmarked), directive
