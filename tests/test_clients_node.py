"""Real Node clients against a real gateway: openai (npm), and the AI SDK (``ai``) with
``@ai-sdk/openai`` (chat completions and the Responses API) and ``@ai-sdk/xai``.

A ``gateway serve`` process with the built-in mock upstream (``[upstream] url = "mock"``) is
started once for the module; one node process per client library (``tests/node/*.mjs``) runs
all of that library's cases and prints what its user saw as one JSON object; each test here
asserts one feature for every client. The packages come from ``tests/node/package-lock.json``
(``scripts/test`` runs ``npm ci``); without node or them the tests fail, never skip.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest

from gateway.mock.upstream import DEFAULT_TEXT

from servers import ROOT, GatewayProcess, clean_environ, free_port, running, spawn

NODE_DIR = ROOT / "tests" / "node"
KEY = "sk-test-node-client-000001"
SPENT_KEY = "sk-test-node-spent-0000001"  # one request a minute, spent before the clients run
WEATHER_ARGS = {"location": "Paris, France", "unit": "celsius"}  # as tests/node/common.mjs asks
CITIES = {"cities": ["Paris", "Lyon", "Nice"], "count": 3}
SCRIPTS = {"openai": ["openai.mjs"], "ai-sdk-openai": ["ai_sdk.mjs", "openai"],
           "ai-sdk-xai": ["ai_sdk.mjs", "xai"]}
# Each client (and API) as the tests name it: (script, the prefix of its cases).
CLIENTS = {"openai": ("openai", ""), "ai-sdk-openai-chat": ("ai-sdk-openai", "chat."),
           "ai-sdk-openai-responses": ("ai-sdk-openai", "responses."),
           "ai-sdk-xai-chat": ("ai-sdk-xai", "chat."),
           "ai-sdk-xai-responses": ("ai-sdk-xai", "responses.")}


class Expected(NamedTuple):
    """What a client's user sees, as the README's Clients table says."""

    unauthorized: str  # the class of the error shown for a 401
    rate_limited: str  # ... for a 429
    mid_stream: str  # ... for an error mid-stream ("Object": the frame's error object as parsed)
    broken_finish: str | None  # the finishReason reported after it (None: none)
    tools_finish: str  # the finishReason of a tool-call answer


AI_SDK_OPENAI = Expected("APICallError", "APICallError", "Object", "error", "tool-calls")
EXPECTED = {
    "openai": Expected("AuthenticationError", "RateLimitError", "APIError", None, "tool_calls"),
    "ai-sdk-openai-chat": AI_SDK_OPENAI,
    "ai-sdk-openai-responses": AI_SDK_OPENAI,
    # @ai-sdk/xai's chat model has no schema for an error event: the frame fails validation.
    "ai-sdk-xai-chat": Expected("APICallError", "APICallError", "TypeValidationError", "other",
                                "tool-calls"),
    "ai-sdk-xai-responses": Expected("APICallError", "APICallError", "Object", "other",
                                     "tool-calls"),
}


def node() -> str:
    path = shutil.which("node")
    if path is None:
        pytest.fail("node is not installed: scripts/test installs it (Debian's nodejs and npm)")
    if not (NODE_DIR / "node_modules" / ".package-lock.json").exists():
        pytest.fail("tests/node has no node_modules: run `npm ci` there (scripts/test does)")
    return path


@pytest.fixture(scope="module")
def seen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[str, Any]]]:
    """What each client library's user saw, per case: ``seen[script][case]``."""
    binary = node()
    config = {
        "server": {"port": free_port()},
        "upstream": {"url": "mock"},
        "limits": {"requests_per_minute": 6000, "burst": 1000, "max_concurrent_streams": 100},
        # The clients' key has a token limit, so that every stream they read ends with the
        # gateway's `: usage` comment (before [DONE]; after response.completed).
        "keys": [{"name": "node", "key": KEY, "tokens_per_minute": 100_000_000},
                 {"name": "spent", "key": SPENT_KEY, "requests_per_minute": 1, "burst": 1}],
    }
    gateway = GatewayProcess(tmp_path_factory.mktemp("node-clients"), "gateway", config)
    with running(gateway):
        spend_the_only_token(gateway.url)
        env = clean_environ(GATEWAY_BASE_URL=f"{gateway.url}/api/v1", GATEWAY_KEY=KEY,
                            GATEWAY_SPENT_KEY=SPENT_KEY)
        # The three libraries at once, each in its own process; every case is bounded by the
        # gateway's and the mock's own timeouts, and the whole run by the communicate() below.
        procs = {name: spawn([binary, *args], cwd=NODE_DIR, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE) for name, args in SCRIPTS.items()}
        results = {}
        try:
            for name, proc in procs.items():
                out, err = proc.communicate(timeout=120)
                assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{err.decode()}"
                results[name] = json.loads(out.decode().strip().splitlines()[-1])
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(5)
        yield results


def spend_the_only_token(base: str) -> None:
    request = urllib.request.Request(
        f"{base}/api/v1/chat/completions", method="POST",
        data=json.dumps({"model": "grok-4", "messages": [{"role": "user", "content": "hi"}]
                         }).encode(),
        headers={"Authorization": f"Bearer {SPENT_KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def case(seen: dict[str, dict[str, Any]], client: str, name: str) -> dict[str, Any]:
    script, prefix = CLIENTS[client]
    result = seen[script][prefix + name]
    assert isinstance(result, dict)
    return result


def shown(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every error the user was shown (class, message, status): thrown, or (AI SDK) as error
    parts of the stream."""
    errors = list(result.get("errors", []))
    if "thrown" in result:
        errors.append(result["thrown"])
    return errors


def error_messages(result: dict[str, Any]) -> list[str]:
    return [e["message"] for e in shown(result)]


ALL = list(CLIENTS)


@pytest.mark.parametrize("client", ALL)
def test_a_stream_arrives_whole_and_in_order(seen: Any, client: str) -> None:
    result = case(seen, client, "stream")
    assert error_messages(result) == []
    assert len(result["deltas"]) > 3  # streamed in pieces, not one block at the end
    assert "".join(result["deltas"]) == DEFAULT_TEXT
    assert result["finishReason"] == "stop"


@pytest.mark.parametrize("client", ALL)
def test_a_tool_call_reaches_the_user_with_its_name_and_parsed_arguments(
        seen: Any, client: str) -> None:
    result = case(seen, client, "tools")
    assert "thrown" not in result, result
    assert result["calls"] == [{"name": "get_weather", "input": WEATHER_ARGS}]
    assert result["finishReason"] == EXPECTED[client].tools_finish


@pytest.mark.parametrize("client", ALL)
@pytest.mark.parametrize("how", ["object", "streamedObject"])
def test_a_structured_object_is_parsed_against_its_schema(
        seen: Any, client: str, how: str) -> None:
    result = case(seen, client, how)
    assert "thrown" not in result, result
    assert result["object"] == CITIES
    if how == "streamedObject":  # in partial objects (AI SDK) or deltas (openai), not one block
        assert result["partials"] > 1


@pytest.mark.parametrize("client", ALL)
@pytest.mark.parametrize(("name", "status", "message"), [
    ("unauthorized", 401, "Invalid authentication token"),  # not only "Unauthorized"
    ("rateLimited", 429,  # not only "Too Many Requests"
     "Rate limit reached: this key may send 1 request in a row, then 1 a minute"),
])
def test_an_error_before_the_stream_shows_the_gateways_message_and_status(
        seen: Any, client: str, name: str, status: int, message: str) -> None:
    result = case(seen, client, name)
    assert result["deltas"] == []
    (error,) = shown(result)
    expected = EXPECTED[client]
    assert error["name"] == (expected.unauthorized if status == 401 else expected.rate_limited)
    assert error["status"] == status
    assert message in error["message"]


@pytest.mark.parametrize("client", ALL)
@pytest.mark.parametrize("fault, message", [
    ("midStreamErrorEvent", "mock mid-stream failure"),
    ("midStreamReset", "upstream connection broke mid-stream"),
])
def test_a_mid_stream_failure_is_an_error_not_a_short_answer(
        seen: Any, client: str, fault: str, message: str) -> None:
    result = case(seen, client, fault)
    assert 0 < len(result["deltas"]) < len(DEFAULT_TEXT.split(" "))  # what came before it
    messages = error_messages(result)
    assert messages, f"{client} ended a broken stream without an error: {result}"
    # @ai-sdk/xai's chat model shows the gateway's frame inside a TypeValidationError (the
    # frame is not a chunk of its schema); the message is in it all the same.
    assert [e["name"] for e in shown(result)] == [EXPECTED[client].mid_stream], result
    assert message in messages[0], messages
    assert result["finishReason"] == EXPECTED[client].broken_finish  # never "stop"


AI_SDK = [c for c in CLIENTS if c.startswith("ai-sdk-")]


@pytest.mark.parametrize("client", AI_SDK)
def test_ai_sdk_text_stream_alone_ends_quietly_and_the_error_goes_to_on_error(
        seen: Any, client: str) -> None:
    """What the README tells AI SDK users: ``textStream`` does not throw on a failed stream;
    the error reaches ``onError`` (or an ``error`` part of ``fullStream``), so read one."""
    result = case(seen, client, "midStreamTextStream")
    assert "thrown" not in result
    assert "".join(result["deltas"]) == "Ah, the meaning "
    (error,) = shown(result)
    assert error["name"] == EXPECTED[client].mid_stream
    assert "mock mid-stream failure" in error["message"]
