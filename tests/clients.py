"""The clients the API tests drive the gateway with: the OpenAI SDK (sync and async) and raw
aiohttp, for exact bytes and headers; and what every test builds or reads with them:
``chat_body(stream=..., **mock)`` (a chat request body, ``stream`` always said), ``same_but_ids``
(Responses answers compared without their ids), ``mock_events``
(what the mock upstream streams for a text), ``sse_events`` / ``blocks`` (an SSE body cut into
events), ``scrape`` / ``value`` (``/metrics``, parsed).

The servers run in the test's event loop, so a sync ``OpenAI`` client must run in a thread
(``asyncio.to_thread``); ``AsyncOpenAI`` runs in the loop itself.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import aiohttp
import orjson
from openai import AsyncOpenAI, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from gateway.mock.replies import chat_chunks

from conftest import KEY

AUTH = {"Authorization": f"Bearer {KEY}"}
HI = [{"role": "user", "content": "hi"}]
USER = [{"role": "user", "content": "What is the meaning of life?"}]
IMAGE_URL = "https://example.com/cat.png"
T = TypeVar("T")


def chat_body(*, stream: bool | None, messages: list[dict[str, Any]] = HI,
              model: str = "grok-4", fields: Mapping[str, Any] | None = None,
              **mock: Any) -> dict[str, Any]:
    """A chat-completions request body, in this order: ``model``, ``messages`` (a copy: a test
    may change its body), ``stream`` (left out when ``stream`` is None, as by a client that
    never names it), ``fields`` (other top-level parameters: ``tools``, ...), and the mock
    upstream's options under ``"mock"`` when any are given."""
    body: dict[str, Any] = {"model": model, "messages": copy.deepcopy(messages)}
    if stream is not None:
        body["stream"] = stream
    if fields:
        body.update(fields)
    if mock:
        body["mock"] = mock
    return body


def mock_events(text: str, model: str = "grok-4") -> list[bytes]:
    """The events a client that did not ask for usage gets through the gateway for a reply of
    ``text`` when nothing goes wrong: one word a chunk, in the mock's default xAI style, as
    streamed for the ``include_usage`` the gateway asks on every stream, its usage chunk
    dropped, ``[DONE]`` last."""
    words = text.split(" ")
    words = [w + " " for w in words[:-1]] + [words[-1]]
    return chat_chunks(model, words, True)[:-1] + [b"data: [DONE]\n\n"]


def async_sdk(base: str, key: str = KEY) -> AsyncOpenAI:
    return AsyncOpenAI(api_key=key, base_url=f"{base}/api/v1", max_retries=0)


def sync_sdk(base: str, key: str = KEY) -> OpenAI:
    return OpenAI(api_key=key, base_url=f"{base}/api/v1", max_retries=0)


async def in_thread(base: str, use: Callable[[OpenAI], T], key: str = KEY) -> T:
    """Run ``use(client)`` with a sync client, in a thread, closing the client after."""
    def run() -> T:
        with sync_sdk(base, key) as client:
            return use(client)

    return await asyncio.to_thread(run)


class Raw:
    """One raw HTTP exchange: status, headers, body bytes."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return orjson.loads(self.body)

    def error(self) -> dict[str, Any]:
        err = self.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        return err  # type: ignore[no-any-return]

    def events(self) -> list[bytes]:
        return sse_events(self.body)

    def data(self) -> list[Any]:
        """The parsed JSON of each ``data:`` line, read line by line (as a simple client does);
        ``[DONE]`` stays a string."""
        out: list[Any] = []
        for line in self.body.split(b"\n"):
            if line.startswith(b"data: "):
                payload = line[6:]
                out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
        return out


async def post(url: str, body: Any = None, *, data: bytes | None = None,
               headers: dict[str, str] | None = None) -> Raw:
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=body if data is None else None, data=data,
                          headers={**AUTH, **(headers or {})}) as r:
            return Raw(r.status, dict(r.headers), await r.read())


async def get(url: str, key: str = KEY) -> Raw:
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers={"Authorization": f"Bearer {key}"}) as r:
            return Raw(r.status, dict(r.headers), await r.read())


_MOCK_IDS = re.compile(rb"\b(resp|msg)_mock_\d+\b")


def same_but_ids(body: bytes) -> bytes:
    """A body with the mock's response and message ids (new for each response it makes) put
    the same, to compare two answers byte for byte otherwise."""
    return _MOCK_IDS.sub(rb"\1_mock_N", body)


def data_url(size: int, media: str = "image/png") -> str:
    """A data: URL whose image decodes to exactly ``size`` bytes."""
    return f"data:{media};base64," + base64.b64encode(b"\x89" * size).decode()


def image_message(url: str = IMAGE_URL, text: str = "What is in this picture?",
                  detail: str | None = None) -> list[dict[str, Any]]:
    image: dict[str, Any] = {"url": url}
    if detail is not None:
        image["detail"] = detail
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": image}]}]


def sse_events(raw: bytes) -> list[bytes]:
    """The events of an SSE body, each ending in its blank line, comment lines (the gateway's
    ``: keep-alive`` pings) left out."""
    out = []
    for block in raw.split(b"\n\n"):
        lines = [line for line in block.split(b"\n") if line and not line.startswith(b":")]
        if lines:
            out.append(b"\n".join(lines) + b"\n\n")
    return out


def asking_usage(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` as the gateway sends a chat stream on: asking for its usage."""
    return {**body, "stream_options": {**(body.get("stream_options") or {}),
                                       "include_usage": True}}


def without_usage_chunk(raw: bytes) -> bytes:
    """An upstream's chat stream as a client that did not ask for usage gets it through the
    gateway: every event as it came but the usage chunk (``choices: []``), which the gateway
    asked for."""
    kept = []
    for event in blocks(raw):
        data = event[len(b"data: "):].strip() if event.startswith(b"data: ") else b""
        if data[:1] == b"{" and orjson.loads(data).get("choices") == []:
            continue
        kept.append(event)
    return b"".join(kept)


async def as_relayed(upstream_url: str, body: dict[str, Any]) -> bytes:
    """What the gateway relays to a client that sends ``body`` (a chat stream that does not
    ask for usage), taken from the upstream itself."""
    return without_usage_chunk((await post(f"{upstream_url}/chat/completions",
                                           asking_usage(body))).body)


def blocks(raw: bytes) -> list[bytes]:
    """An SSE body cut at each blank line, each block with its blank line, comments kept."""
    return [e + b"\n\n" for e in raw.split(b"\n\n") if e]


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(base: str) -> Samples:
    """``GET /metrics`` (no client key: a public path), parsed: one value per name and labels."""
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=")
            text = await r.text()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)
