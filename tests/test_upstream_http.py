"""The upstream HTTP/1.1 client (``gateway/upstream/http1.py``, its pool
``gateway/upstream/pool.py``) against real servers on loopback: a plain aiohttp server, raw TCP
servers for answers aiohttp would never send, and the mock upstream over TLS, driven through the
gateway with the OpenAI SDK."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from gateway.mock.upstream import create_mock_app
from gateway.upstream.client import UpstreamClient
from gateway.upstream.http1 import ConnectionLost, InvalidHTTP
from gateway.upstream.pool import ConnectionPool

from clients import async_sdk
from conftest import Upstream, settings_for

PeerLog = list[tuple[str, int]]


@contextlib.asynccontextmanager
async def aiohttp_server(keepalive_timeout: float = 75) -> AsyncIterator[tuple[str, PeerLog]]:
    """A server answering ``/echo`` with the request body; it records each request's peer."""
    peers: PeerLog = []

    async def echo(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        return web.Response(body=await request.read(), content_type="application/json")

    app = web.Application()
    app.router.add_post("/echo", echo)
    runner = web.AppRunner(app, keepalive_timeout=keepalive_timeout)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", peers
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def raw_server(*answer: bytes, pause: float = 0) -> AsyncIterator[str]:
    """Answers one request with ``answer`` as it is, one write per part ``pause`` seconds
    apart, then closes the connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for i, part in enumerate(answer):
            if i:
                await asyncio.sleep(pause)
            writer.write(part)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


def request(body: bytes) -> bytes:
    return (b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body))


async def test_sequential_requests_reuse_one_keep_alive_connection() -> None:
    async with aiohttp_server() as (url, peers):
        pool = ConnectionPool(url, connect_timeout=5)
        try:
            for i in range(3):
                answer = await pool.send(request(b'{"n": %d}' % i))
                assert (answer.status, await answer.read()) == (200, b'{"n": %d}' % i)
                answer.release()
            assert len(peers) == 3 and len(set(peers)) == 1
            assert pool.open_connections == 1
        finally:
            pool.close()


async def test_an_answer_not_read_to_its_end_closes_its_connection() -> None:
    async with aiohttp_server() as (url, peers):
        pool = ConnectionPool(url, connect_timeout=5)
        try:
            answer = await pool.send(request(b"x" * 200_000))
            assert await answer.read(10) == b"x" * 10
            answer.release()  # the rest is unread: the connection cannot carry another request
            assert pool.open_connections == 0
            answer = await pool.send(request(b"{}"))
            assert await answer.read() == b"{}"
            answer.release()
            assert len(set(peers)) == 2
        finally:
            pool.close()


async def test_a_connection_the_upstream_closed_while_idle_is_not_used_again() -> None:
    async with aiohttp_server(keepalive_timeout=0.1) as (url, peers):
        pool = ConnectionPool(url, connect_timeout=5)
        try:
            for _ in range(2):
                answer = await pool.send(request(b"{}"))
                assert await answer.read() == b"{}"
                answer.release()
                await asyncio.sleep(0.4)  # the server closes the idle connection meanwhile
                assert pool.open_connections == 0
            assert len(set(peers)) == 2
        finally:
            pool.close()


async def test_a_body_delimited_by_the_connections_end_is_read_whole() -> None:
    async with raw_server(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it") as url:
        pool = ConnectionPool(url, connect_timeout=5)
        answer = await pool.send(request(b"{}"))
        assert (answer.status, await answer.read()) == (200, b"all of it")
        answer.release()
        assert pool.open_connections == 0


async def test_a_body_cut_short_is_an_error_not_a_short_answer() -> None:
    async with raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this") as url:
        pool = ConnectionPool(url, connect_timeout=5)
        answer = await pool.send(request(b"{}"))
        with pytest.raises(ConnectionLost):
            await answer.read()
        answer.release()
        assert pool.open_connections == 0


async def test_a_streamed_body_arrives_piece_by_piece_then_ends() -> None:
    body = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in (b"one ", b"two ", b"three"))
    async with raw_server(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                          + body + b"0\r\n\r\n") as url:
        pool = ConnectionPool(url, connect_timeout=5)
        answer = await pool.send(request(b"{}"))
        pieces: list[bytes] = []
        ended: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        answer.stream(pieces.append, ended.set_result)
        assert await asyncio.wait_for(ended, 5) is None
        assert b"".join(pieces) == b"one two three"
        answer.release()


async def test_the_chunks_one_read_brings_are_handed_on_as_one_piece() -> None:
    """An upstream that sends each event as its own HTTP chunk: what one read brings costs one
    render and one client write, not one per chunk (a read holds several under load)."""
    chunks = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in (b"one ", b"two ", b"three"))
    async with raw_server(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", chunks,
                          b"0\r\n\r\n", pause=0.1) as url:
        pool = ConnectionPool(url, connect_timeout=5)
        answer = await pool.send(request(b"{}"))
        pieces: list[bytes] = []
        ended: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        answer.stream(pieces.append, ended.set_result)  # before the chunks arrive, in one write
        assert await asyncio.wait_for(ended, 5) is None
        assert pieces == [b"one two three"]
        answer.release()


async def test_an_early_hints_answer_is_skipped_for_the_real_one() -> None:
    async with raw_server(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
                          b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") as url:
        pool = ConnectionPool(url, connect_timeout=5)
        answer = await pool.send(request(b"{}"))
        assert (answer.status, "Link" in answer.headers, await answer.read()) == (200, False, b"ok")
        answer.release()


async def test_the_upstream_is_asked_for_identity_and_a_compressed_answer_is_refused(
        mock_upstream: Upstream) -> None:
    client = UpstreamClient(settings_for(mock_upstream.url), mock_upstream.url, "k")
    await client.start()
    try:
        answer = await client.request("GET", "models")
        answer.release()
        assert mock_upstream.state.requests[-1]["headers"]["Accept-Encoding"] == "identity"
    finally:
        await client.close()
    async with raw_server(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n"
                          b"Content-Length: 3\r\n\r\n\x1f\x8b\x08") as url:
        with pytest.raises(InvalidHTTP, match="compressed answer"):
            await ConnectionPool(url, connect_timeout=5).send(request(b"{}"))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl, as on any Debian machine)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@contextlib.asynccontextmanager
async def tls_mock_upstream(cert: Path, key: Path) -> AsyncIterator[str]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner = web.AppRunner(create_mock_app(), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


async def test_an_https_upstream_streams_once_its_certificate_is_trusted(
        certificate: tuple[Path, Path], start_gateway: Callable[..., Awaitable[Any]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = certificate
    async with tls_mock_upstream(cert, key) as url:
        # Not trusted: the certificate is checked, and the client learns the upstream failed.
        _, base = await start_gateway(settings_for(url))
        with pytest.raises(openai.APIStatusError) as refused:
            await async_sdk(base).chat.completions.create(
                model="grok-4", messages=[{"role": "user", "content": "hi"}])
        assert refused.value.status_code == 502
        assert refused.value.body["code"] == "upstream_unreachable"  # type: ignore[index]

        # Trusted through the standard OpenSSL variable: the stream arrives whole.
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        _, base = await start_gateway(settings_for(url))
        stream = await async_sdk(base).chat.completions.create(
            model="grok-4", messages=[{"role": "user", "content": "hi"}], stream=True,
            extra_body={"mock": {"text": "over TLS", "chunks": 2}})
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "over TLS"


def test_only_a_key_long_enough_to_be_one_is_looked_for_in_what_the_upstream_sends() -> None:
    """A short key would match ordinary text: every event would be parsed and its letters
    taken out. Provider keys are dozens of characters."""
    settings = settings_for("http://127.0.0.1:1/v1")
    assert UpstreamClient(settings, "http://127.0.0.1:1/v1", "k").secrets.text == ()
    assert UpstreamClient(settings, "http://127.0.0.1:1/v1", "xai-0123456789").secrets.text == (
        "xai-0123456789",)
