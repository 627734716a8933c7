"""Pins each aiohttp behaviour ``gateway/stream/client_stream.py`` relies on, against a real aiohttp
server and raw sockets, so an aiohttp upgrade that changes one fails here first (the range in
``setup.cfg`` is the one these tests pass on).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from gateway.stream.client_stream import ClientGone, ClientStream

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> int:
        app = web.Application()
        app.router.add_get("/", handler)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return int(runner.addresses[0][1])

    yield start
    for runner in runners:
        await runner.cleanup()


async def connect(port: int, version: str = "1.1"
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET / HTTP/{version}\r\nHost: x\r\n\r\n".encode())
    return reader, writer


async def test_open_sends_the_headers_at_once_before_any_write(serve: Callable[..., Awaitable[int]]
                                                               ) -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        stream = ClientStream(request)
        response = await stream.open({"X-Test": "1", "Content-Type": "text/event-stream"})
        await release.wait()
        stream.write(b"data: 1\n\n")
        await stream.close(5)
        return response

    reader, writer = await connect(await serve(handler))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)  # before any write
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"X-Test: 1\r\n" in head
    assert b"Transfer-Encoding: chunked\r\n" in head
    release.set()
    body = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 2)
    assert body == b"9\r\ndata: 1\n\n\r\n0\r\n\r\n"  # our chunk, then only the last chunk
    writer.close()


async def test_the_last_events_go_as_a_chunk_before_the_last_chunk(
        serve: Callable[..., Awaitable[int]]) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        stream = ClientStream(request)
        response = await stream.open({"Content-Type": "text/event-stream"})
        stream.write(b"data: 1\n\n")
        await stream.close(5, b"data: 2\n\n")
        return response

    reader, writer = await connect(await serve(handler))
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    body = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 2)
    assert body == b"9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n"
    writer.close()


async def test_a_whole_answer_goes_out_with_its_head_and_end(
        serve: Callable[..., Awaitable[int]]) -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        stream = ClientStream(request)
        response = await stream.open({"X-Test": "1"}, whole=True)
        await release.wait()
        await stream.close(5, b"data: 1\n\n")
        return response

    reader, writer = await connect(await serve(handler))
    with pytest.raises(TimeoutError):  # the head waits for the answer
        await asyncio.wait_for(reader.read(1), 0.3)
    release.set()
    raw = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 2)
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"X-Test: 1\r\n" in head
    assert body == b"9\r\ndata: 1\n\n\r\n0\r\n\r\n"
    writer.close()


async def test_a_write_after_a_whole_open_sends_the_head_first(
        serve: Callable[..., Awaitable[int]]) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        stream = ClientStream(request)
        response = await stream.open({"Content-Type": "text/event-stream"}, whole=True)
        stream.write(b"data: 1\n\n")
        await stream.close(5, b"data: 2\n\n")
        return response

    reader, writer = await connect(await serve(handler))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    body = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 2)
    assert body == b"9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n"
    writer.close()


@pytest.mark.parametrize("whole", [False, True])
async def test_http10_gets_bare_bytes_and_the_connection_ends_the_body(
        serve: Callable[..., Awaitable[int]], whole: bool) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        stream = ClientStream(request)
        response = await stream.open({"Content-Type": "text/event-stream"}, whole=whole)
        stream.write(b"data: 1\n\n")
        await stream.close(5, b"data: 2\n\n")  # the last events as they are
        return response

    reader, writer = await connect(await serve(handler), "1.0")
    raw = await asyncio.wait_for(reader.read(), 2)  # read() returns at the connection's end
    head, body = raw.split(b"\r\n\r\n", 1)
    assert b"chunked" not in head.lower()
    assert body == b"data: 1\n\ndata: 2\n\n"
    writer.close()


async def test_paused_while_the_send_buffer_is_full_and_drain_returns_once_read(
        serve: Callable[..., Awaitable[int]]) -> None:
    seen: dict[str, bool] = {}
    drained = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        stream = ClientStream(request)
        response = await stream.open({"Content-Type": "text/event-stream"})
        block = b"x" * 65536
        for _ in range(200):  # 13 MB: far past any socket buffer
            if stream.paused:
                break
            stream.write(block)
        seen["paused"] = stream.paused
        await stream.drain()
        seen["after_drain"] = stream.paused
        drained.set()
        await stream.close(5)
        return response

    port = await serve(handler)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.3)  # the client reads nothing yet
    assert seen == {"paused": True} and not drained.is_set()
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    while not drained.is_set():
        try:
            await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 0.5)
        except TimeoutError:
            break
    assert drained.is_set() and seen["after_drain"] is False
    sock.close()


async def test_a_write_or_a_last_write_after_the_client_left_raises_client_gone(
        serve: Callable[..., Awaitable[int]]) -> None:
    result: dict[str, object] = {}
    opened = asyncio.Event()
    left = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        stream = ClientStream(request)
        response = await stream.open({"Content-Type": "text/event-stream"})
        opened.set()
        try:
            await left.wait()  # handler cancellation is on: the client leaving cancels us
        except asyncio.CancelledError:
            try:
                stream.write(b"data: late\n\n")
            except ClientGone:
                result["gone"] = True
            try:
                await stream.close(5, b"data: last\n\n")
            except ClientGone:
                result["gone at the end"] = True
            raise
        return response

    reader, writer = await connect(await serve(handler))
    await asyncio.wait_for(opened.wait(), 2)
    writer.close()
    for _ in range(50):
        if result:
            break
        await asyncio.sleep(0.02)
    assert result == {"gone": True, "gone at the end": True}


async def test_the_client_reads_a_complete_chunked_stream(
        serve: Callable[..., Awaitable[int]]) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        stream = ClientStream(request)
        response = await stream.open({"Content-Type": "text/event-stream"})
        for i in range(3):
            stream.write(b"data: %d\n\n" % i)
        await stream.close(5)
        return response

    port = await serve(handler)
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # the connection is reusable after the stream
            async with session.get(f"http://127.0.0.1:{port}/") as r:
                assert await r.read() == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
