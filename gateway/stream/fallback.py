"""Vision requests that ask to stream get the complete answer instead (docs/vision-fallback.md).

The upstream is called without streaming, and the answer carries ``X-Stream-Fallback: true``
in the form ``[vision] stream_fallback`` names:

- ``"sse"``: the same event stream a client would otherwise read, complete in one go. For chat
  completions, one ``chat.completion.chunk`` carrying the whole message, finish reason and usage,
  then ``data: [DONE]``. For the Responses API, the minimal named-event sequence of a streamed
  response (``response.created`` ... one ``response.output_text.delta`` per text part with all
  of its text ... ``response.completed``), numbered from 0.
- ``"json"``: the upstream's plain JSON body (``chat.completion`` or ``response``).

(``"off"`` never gets here: the handlers relay such streams like any other.)
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from ..appkeys import PROXY, SETTINGS
from ..errors import UpstreamProtocolError
from ..records import Recorder, created_id
from ..request_info import REQUEST_INFO
from ..upstream.http1 import UpstreamResponse
from .answers import json_answer, sse_answer
from .dialect import usage_of
from .render import Rewrite

FALLBACK_HEADERS = {"X-Stream-Fallback": "true"}
_DONE = b"data: [DONE]\n\n"


def chat(request: web.Request, body: dict[str, Any], rewrite: Rewrite | None,
         recorder: Recorder | None = None) -> Awaitable[web.Response]:
    """A chat completion (or ``vision/analyze``) asked to stream, answered whole."""
    return _whole(request, _plain_call(request, "chat/completions", body), rewrite, _chat_events)


def responses(request: web.Request, body: dict[str, Any], rewrite: Rewrite | None,
              recorder: Recorder | None = None) -> Awaitable[web.Response]:
    """A Responses API request asked to stream, answered whole (the response it creates
    recorded first, with a ``recorder``)."""
    return _whole(request, _plain_call(request, "responses", body), rewrite, response_events,
                  recorder)


async def _whole(request: web.Request, call: Awaitable[UpstreamResponse],
                 rewrite: Rewrite | None, events: Callable[[dict[str, Any]], list[bytes]],
                 recorder: Recorder | None = None) -> web.Response:
    """The answer, whole: as JSON (``[vision] stream_fallback = "json"``), or as the API's
    ``events`` of it."""
    answer = await _fetch(request, call, rewrite)
    if recorder is not None:
        await recorder(created_id(answer))
    info = request[REQUEST_INFO]
    if request.app[SETTINGS].vision.stream_fallback == "json":
        return json_answer(info, answer, FALLBACK_HEADERS)
    return sse_answer(info, events(answer), FALLBACK_HEADERS)


def _chat_events(completion: dict[str, Any]) -> list[bytes]:
    """A completion as a stream: one chunk that holds it all, then ``[DONE]``."""
    return [b"data: " + orjson.dumps(completion_chunk(completion)) + b"\n\n", _DONE]


def _plain_call(request: web.Request, path: str, body: dict[str, Any]
                ) -> Awaitable[UpstreamResponse]:
    """The same request without streaming, serialized now (the parsed body is not kept)."""
    plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    return request.app[PROXY].post(request, path, plain)


async def _fetch(request: web.Request, call: Awaitable[UpstreamResponse],
                 rewrite: Rewrite | None) -> dict[str, Any]:
    answer = await request.app[PROXY].plain.fetch_json(call)
    if not isinstance(answer, dict):
        raise UpstreamProtocolError("The upstream answered with something other than an object")
    if rewrite is not None:
        rewrite(answer)
    info = request[REQUEST_INFO]
    info.usage = usage_of(answer) or info.usage
    return answer


def completion_chunk(completion: dict[str, Any]) -> dict[str, Any]:
    """A ``chat.completion`` as the one ``chat.completion.chunk`` that says all of it."""
    choices = []
    for choice in completion.get("choices") or []:
        message = choice.get("message") or {}
        delta = {k: v for k, v in message.items() if v is not None}
        if isinstance(delta.get("tool_calls"), list):
            # Deltas number their tool calls; whole messages do not.
            delta["tool_calls"] = [{"index": i, **call} if isinstance(call, dict) else call
                                   for i, call in enumerate(delta["tool_calls"])]
        choices.append({"index": choice.get("index", 0), "delta": delta,
                        "logprobs": choice.get("logprobs"),
                        "finish_reason": choice.get("finish_reason")})
    chunk: dict[str, Any] = {"id": completion.get("id"), "object": "chat.completion.chunk",
                             "created": completion.get("created"),
                             "model": completion.get("model")}
    if completion.get("system_fingerprint") is not None:
        chunk["system_fingerprint"] = completion["system_fingerprint"]
    chunk["choices"] = choices
    if completion.get("usage") is not None:
        chunk["usage"] = completion["usage"]
    return chunk


def response_events(response: dict[str, Any]) -> list[bytes]:
    """The named events a streamed ``response`` would have sent, with each text whole."""
    seq = itertools.count()

    def event(name: str, **fields: Any) -> bytes:
        data = orjson.dumps({"type": name, **fields, "sequence_number": next(seq)})
        return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"

    started = {**response, "status": "in_progress", "output": [], "usage": None}
    if "completed_at" in started:
        started["completed_at"] = None
    out = [event("response.created", response=started),
           event("response.in_progress", response=started)]
    for index, item in enumerate(response.get("output") or []):
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            out.append(event("response.output_item.added", output_index=index,
                             item={**item, "status": "in_progress", "content": []}))
            out += _content_events(event, index, item)
        else:  # reasoning, function calls, ...: added and done, whole
            out.append(event("response.output_item.added", output_index=index, item=item))
        out.append(event("response.output_item.done", output_index=index, item=item))
    out.append(event("response.completed", response=response))
    return out


def _content_events(event: Callable[..., bytes], index: int, item: dict[str, Any]
                    ) -> list[bytes]:
    out = []
    for part_index, part in enumerate(item.get("content") or []):
        if not isinstance(part, dict):
            continue
        where = {"item_id": item.get("id", ""), "output_index": index,
                 "content_index": part_index}
        if part.get("type") == "output_text":
            text = str(part.get("text", ""))
            out += [event("response.content_part.added", **where,
                          part={**part, "text": "", "annotations": []}),
                    event("response.output_text.delta", **where, delta=text, logprobs=[]),
                    event("response.output_text.done", **where, text=text, logprobs=[])]
        elif part.get("type") == "refusal":
            text = str(part.get("refusal", ""))
            out += [event("response.content_part.added", **where, part={**part, "refusal": ""}),
                    event("response.refusal.delta", **where, delta=text),
                    event("response.refusal.done", **where, refusal=text)]
        else:
            out.append(event("response.content_part.added", **where, part=part))
        out.append(event("response.content_part.done", **where, part=part))
    return out
