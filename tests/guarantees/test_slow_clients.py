"""A client that reads slowly, or not at all, slows the upstream read instead of filling the
gateway's memory: once the client's transport pauses writing, the relay stops reading the
upstream socket until it drains; and before the relay reads at all (while the client is sent
its headers), an answer keeps no more than a small hold of its body, the rest waiting in the
socket. Memory per stream is bounded by the socket buffers and one chunk, whatever the stream's
size. A slow client's stream still ends cleanly: nothing follows its last frame. A client that
reads nothing at all is cut off after the idle limit.
"""

from __future__ import annotations

import asyncio
import socket
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from gateway.appkeys import IN_FLIGHT
from gateway.upstream.client import UpstreamClient

from clients import AUTH, USER, chat_body
from conftest import KEY, Upstream, settings_for
from observe import wait_until
from servers import GatewayProcess, gateway_processes

CHUNK_BYTES, CHUNKS = 64 * 1024, 1024  # a 64 MiB stream
MiB = 1024 * 1024


async def test_a_slow_client_slows_the_upstream_instead_of_filling_memory(
        gateway: Any, mock_upstream: Upstream) -> None:
    _, base = gateway
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/api/v1/chat/completions", headers=AUTH,
                          json=chat_body(stream=True, messages=USER, chunks=CHUNKS,
                                         chunk_bytes=CHUNK_BYTES)) as r:
            assert r.status == 200
            await asyncio.sleep(1.5)  # the client reads nothing
            # Buffered without bound, the mock would have finished long ago.
            assert mock_upstream.state.completed_streams == 0
            assert mock_upstream.state.open_streams == 1
            size = 0
            async for piece in r.content.iter_any():
                size += len(piece)
    assert mock_upstream.state.completed_streams == 1
    assert size > CHUNKS * CHUNK_BYTES


async def test_an_answer_nobody_reads_yet_waits_in_the_upstream_socket_not_in_memory(
        mock_upstream: Upstream) -> None:
    """Between the upstream's headers and the relay's first read the gateway sends the client
    its own headers, a moment that a loaded machine can stretch to many loop turns. An answer
    read into memory meanwhile would take a fast upstream's whole stream. The process test
    below sees that only when the load stretches the moment; here nobody reads on purpose:
    the answer cannot finish, what this process keeps of it (``tracemalloc``: Python's own
    allocations, not the kernel's socket buffers) is a small fraction of it, and it all comes,
    in order, once streamed."""
    client = UpstreamClient(settings_for(mock_upstream.url), mock_upstream.url, "k")
    await client.start()
    try:
        answer = await client.request("POST", "chat/completions", body=orjson.dumps(chat_body(
            stream=True, messages=USER, chunks=CHUNKS, chunk_bytes=CHUNK_BYTES)),
            headers={"Content-Type": "application/json"})
        assert answer.status == 200
        tracing = tracemalloc.is_tracing()
        if not tracing:
            tracemalloc.start()
        try:
            start = tracemalloc.get_traced_memory()[0]
            await asyncio.sleep(1)  # nobody reads; unheld, the whole stream takes a fraction of it
            kept = tracemalloc.get_traced_memory()[0] - start
        finally:
            if not tracing:
                tracemalloc.stop()
        assert kept < 4 * MiB, f"{kept / MiB:.1f} MiB of an answer nobody reads yet kept"
        assert mock_upstream.state.completed_streams == 0
        ended: asyncio.Future[BaseException | None] = asyncio.Future()
        pieces: list[bytes] = []
        answer.stream(pieces.append, ended.set_result)
        assert await asyncio.wait_for(ended, 30) is None
        answer.release()
    finally:
        await client.close()
    body = b"".join(pieces)
    assert len(body) > CHUNKS * CHUNK_BYTES and body.endswith(b"data: [DONE]\n\n")
    assert mock_upstream.state.completed_streams == 1


def memory(gw: GatewayProcess) -> tuple[int, int]:
    """The process's resident set now and its peak (``VmHWM``) since ``reset_peak``, in bytes."""
    fields = dict(line.split(":", 1) for line in
                  Path(f"/proc/{gw.pid}/status").read_text().splitlines())
    return (int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024)


def reset_peak(gw: GatewayProcess) -> None:
    """Start ``VmHWM`` again from the resident set now (``clear_refs``' "5", proc(5)): else the
    peak is the process's whole life's, start-up and warm-up included, not the stream's."""
    Path(f"/proc/{gw.pid}/clear_refs").write_text("5")


async def test_the_gateway_process_memory_stays_flat_under_a_stalled_64_mib_stream(
        mock_upstream: Upstream, tmp_path: Path) -> None:
    """Measured on a real ``gateway serve`` process (its RSS is its own, not the test's): a
    64 MiB stream to a client that stalls, then reads, moves its peak RSS, from the moment the
    stream starts, by a small fraction of the stream (the peak is reset first: start-up and
    warm-up are not the stream's). An answer read before the relay comes shows here only under
    load; the test above pins that moment."""
    config = {"server": {"drain_seconds": 0.5},
              "upstream": {"url": mock_upstream.url, "api_key": "xai-operator-secret-key"},
              "keys": [{"name": "alice", "key": KEY}]}
    async with gateway_processes(config, 1, tmp_path) as [gw], \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        url = f"{gw.url}/api/v1/chat/completions"
        # Warm up: the allocator's and aiohttp's buffers at their working size.
        for _ in range(3):
            async with s.post(url, headers=AUTH, json=chat_body(
                    stream=True, messages=USER, chunks=64, chunk_bytes=CHUNK_BYTES)) as r:
                assert len(await r.read()) > 64 * CHUNK_BYTES
        reset_peak(gw)
        before, _ = memory(gw)
        async with s.post(url, headers=AUTH,
                          json=chat_body(stream=True, messages=USER, chunks=CHUNKS,
                                         chunk_bytes=CHUNK_BYTES)) as r:
            assert r.status == 200
            for _ in range(10):  # the client stalls for a second
                await asyncio.sleep(0.1)
                assert memory(gw)[0] - before < 16 * MiB
            assert mock_upstream.state.completed_streams == 3  # the upstream read is paused
            size = 0
            async for piece in r.content.iter_any():
                size += len(piece)
        _, peak = memory(gw)
    assert size > CHUNKS * CHUNK_BYTES
    assert peak - before < 16 * MiB, f"peak RSS grew by {(peak - before) / MiB:.1f} MiB"


async def test_a_slow_clients_stream_that_fails_ends_with_its_error_frame_and_nothing_after(
        mock_upstream: Upstream, start_gateway: Any) -> None:
    """The error frame and the chunked terminator wait for a slow client to drain; no
    keep-alive comment may be written meanwhile (it would land after the response's end)."""
    _, base = await start_gateway(settings_for(mock_upstream.url,
                                               stream={"keepalive_seconds": 0.05}))
    body = orjson.dumps(chat_body(stream=True, messages=USER, chunks=16, chunk_bytes=64 * 1024,
                                  error_after=14))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)  # small: the gateway must wait
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1",
                                                         int(base.rsplit(":", 1)[1])))
    reader, writer = await asyncio.open_connection(sock=sock, limit=8192)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %b"
                 b"\r\nContent-Type: application/json\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n%b" % (KEY.encode(), len(body), body))
    raw = bytearray()
    while piece := await asyncio.wait_for(reader.read(8192), 10):
        raw += piece
        await asyncio.sleep(0.01)  # under 1 MB/s: each drain outlasts a keep-alive interval
    writer.close()
    wire = bytes(raw).partition(b"\r\n\r\n")[2]
    decoded = bytearray()
    while size := int(wire[:wire.index(b"\r\n")], 16):
        start = wire.index(b"\r\n") + 2
        decoded += wire[start:start + size]
        wire = wire[start + size + 2:]
    assert wire == b"0\r\n\r\n"  # the terminator, and not one byte after it
    assert decoded.endswith(b"\n\n") and b"mock_failure" in decoded[-300:]
    assert decoded.count(b"data: ") == 15  # 14 events, then the error frame


async def test_a_client_that_reads_nothing_for_the_idle_limit_is_cut_off_and_frees_everything(
        mock_upstream: Upstream, start_gateway: Any) -> None:
    """Paused for a client that stopped reading, a stream still has a limit: past
    ``idle_timeout_seconds`` with nothing taken, the client is treated as gone, so its stream
    slot, its upstream connection and the relay come back (a pause longer than many keep-alive
    intervals, which once left a timer firing every millisecond)."""
    app, base = await start_gateway(settings_for(
        mock_upstream.url, stream={"keepalive_seconds": 0.05, "idle_timeout_seconds": 0.8},
        keys=[{"name": "alice", "key": KEY, "max_concurrent_streams": 1}]))
    body = orjson.dumps(chat_body(stream=True, messages=USER, chunks=CHUNKS,
                                  chunk_bytes=CHUNK_BYTES))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", int(base.rsplit(":", 1)[1])))
    await loop.sock_sendall(sock, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                            b"Authorization: Bearer %b\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%b" % (KEY.encode(), len(body), body))
    await asyncio.sleep(0.3)  # the client reads nothing; the stream is paused
    assert len(app[IN_FLIGHT]) == 1 and mock_upstream.state.open_streams == 1
    await wait_until(lambda: len(app[IN_FLIGHT]) == 0, 3, "the stalled stream ended")
    await wait_until(lambda: mock_upstream.state.disconnects == 1, 2,
                     "the upstream saw the request end")
    async with aiohttp.ClientSession() as s, s.post(
            f"{base}/v1/chat/completions", headers=AUTH,
            json=chat_body(stream=True, messages=USER)) as r:  # the key's one slot is back
        assert r.status == 200 and (await r.read()).endswith(b"data: [DONE]\n\n")
    sock.close()
