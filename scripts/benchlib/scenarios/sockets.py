"""``sockets``: the Responses API's WebSocket mode against ``POST responses`` streams, through
the gateway: --socket-clients sockets each run --socket-turns turns one after another, then as
many clients each run as many streams; CPU of the gateway's process per socket turn and per
stream (the same answer: --chunks text deltas of the mock's Responses events). The client is
this process's event loop (aiohttp), the same for both: what is compared is the gateway's CPU.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson

from ..proxies import KEY
from ..rounds import median
from ..targets import Bench

AUTH = {"Authorization": f"Bearer {KEY}"}
ENDS = (b'"type":"response.completed"', b'"type":"response.failed"', b'"type":"error"')


def _body(chunks: int) -> dict[str, Any]:
    return {"model": "grok-4", "input": "hi", "mock": {"chunks": chunks}}


async def _socket_client(http: aiohttp.ClientSession, url: str, turns: int,
                         message: str) -> int:
    done = 0
    async with http.ws_connect(url, headers=AUTH) as ws:
        for _ in range(turns):
            await ws.send_str(message)
            while True:
                msg = await ws.receive()
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    raise RuntimeError(f"the socket ended mid-turn: {msg.type}")
                data = msg.data.encode()
                if b'"type":"error"' in data:
                    raise RuntimeError(f"a turn was refused: {msg.data[:200]}")
                if any(end in data for end in ENDS):
                    break
            done += 1
    return done


async def _stream_client(http: aiohttp.ClientSession, url: str, streams: int,
                         body: dict[str, Any]) -> int:
    done = 0
    for _ in range(streams):
        async with http.post(url, json=body, headers=AUTH) as resp:
            raw = await resp.read()
            if resp.status != 200 or b"event: response.completed" not in raw:
                raise RuntimeError(f"a stream failed: {resp.status} {raw[-200:]!r}")
        done += 1
    return done


async def _run(base: str, clients: int, each: int, chunks: int, socket: bool) -> int:
    body = _body(chunks)
    async with aiohttp.ClientSession() as http:
        if socket:
            url = base.replace("http://", "ws://") + "/responses"
            message = orjson.dumps({"type": "response.create", **body}).decode()
            runs = [_socket_client(http, url, each, message) for _ in range(clients)]
        else:
            runs = [_stream_client(http, base + "/responses", each, {**body, "stream": True})
                    for _ in range(clients)]
        return sum(await asyncio.gather(*runs))


def scenario_sockets(b: Bench) -> dict[str, Any]:
    a = b.args
    t = b.gateway
    per: dict[str, list[float]] = {"socket_turn": [], "responses_stream": []}
    for _ in range(a.rounds):
        for name, socket in (("socket_turn", True), ("responses_stream", False)):
            c0 = t.cpu()
            n = asyncio.run(_run(t.base, a.socket_clients, a.socket_turns, a.chunks, socket))
            per[name].append((t.cpu() - c0) * 1000 / n)
    out: dict[str, Any] = {f"cpu_ms_per_{n}": round(median(v), 3) for n, v in per.items()}
    out["rounds"] = {n: [round(x, 3) for x in v] for n, v in per.items()}
    out["ratio_socket_turn_to_stream"] = round(
        median(per["socket_turn"]) / median(per["responses_stream"]), 2)
    out["clients"], out["each"], out["chunks"] = a.socket_clients, a.socket_turns, a.chunks
    return out
