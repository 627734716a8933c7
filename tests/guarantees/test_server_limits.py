"""With no proxy in front, the gateway guards its own client connections (``[server]`` header,
body and keep-alive timeouts, connection cap; ``gateway/server/limits.py``), and a request its
HTTP parser refuses gets an error-shaped 400 that quotes nothing of it.

Every case is a raw socket on loopback doing what a hostile (or broken) client does, against a
gateway served as ``gateway serve`` serves it (``GatewayRunner``), with limits of a fraction of a
second so that each test takes about one; the last case runs a real ``gateway serve`` process and
reads everything it logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from clients import mock_events
from conftest import KEY, Upstream, settings_for
from observe import access_lines, error_of
from servers import ROOT, GatewayProcess, clean_environ, free_port

Serve = Callable[..., Awaitable[int]]
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n"
BODY = orjson.dumps({"model": "grok-4", "stream": True,
                     "messages": [{"role": "user", "content": "hi"}]})


def post_head(length: int) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length)


@pytest.fixture
async def serve(mock_upstream: Upstream, start_gateway: Any) -> Serve:
    """``port = await serve(**server_settings)``: a gateway with those ``[server]`` settings."""
    async def start(**server: Any) -> int:
        _, base = await start_gateway(settings_for(mock_upstream.url, server=server))
        return int(base.rsplit(":", 1)[1])
    return start


async def connect(port: int, source: str | None = None
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the gateway on 127.0.0.1, from ``source`` (another loopback address,
    as another host would be) when given."""
    return await asyncio.open_connection(
        "127.0.0.1", port, local_addr=None if source is None else (source, 0))


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (bounded in time)."""
    out = b""
    async with asyncio.timeout(timeout):
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                out += chunk
    return out


async def read_response(reader: asyncio.StreamReader, timeout: float = 2) -> bytes:
    """One response with a ``Content-Length``, the connection left open."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                      if line.startswith(b"content-length:"))
        return head + await reader.readexactly(length)


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), {k.lower(): v for k, v in headers.items()}, body


def json_error(raw: bytes, status: int) -> dict[str, Any]:
    """The error object of a raw JSON error answer with this status."""
    got, headers, body = split_response(raw)
    assert got == status, raw[:300]
    assert headers["content-type"].startswith("application/json")
    assert int(headers["content-length"]) == len(body)
    return error_of(body)


async def drip(writer: asyncio.StreamWriter, data: bytes, interval: float) -> None:
    """Send ``data`` a byte at a time, as a slowloris client does, until the server hangs up."""
    with contextlib.suppress(ConnectionError):
        for i in range(len(data)):
            writer.write(data[i:i + 1])
            await writer.drain()
            await asyncio.sleep(interval)


async def test_a_head_sent_byte_by_byte_gets_408_and_is_cut_off_at_the_header_timeout(
        serve: Serve) -> None:
    port = await serve(header_timeout_seconds=0.5, keepalive_timeout_seconds=10)
    reader, writer = await connect(port)
    started = time.monotonic()
    dripping = asyncio.create_task(drip(writer, HEALTHZ[:-2] + b"X-Pad: " + b"a" * 500, 0.02))
    try:
        raw = await read_until_closed(reader, timeout=3)
    finally:
        dripping.cancel()
        writer.close()
    elapsed = time.monotonic() - started
    err = json_error(raw, 408)
    assert (err["type"], err["code"]) == ("invalid_request_error", "request_timeout")
    assert 0.4 < elapsed < 1.5, f"cut off after {elapsed:.2f}s; the header timeout is 0.5s"


@pytest.mark.parametrize("pace", ["stalled", "trickled"])
async def test_a_body_not_all_sent_by_the_body_timeout_gets_408_and_the_connection_closes(
        serve: Serve, mock_upstream: Upstream, caplog: pytest.LogCaptureFixture,
        pace: str) -> None:
    """The whole body is due within the timeout of the headers' end, however steadily it
    trickles; the upstream never hears of the request."""
    caplog.set_level(logging.INFO)
    port = await serve(body_timeout_seconds=0.5)
    reader, writer = await connect(port)
    writer.write(post_head(len(BODY) + 1000) + BODY[:10])
    started = time.monotonic()
    dripping = asyncio.create_task(drip(writer, BODY[10:] + b" " * 1000, 0.02)) \
        if pace == "trickled" else None
    try:
        raw = await read_until_closed(reader, timeout=3)
    finally:
        if dripping is not None:
            dripping.cancel()
        writer.close()
    elapsed = time.monotonic() - started
    err = json_error(raw, 408)
    assert (err["type"], err["code"]) == ("invalid_request_error", "request_timeout")
    assert 0.4 < elapsed < 1.5, f"answered after {elapsed:.2f}s; the body timeout is 0.5s"
    assert mock_upstream.state.requests == []
    (line,) = access_lines(caplog)
    assert (line["status"], line["key"]) == (408, "alice")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], \
        "one access line, no traceback"


async def test_heads_and_bodies_in_pieces_within_the_timeouts_are_served(
        serve: Serve) -> None:
    port = await serve(header_timeout_seconds=1, body_timeout_seconds=1)
    reader, writer = await connect(port)
    try:
        request = post_head(len(BODY)) + BODY
        for piece in (request[:20], request[20:60], request[60:200], request[200:]):
            writer.write(piece)
            await asyncio.sleep(0.15)
        async with asyncio.timeout(5):
            raw = await reader.readuntil(b"data: [DONE]\n\n")
        assert raw.startswith(b"HTTP/1.1 200 ")
        assert raw.endswith(b"".join(mock_events(
            "Ah, the meaning of life is forty-two, as everyone knows.")))
    finally:
        writer.close()


async def test_an_idle_keepalive_connection_closes_after_the_keepalive_timeout(
        serve: Serve) -> None:
    port = await serve(keepalive_timeout_seconds=0.5)
    reader, writer = await connect(port)  # one that never sends anything
    used_reader, used_writer = await connect(port)  # one idle after a response
    try:
        used_writer.write(HEALTHZ)
        assert (await read_response(used_reader)).startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        for r in (used_reader, reader):
            assert await read_until_closed(r, timeout=3) == b""
        elapsed = time.monotonic() - started
        assert elapsed < 1.5, f"closed after {elapsed:.2f}s; the keep-alive timeout is 0.5s"
    finally:
        writer.close()
        used_writer.close()


async def test_connections_past_the_cap_get_503_at_once_and_are_accepted_again_below_it(
        serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    port = await serve(max_connections=3, keepalive_timeout_seconds=10)
    held = [await connect(port) for _ in range(3)]
    try:
        for reader, writer in held:  # each served, then kept open: counted
            writer.write(HEALTHZ)
            assert (await read_response(reader)).startswith(b"HTTP/1.1 200 ")
        reader, writer = await connect(port)
        raw = await read_until_closed(reader, timeout=1)  # before it sends a byte
        writer.close()
        err = json_error(raw, 503)
        assert (err["type"], err["code"]) == ("server_error", "too_many_connections")
        assert split_response(raw)[1]["retry-after"] == "1"
        assert "max_connections" in caplog.text
        # The connections within the cap go on working.
        reader, writer = held[0]
        writer.write(HEALTHZ)
        assert (await read_response(reader)).startswith(b"HTTP/1.1 200 ")
        # One closes: a new connection is served again.
        held.pop()[1].close()
        deadline = time.monotonic() + 2
        while True:
            reader, writer = await connect(port)
            writer.write(HEALTHZ)
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                raw = await read_response(reader)
            writer.close()
            if raw.startswith(b"HTTP/1.1 200 "):
                break
            assert time.monotonic() < deadline, "not accepted again after one connection closed"
            await asyncio.sleep(0.02)
    finally:
        for _, writer in held:
            writer.close()


async def test_one_address_past_its_share_of_connections_is_refused_and_others_are_served(
        serve: Serve) -> None:
    """Idle sockets from one host took every slot: 210 of them made every request of another
    client a 503. Now one address holds at most its share (by default a quarter of the cap)."""
    port = await serve(max_connections=8, keepalive_timeout_seconds=10)
    hog = [await connect(port, "127.0.0.2") for _ in range(8)]
    try:
        refused = 0
        for reader, _ in hog:
            with contextlib.suppress(TimeoutError):
                raw = await read_until_closed(reader, timeout=0.3)  # the held ones say nothing
                if raw:
                    err = json_error(raw, 503)
                    assert err["code"] == "too_many_connections"
                    assert "this address" in err["message"]
                    refused += 1
        assert refused == 6  # two of eight held
        others = [await connect(port, "127.0.0.3") for _ in range(2)]  # another host's share
        hog += others
        for reader, writer in others:
            writer.write(HEALTHZ)
            assert (await read_response(reader)).startswith(b"HTTP/1.1 200 ")
    finally:
        for _, writer in hog:
            writer.close()


async def test_a_control_character_in_the_key_header_gets_a_json_400_and_no_log_line_holds_it(
        tmp_path: Path) -> None:
    """aiohttp's own answer quoted the header line back, key and all, and its log line kept the
    part of the key after the control character: a real ``gateway serve``, all of its output."""
    head, tail = "sk-test-QWERTYZX", "PLMOKNIJ-000001"
    gateway = GatewayProcess(tmp_path, "malformed", {
        "server": {"port": free_port()}, "upstream": {"url": "mock"},
        "keys": [{"name": "alice", "key": head + tail}]})
    gateway.start().wait_ready()
    try:
        for bad in (b"\x0b", b"\x00", b"\r!"):
            for header in (b"Authorization: Bearer ", b"x-api-key: "):
                reader, writer = await connect(gateway.port)
                writer.write(b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\n" + header
                             + head.encode() + bad + tail.encode() + b"\r\n\r\n")
                raw = await read_until_closed(reader, timeout=3)  # closed after the answer
                writer.close()
                err = json_error(raw, 400)
                assert (err["type"], err["code"]) == ("invalid_request_error",
                                                      "malformed_request")
                for part in (head, tail, "QWERTYZX", "PLMOKNIJ"):
                    assert part.encode() not in raw, f"{part} echoed: {raw!r}"
    finally:
        assert gateway.stop() == 0
    logs = gateway.logs()
    assert logs.count("gateway.http Error handling request from 127.0.0.1: BadHttpMessage, "
                      "answered 400") == 6, logs
    for part in ("QWERTYZX", "PLMOKNIJ"):
        assert part not in logs, f"{part} in the log:\n{logs}"


def test_the_open_file_limit_is_raised_for_the_cap_or_a_warning_says_it_is_out_of_reach() -> None:
    """Below the cap, ``accept`` would fail (EMFILE) before the cap is reached."""
    script = """if True:
        import logging, resource, sys
        from gateway.server.limits import raise_open_file_limit
        logging.basicConfig(stream=sys.stdout, format="%(message)s")
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 2000))
        raise_open_file_limit(500)
        print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        raise_open_file_limit(5000)
    """
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=clean_environ(),
                            capture_output=True, text=True, timeout=30)
    soft, warning = result.stdout.splitlines()
    assert soft == "1256", result.stderr  # two a connection, and some to spare
    assert warning == ("open-file limit 2000 is below the 5256 that [server] max_connections = "
                       "5000 needs; raise it (systemd: LimitNOFILE) or lower max_connections")
