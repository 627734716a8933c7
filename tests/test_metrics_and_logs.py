"""What the gateway tells its operator: /metrics (Prometheus text), /healthz and /readyz, and one
JSON access-log line per request."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.metrics import Metrics
from gateway.request_info import RequestInfo

from clients import chat_body, scrape, value
from conftest import KEY, Upstream, settings_for
from processes import ThreadedMockUpstream
from servers import GatewayProcess, free_port, running

TINY_KEY = "sk-test-tiny-0000000000003"
SOLO_KEY = "sk-test-solo-0000000000004"
KEYS = [{"name": "alice", "key": KEY},
        {"name": "tiny", "key": TINY_KEY, "burst": 1, "requests_per_minute": 1},
        {"name": "solo", "key": SOLO_KEY, "max_concurrent_streams": 1}]


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def access_log() -> Iterator[io.StringIO]:
    """The gateway.access lines of this test, as written."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("gateway.access")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


async def test_metrics_and_access_log_record_every_kind_of_request(
        mock_upstream: Upstream, start_gateway: Any, access_log: io.StringIO) -> None:
    _, base = await start_gateway(settings_for(mock_upstream.url, keys=KEYS,
                                               stream={"keepalive_seconds": 0.2}))
    url = f"{base}/v1/chat/completions"
    async with aiohttp.ClientSession() as s:
        async def post(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, bytes]:
            async with s.post(url, json=body, headers=headers) as r:
                return r.status, await r.read()

        body = chat_body(stream=True, chunks=5)
        body["stream_options"] = {"include_usage": True}
        status, first_raw = await post(body, {**auth(), "X-Request-ID": "stream-1"})
        assert status == 200 and first_raw.endswith(b"data: [DONE]\n\n")
        assert (await post(chat_body(stream=False, chunks=3), auth()))[0] == 200
        assert (await post(chat_body(stream=True), auth("sk-wrong-key-0000000000")))[0] == 401
        assert [(await post(chat_body(stream=False), auth(TINY_KEY)))[0]
                for _ in range(2)] == [200, 429]
        assert (await post(chat_body(stream=False, status=500), auth()))[0] == 500
        status, raw = await post(chat_body(stream=True, error_after=1), auth())
        assert status == 200 and b"mock_failure" in raw

        # solo holds its one stream slot; a second stream is refused by the concurrency cap.
        held = await s.post(url, json=chat_body(stream=True, hang_after=1),
                            headers=auth(SOLO_KEY))
        await held.content.readuntil(b"\n\n")
        during = await scrape(base)
        assert (await post(chat_body(stream=True), auth(SOLO_KEY)))[0] == 429
        held.close()  # and its client leaves
        await asyncio.sleep(0)
    for _ in range(100):
        if any(line["outcome"] == "client_disconnect" for line in lines(access_log)):
            break
        await asyncio.sleep(0.02)
    after = await scrape(base)

    route = "/v1/chat/completions"
    assert value(during, "gateway_open_streams") == 1
    assert value(after, "gateway_open_streams") == 0
    assert value(after, "gateway_requests_total", route=route, status="200", key="alice") == 3
    assert value(after, "gateway_requests_total", route=route, status="401", key="-") == 1
    assert value(after, "gateway_requests_total", route=route, status="429", key="tiny") == 1
    assert value(after, "gateway_requests_total", route=route, status="500", key="alice") == 1
    assert value(after, "gateway_ratelimit_refusals_total", key="tiny", limit="requests") == 1
    assert value(after, "gateway_ratelimit_refusals_total", key="solo",
                 limit="concurrency") == 1
    assert value(after, "gateway_upstream_errors_total", kind="status") == 1
    assert value(after, "gateway_upstream_errors_total", kind="error") == 1
    assert value(after, "gateway_client_disconnects_total", route=route) == 1
    # Tokens from the stream's usage chunk (5 words) and the plain answer's usage (3 words).
    # The failed stream carried none: the gateway asks every chat stream for its usage, so
    # the upstream sends it in the final chunk only, which a failed stream never reaches.
    assert value(after, "gateway_tokens_total", key="alice", model="grok-4",
                 type="prompt") == 24
    assert value(after, "gateway_tokens_total", key="alice", model="grok-4",
                 type="completion") == 8
    assert value(after, "gateway_time_to_first_byte_seconds_count", route=route) >= 4
    assert value(after, "gateway_stream_duration_seconds_count", route=route) == 3
    assert value(after, "gateway_relayed_chunks_total", route=route) >= 8
    assert value(after, "gateway_relayed_bytes_total", route=route) > 1000
    assert value(after, "gateway_limiter_backend", state="memory") == 1
    assert value(after, "gateway_limiter_backend", state="redis") == 0

    log = {line["request_id"]: line for line in lines(access_log)}
    first = log["stream-1"]
    assert first["key"] == "alice" and first["route"] == route and first["model"] == "grok-4"
    assert (first["status"], first["stream"], first["outcome"]) == (200, True, "completed")
    # 5 content chunks, the finish_reason chunk, the usage chunk and [DONE]; every byte.
    assert (first["chunks"], first["bytes"]) == (8, len(first_raw))
    assert first["usage"]["completion_tokens"] == 5 and first["ttfb_ms"] is not None
    assert first["duration_ms"] >= first["ttfb_ms"] and first["error"] is None
    assert set(first) >= {"time", "pid", "request_id", "key", "route", "client_ip", "model",
                          "status", "stream", "ttfb_ms", "duration_ms", "chunks", "bytes",
                          "usage", "outcome", "error"}
    by_outcome = sorted((line["outcome"], line["error"]) for line in log.values()
                        if line["outcome"] != "completed")
    assert by_outcome == [("client_disconnect", None), ("error", "invalid_api_key"),
                          ("refused", "concurrency_limit_exceeded"),
                          ("refused", "rate_limit_exceeded"),
                          ("upstream_error", "mock_failure"),
                          ("upstream_error", "upstream_http_500")]
    text = access_log.getvalue()
    for secret in (KEY, TINY_KEY, SOLO_KEY, "xai-operator-secret-key"):
        assert secret not in text  # key names only, never keys


async def test_a_responses_stream_logs_and_counts_the_usage_of_its_completed_event(
        mock_upstream: Upstream, start_gateway: Any, access_log: io.StringIO) -> None:
    _, base = await start_gateway(settings_for(mock_upstream.url))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/v1/responses", headers=auth(), json={
                "model": "grok-4", "input": "hi", "stream": True,
                "mock": {"text": "one two three four"}}) as r:
            raw = await r.read()
    assert r.status == 200 and b"response.completed" in raw
    [line] = [line for line in lines(access_log) if line["route"] == "/v1/responses"]
    assert line["outcome"] == "completed" and line["usage"]["output_tokens"] == 4
    samples = await scrape(base)
    assert value(samples, "gateway_tokens_total", key="alice", model="grok-4",
                 type="completion") == 4
    assert value(samples, "gateway_tokens_total", key="alice", model="grok-4",
                 type="prompt") == line["usage"]["input_tokens"] > 0


# Usage objects as upstreams send them: xAI's chat completions leave reasoning out of
# completion_tokens, its Responses API and OpenAI count it in (the first two recorded from xAI
# in vercel/ai: packages/xai/src/__fixtures__/xai-text.chunks.txt and
# packages/xai/src/responses/__fixtures__/issue-17936-stream.chunks.txt).
@pytest.mark.parametrize(("usage", "completion", "reasoning"), [
    ({"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 303,
      "completion_tokens_details": {"reasoning_tokens": 290}}, 291, 290),
    ({"input_tokens": 197, "output_tokens": 199, "total_tokens": 396,
      "output_tokens_details": {"reasoning_tokens": 198}}, 199, 198),
    ({"prompt_tokens": 12, "completion_tokens": 291, "total_tokens": 303,
      "completion_tokens_details": {"reasoning_tokens": 290}}, 291, 290),
    ({"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}, 5, 0),
])
def test_completion_tokens_are_every_output_token_however_the_upstream_counts_reasoning(
        usage: dict[str, Any], completion: int, reasoning: int) -> None:
    metrics = Metrics()
    metrics.observe(RequestInfo("r", "/v1/chat/completions", "127.0.0.1", status=200,
                                model="grok-3-mini", usage=usage))

    def count(kind: str) -> float | None:
        return metrics.registry.get_sample_value(
            "gateway_tokens_total", {"key": "-", "model": "grok-3-mini", "type": kind})

    assert count("completion") == completion
    assert count("reasoning") == (reasoning or None)


async def test_access_log_off(mock_upstream: Upstream, start_gateway: Any,
                              access_log: io.StringIO) -> None:
    _, base = await start_gateway(settings_for(mock_upstream.url,
                                               server={"access_log": False}))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/v1/chat/completions", json=chat_body(stream=True),
                          headers=auth()) as r:
            assert r.status == 200
    assert access_log.getvalue() == ""
    samples = await scrape(base)  # metrics are still kept
    assert value(samples, "gateway_requests_total", route="/v1/chat/completions",
                 status="200", key="alice") == 1


async def _get(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:  # no client key: public paths
            return r.status, await r.json()


async def test_readyz_checks_the_upstream_and_caches_the_answer(
        mock_upstream: Upstream, start_gateway: Any) -> None:
    _, base = await start_gateway(settings_for(mock_upstream.url))
    assert await _get(f"{base}/readyz") == (200, {"status": "ready", "checks": {
        "redis": "not configured", "upstream": "ok"}})
    probes = [r for r in mock_upstream.state.requests if r["path"].endswith("/models")]
    assert len(probes) == 1
    for _ in range(5):
        assert (await _get(f"{base}/readyz"))[0] == 200
    assert len([r for r in mock_upstream.state.requests if r["path"].endswith("/models")]) == 1

    _, down = await start_gateway(settings_for(f"http://127.0.0.1:{free_port()}/v1"))
    assert await _get(f"{down}/readyz") == (503, {"status": "not ready", "checks": {
        "redis": "not configured", "upstream": "upstream_unreachable"}})
    assert await _get(f"{down}/healthz") == (200, {"status": "ok"})


async def test_readyz_checks_redis(mock_upstream: Upstream, start_gateway: Any,
                                   redis_url: str, redis_prefix: str) -> None:
    _, base = await start_gateway(settings_for(
        mock_upstream.url, redis={"url": redis_url, "key_prefix": redis_prefix}))
    assert await _get(f"{base}/readyz") == (200, {"status": "ready", "checks": {
        "redis": "ok", "upstream": "ok"}})
    _, down = await start_gateway(settings_for(
        mock_upstream.url, redis={"url": f"redis://127.0.0.1:{free_port()}/0",
                                  "timeout_seconds": 0.2}))
    status, body = await _get(f"{down}/readyz")
    assert (status, body["checks"]["redis"]) == (503, "unreachable (rate limits: fallback)")
    samples = await scrape(down)
    assert value(samples, "gateway_limiter_backend", state="fallback") == 1


def test_serve_writes_bare_json_access_lines_to_stdout(mock_upstream_url: str,
                                                       tmp_path: Path) -> None:
    upstream = {"url": mock_upstream_url, "api_key": "xai-operator-secret-key"}
    on = GatewayProcess(tmp_path, "on", {"server": {"port": free_port()},
                                         "upstream": upstream,
                                         "keys": [{"name": "alice", "key": KEY}]})
    off = GatewayProcess(tmp_path, "off", {"server": {"port": free_port(), "access_log": False},
                                           "upstream": upstream,
                                           "keys": [{"name": "alice", "key": KEY}]})
    with running(on, off):
        for g in (on, off):
            request = urllib.request.Request(f"{g.url}/v1/models", headers=auth())
            with urllib.request.urlopen(request, timeout=5) as r:
                assert r.status == 200
    # Every stdout line is one JSON object (json.loads of each line), diagnostics are on stderr.
    (line,) = on.access_lines()
    assert (line["route"], line["key"], line["status"]) == ("/v1/models", "alice", 200)
    assert "listening on" in on.stderr() and "listening on" not in on.stdout_path.read_text()
    assert off.stdout_path.read_text() == ""


@pytest.fixture
def mock_upstream_url() -> Iterator[str]:
    with ThreadedMockUpstream() as upstream:
        yield upstream.url


async def test_the_event_loops_lateness_is_measured(gateway: Any) -> None:
    """A worker whose loop is held up (here: blocked for 0.4 s) shows it in
    ``gateway_event_loop_lag_seconds``: how long every stream's next event waited."""
    _, base = gateway
    await asyncio.sleep(0.3)  # a sample or so of an idle loop
    time.sleep(0.4)  # the loop, which the gateway shares with this test, is held up
    await asyncio.sleep(0.3)
    samples = await scrape(base)
    count = value(samples, "gateway_event_loop_lag_seconds_count")
    late = count - value(samples, "gateway_event_loop_lag_seconds_bucket", le="0.1")
    assert count >= 2 and late >= 1


async def metrics_from(base: str, address: str) -> tuple[int, bytes]:
    """``GET /metrics`` from a client socket bound to ``address`` (any of 127.0.0.0/8 reaches
    the gateway on 127.0.0.1)."""
    connector = aiohttp.TCPConnector(local_addr=(address, 0))
    async with aiohttp.ClientSession(connector=connector) as s, s.get(f"{base}/metrics") as r:
        return r.status, await r.read()


async def test_metrics_answer_only_the_addresses_allowed(
        mock_upstream: Upstream, start_gateway: Any) -> None:
    """Key names and per-key usage: by default for this host's own addresses (127.0.0.1 and
    ::1, not all of 127.0.0.0/8), 403 in the error shape for any other."""
    _, base = await start_gateway(settings_for(mock_upstream.url))
    assert (await metrics_from(base, "127.0.0.1"))[0] == 200
    status, raw = await metrics_from(base, "127.0.0.2")
    assert status == 403
    assert json.loads(raw)["error"]["code"] == "metrics_not_allowed" and b"alice" not in raw
    _, wider = await start_gateway(settings_for(
        mock_upstream.url, server={"metrics_allow": ["127.0.0.0/8"]}))
    status, raw = await metrics_from(wider, "127.0.0.2")
    assert status == 200 and b"gateway_requests_total" in raw
