"""A real HTTP server that behaves like the xAI API, for the tests, the embedded default and the
load scripts. It can also misbehave on request, so every failure path can be driven for real.

It speaks xAI's dialect by default, so that tests see what production will: each tool call whole
in one chunk, the usage in the final ``include_usage`` chunk when asked for and the running
``usage`` on every chunk when not, ``completion_tokens`` without the reasoning tokens,
``reasoning_content`` from grok-3-mini, 404 for a model it does not serve (``MODELS``), and xAI's
error body ``{"code", "error": "<message>"}`` (``replies.reply_chunks`` gives the evidence).
``style: "openai"`` (per request, or ``create_mock_app(style=...)`` for the whole mock) gives
OpenAI's instead: tool arguments in fragments, usage only in the ``include_usage`` chunk, and
``{"error": {"message", "type", "param", "code"}}``. Any other ``style`` is answered 400.

Behaviour is asked for in the request body, under ``"mock"`` (the gateway forwards bodies as
they are; with the OpenAI SDK pass ``extra_body={"mock": {...}}``), each numeric option within
the bounds of ``bounds.py`` (else 400):

===================  ======================================================================
``style``            ``xai`` (the default) or ``openai``: the dialect, as above (else 400)
``chunks``           number of content chunks (default: one per word of ``text``)
``text``             the content to stream (default: a short sentence)
``chunk_bytes``      pad each chunk's content to about this many bytes (load tests)
``chunk_delay``      seconds between chunks
``headers_delay``    seconds before the response headers (a slow upstream)
``first_token_delay`` seconds after the headers before the first event (a thinking model)
``pause_after``      with ``pause``: stop for ``pause`` seconds after this many chunks
``hold_until_open``  with ``pause_after``: stop there until this many streams are open at
                     once (at most ``pause`` seconds), a barrier for concurrency tests
``status``           answer with this HTTP status and an error body (the style's shape)
``disconnect_after`` abort the connection after this many chunks
``hang_after``       send this many chunks, then nothing, forever
``no_done``          end the stream cleanly but without ``data: [DONE]``
``error_after``      send an ``{"error": {...}}`` event after this many chunks, then end
``malformed_after``  send an event whose data is not JSON after this many chunks
``inject_after``     with ``inject_hex``: after this many events, write these raw bytes (hex
                     encoded), then go on with the rest (garbage, a huge line, bad UTF-8)
``fail_first``       with ``tag``: answer ``status`` (default 503) to the first this many
                     requests carrying this ``tag``, then answer normally (retry tests)
``format``           ``oneline`` (default), ``multiline`` (xAI docs: unprefixed JSON lines),
                     ``multidata`` (every JSON line its own ``data:``), ``crlf``, ``cr``
``split``            write the body in pieces of this many bytes (awkward offsets)
``tool_calls``       with ``tools`` in the body: how many calls to make (default 1); each
                     streams whole (``openai``: arguments as ``{"``, ``location``, ...)
``tool_arguments``   the arguments object (default: generated from the tool's JSON schema)
``json``             with ``response_format``: the JSON value to stream (default: generated
                     from the ``json_schema``)
``reasoning``        stream this ``reasoning_content`` first (default for grok-3-mini)
``reasoning_silence`` seconds of silence between the reasoning and the answer
``echo_auth``        a list of places to write the request's key into (its ``Authorization``,
                     ``Bearer`` taken off), as an upstream that echoes it would: ``message``,
                     ``type``, ``code``, ``param`` (of ``status``'s error body, or of the
                     ``error_after`` event), a header name of ``status``'s answer
                     (``Retry-After``, ``retry-after-ms``, ``Location``), ``text`` (the
                     answer's, plain or streamed), or outside a stream's ``data:`` lines:
                     ``comment`` (an event of its own), ``comment_line``, ``event``, ``id``,
                     ``retry`` (lines of the first event), ``event_name`` (after each name)
``echo_slice``       with ``echo_auth``: ``[start, end]``, echo only ``key[start:end]``
``error_shape``      with ``status``: ``xai`` or ``openai``, whatever the ``style``
``error_code``       with ``status`` or ``error_after``: the error's ``code``
``error_headers``    with ``status``: more headers for that answer (``{"Retry-After": "7"}``)
``error_text_bytes`` with ``status``: a plain-text body of this many bytes instead of JSON,
                     with the request's key inserted at byte ``key_at`` (default: none)
``location``         with ``status``: a ``Location`` header (a 3xx redirect)
``failed_after``     Responses streams: this many events, then ``response.failed`` (a
                     quota or capacity failure after ``response.created``)
``answer_bytes``     a plain chat answer (JSON) of this many bytes, written 64 KiB at a time;
                     ``answer_chunked``: without ``Content-Length``. ``MockState`` counts the
                     bytes that left (``answer_bytes_sent``); a cut answer is a disconnect
===================  ======================================================================

Routes (under ``/v1`` and the root): ``chat/completions`` (streamed or not; tool calls,
structured output, reasoning, image parts for vision models), ``responses`` (the Responses API,
plain or as named events; function ``tools`` and ``text.format`` as chat's ``tools`` and
``response_format``; ``error_after`` sends its own ``event: error``), ``models``,
``models/{id}`` and ``images/generations`` (``b64_json`` or ``url``; never streams). Responses
are stored (``stored.py``: retrieved, replayed after ``starting_after``, their input items
listed, deleted, cancelled), continued by ``previous_response_id`` (404
``previous_response_not_found`` for an id the mock does not hold), and served over WebSocket
mode too (``GET responses`` upgraded: ``socket.py``).

``MockState`` (``app[MOCK_STATE]``, from ``stream.py``) records what the mock saw, for tests
to assert on. Its ``forced`` options apply to every POST, over the request's own (one of several
mocks that always fails, whatever the request asks), and a mock given a ``name``
(``create_mock_app(name=...)``, ``gateway mock-upstream --name``) says it in every answer: an
``x-mock-upstream`` header, and its default text starts with it, so a client can tell which of
several upstreams answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from . import faults
from .bounds import out_of_bounds
from .replies import (
    CREATED,
    chat_completion,
    chat_reply,
    count_chat_images,
    count_input_images,
    encode_event,
    images_result,
    reply_chunks,
    seen_words,
    sees_images,
)
from .responses import (
    response_object,
    responses_failed_event,
    responses_error_event,
    responses_events,
    responses_reply,
)
from .socket import responses_socket
from .stored import MOCK_STORE, StoredResponses
from .stored import add_routes as add_stored_routes
from .stream import MOCK_STATE, MockState, stream_events

MODELS = ("grok-4", "grok-4-1-fast-non-reasoning", "grok-3-mini", "grok-2-vision-1212",
          "grok-2-image-1212")
"""The models the mock serves (a test may add to ``MockState.models``); any other answers 404,
as xAI does."""
STYLES = ("xai", "openai")
DEFAULT_TEXT = "Ah, the meaning of life is forty-two, as everyone knows."
_ids = itertools.count(1)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise web.HTTPBadRequest(text='{"error":{"message":"invalid JSON"}}',
                                 content_type="application/json") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text='{"error":{"message":"not an object"}}',
                                 content_type="application/json")
    return body


def _style(request: web.Request, opts: dict[str, Any]) -> str:
    """The request's dialect (``_preamble`` has refused any ``style`` not in ``STYLES``)."""
    style = opts.get("style")
    return style if style in STYLES else request.app[MOCK_STATE].style


def _no_model(request: web.Request, opts: dict[str, Any], model: Any) -> web.Response:
    """The answer for a request without a model (400) or with one the mock does not serve."""
    if not isinstance(model, str):
        return faults.error(400, "model is required", _style(request, opts))
    return faults.no_model(model, _style(request, opts))


def _words(opts: dict[str, Any], name: str | None = None) -> list[str]:
    text = str(opts.get("text", DEFAULT_TEXT if name is None else f"{name}: {DEFAULT_TEXT}"))
    words = [w + " " for w in text.split(" ")]
    words[-1] = words[-1].rstrip(" ")
    n = opts.get("chunks")
    if isinstance(n, int) and n > 0:
        words = [words[i % len(words)] for i in range(n)]
    size = opts.get("chunk_bytes")
    if isinstance(size, int) and size > 0:
        words = [(w * (size // max(len(w), 1) + 1))[:size] for w in words]
    return words


async def _preamble(request: web.Request) -> tuple[dict[str, Any], dict[str, Any],
                                                   web.Response | None]:
    """Read and record the body, wait ``headers_delay``, answer ``status``: the options every
    POST route shares. Returns the body, the mock options and, when set, the answer to give."""
    state = request.app[MOCK_STATE]
    body = await _body(request)
    state.record(request, body, await request.read())  # read once: aiohttp keeps the bytes
    opts = body.get("mock") or {}
    if not isinstance(opts, dict):
        return body, {}, faults.error(400, "mock options must be an object", state.style)
    if state.forced:
        opts = {**opts, **state.forced}
    if (problem := out_of_bounds(opts)) is not None:
        return body, opts, faults.error(400, problem, state.style)
    if "style" in opts and opts["style"] not in STYLES:
        # A misspelt style ("OpenAI") would otherwise test the default dialect unnoticed.
        return body, opts, faults.error(
            400, f"mock style must be one of {', '.join(STYLES)}, not {opts['style']!r}",
            state.style)
    if opts.get("headers_delay"):
        try:
            await asyncio.sleep(float(opts["headers_delay"]))
        except asyncio.CancelledError:
            state.note_disconnect()  # the client left before we answered
            raise
    status = opts.get("status")
    if isinstance(opts.get("fail_first"), int):
        tag = str(opts.get("tag", ""))
        seen = state.tags[tag] = state.tags.get(tag, 0) + 1
        status = (status or 503) if seen <= opts["fail_first"] else None
    if status:
        return body, opts, faults.refusal(request, int(status), opts,
                                               _style(request, opts))
    return body, opts, None


async def _model_request(request: web.Request
                         ) -> tuple[dict[str, Any], dict[str, Any], str, str] | web.Response:
    """The preamble, then the model the request names: (body, options, model, style) for one
    the mock serves, else the answer that refuses it."""
    body, opts, refusal = await _preamble(request)
    if refusal is not None:
        return refusal
    model = body.get("model")
    if not isinstance(model, str) or model not in request.app[MOCK_STATE].models:
        return _no_model(request, opts, model)
    return body, opts, model, _style(request, opts)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    asked = await _model_request(request)
    if isinstance(asked, web.StreamResponse):
        return asked
    body, opts, model, style = asked
    if count_chat_images(body.get("messages")) and not sees_images(model):
        return faults.no_vision(model, style)
    if isinstance(opts.get("answer_bytes"), int) and not body.get("stream"):
        return await faults.long_answer(request, request.app[MOCK_STATE],
                                             opts["answer_bytes"], bool(opts.get("answer_chunked")))
    opts = faults.echoing_text(request, opts)
    reply = chat_reply(body, opts, _words(opts, request.app[MOCK_STATE].name))
    if not body.get("stream"):
        return web.json_response(chat_completion(model, reply, f"chatcmpl-{next(_ids)}",
                                                 style))
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    fmt = opts.get("format", "oneline")
    events = faults.echoing_events(request, opts, [
        encode_event(c, fmt) for c in reply_chunks(model, reply, include_usage, style=style)])
    if opts.get("reasoning_silence") and reply.reasoning and "pause_after" not in opts:
        opts = {**opts, "pause_after": len(reply.reasoning), "pause": opts["reasoning_silence"]}
    if opts.get("echo_auth") or opts.get("error_code"):
        return await stream_events(request, events, opts, error_event=functools.partial(
            faults.chat_leaky_error_event, faults.leaky_error(request, opts)))
    return await stream_events(request, events, opts)


async def responses(request: web.Request) -> web.StreamResponse:
    """The Responses API: a ``response`` object, or its named events."""
    asked = await _model_request(request)
    if isinstance(asked, web.StreamResponse):
        return asked
    body, opts, model, style = asked
    images = count_input_images(body.get("input"))
    if images and not sees_images(model):
        return faults.no_vision(model, style)
    if (missing := request.app[MOCK_STORE].missing_previous(body)) is not None:
        return web.json_response(missing, status=404)
    opts = faults.echoing_text(request, opts)
    final, events = responses_answer(request, body, opts, model, style, images)
    if not body.get("stream"):
        return web.json_response(final)
    if opts.get("format") in ("crlf", "cr"):
        ending = b"\r\n" if opts["format"] == "crlf" else b"\r"
        events = [e.replace(b"\n", ending) for e in events]
    events = faults.echoing_events(request, opts, events)
    error_event = responses_error_event
    if opts.get("echo_auth") or opts.get("error_code"):
        error_event = functools.partial(faults.responses_leaky_error_event,
                                        faults.leaky_error(request, opts))
    return await stream_events(request, events, opts, done=None, error_event=error_event)


def responses_answer(request: web.Request, body: dict[str, Any], opts: dict[str, Any],
                     model: str, style: str, images: int = 0
                     ) -> tuple[dict[str, Any], list[bytes]]:
    """A created response (its final object and its events, each with a new id), stored."""
    words = seen_words(images) if images and "text" not in opts \
        else _words(opts, request.app[MOCK_STATE].name)
    reply = responses_reply(body, opts, words)
    n = next(_ids)
    rid, msg_id = f"resp_mock_{n}", f"msg_mock_{n}"
    final = response_object(model, reply, rid, msg_id, request=body, style=style,
                            status="in_progress" if body.get("background") else "completed")
    events = responses_events(model, reply, rid, msg_id, style=style, request=body)
    if isinstance(opts.get("failed_after"), int):
        events = events[:opts["failed_after"]] + [responses_failed_event(
            model, reply, opts["failed_after"], request=body)]
    request.app[MOCK_STORE].keep(body, final, events)
    return final, events


async def images_generations(request: web.Request) -> web.Response:
    body, opts, refusal = await _preamble(request)
    if refusal is not None:
        return refusal
    style = _style(request, opts)
    if "model" in body and body["model"] not in request.app[MOCK_STATE].models:
        return _no_model(request, opts, body["model"])
    if body.get("stream"):
        return faults.error(400, "Image generation does not support streaming", style)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return faults.error(400, "prompt is required", style)
    n = body.get("n", 1)
    if not isinstance(n, int) or not 1 <= n <= 10:
        return faults.error(400, "n must be an integer from 1 to 10", style)
    return web.json_response(images_result(prompt, n, str(body.get("response_format", "url"))))


async def list_models(request: web.Request) -> web.Response:
    request.app[MOCK_STATE].record(request, None)
    return web.json_response({"object": "list", "data": [
        {"id": m, "object": "model", "created": CREATED, "owned_by": "xai"}
        for m in request.app[MOCK_STATE].models]})


async def get_model(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    if model not in request.app[MOCK_STATE].models:
        return faults.no_model(model, request.app[MOCK_STATE].style)
    return web.json_response({"id": model, "object": "model", "created": CREATED,
                              "owned_by": "xai"})


async def _say_name(request: web.Request, response: web.StreamResponse) -> None:
    name = request.app[MOCK_STATE].name
    if name is not None:
        response.headers["x-mock-upstream"] = name


def create_mock_app(style: str = "xai", name: str | None = None) -> web.Application:
    """The mock, speaking xAI's dialect or (``style="openai"``) OpenAI's unless a request's
    ``style`` option says otherwise; ``name`` is said in every answer."""
    if style not in STYLES:
        raise ValueError(f"mock style must be one of {STYLES}, not {style!r}")
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[MOCK_STATE] = MockState(style=style, models=MODELS, name=name)
    app[MOCK_STORE] = StoredResponses()
    app.on_response_prepare.append(_say_name)
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/chat/completions", chat_completions)
        app.router.add_get(f"{prefix}/models", list_models)
        app.router.add_get(f"{prefix}/models/{{model}}", get_model)
        app.router.add_post(f"{prefix}/responses", responses)
        app.router.add_get(f"{prefix}/responses",  # WebSocket mode
                           functools.partial(responses_socket, answer=responses_answer))
        add_stored_routes(app, prefix)
        app.router.add_post(f"{prefix}/images/generations", images_generations)
    return app


BACKLOG = 4096
"""Connections waiting to be accepted. aiohttp's default, 128, makes a gateway that opens
thousands of upstream connections at once wait for TCP's SYN retransmits (seconds each): the
mock, not the gateway, would be what a load test measures."""


@contextlib.asynccontextmanager
async def run_mock_upstream(host: str = "127.0.0.1", port: int = 0, style: str = "xai",
                            name: str | None = None
                            ) -> AsyncIterator[tuple[web.Application, str]]:
    """Serve the mock on ``host:port`` (0: a free port); yields the app and its base URL."""
    app = create_mock_app(style, name)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=BACKLOG)
    await site.start()
    bound = runner.addresses[0][1]
    try:
        yield app, f"http://{host}:{bound}/v1"
    finally:
        await runner.cleanup()
