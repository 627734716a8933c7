"""What the mock upstream says on the Responses API (``POST /v1/responses``): the ``response``
object and its named events. Pure functions, no I/O.

A request is answered as chat would answer it (``replies.chat_reply``, fed the Responses
request translated to chat terms), so both APIs decide tool calls and structured output alike:
function ``tools`` become ``function_call`` output items, a ``text.format`` of ``json_schema``
an ``output_text`` that is JSON matching the schema. Shapes and event order as in the SDK's
``openai/types/responses/`` (``response_output_item_added_event.py``,
``response_function_call_arguments_delta_event.py``, ``response_function_tool_call.py``, ...).
"""

from __future__ import annotations

import functools
from typing import Any

import orjson

from .replies import CREATED, ChatReply, chat_reply, cost_in_usd_ticks


def responses_reply(body: dict[str, Any], opts: dict[str, Any], words: list[str]) -> ChatReply:
    """What to answer: the request's function tools (flat in the Responses API, nested under
    ``function`` in chat) and ``text.format`` handed to the chat decision.

    The mock sends no reasoning on this API, for any model. xAI does: streams recorded from
    grok-4.3 and grok-code-fast-1 (vercel/ai ``packages/xai/src/responses/__fixtures__/``
    ``issue-17936-stream.chunks.txt``, ``xai-text-streaming.1.chunks.txt``) open with a
    ``reasoning`` output item and its ``response.reasoning_summary_text.delta`` events before
    the message; the mock has no such item, no summary events and no ``reasoning_tokens``."""
    tools = [{"type": "function", "function": t} for t in body.get("tools") or []
             if isinstance(t, dict) and t.get("type") == "function"]
    chat: dict[str, Any] = {"model": body.get("model"), "tools": tools,
                            "tool_choice": body.get("tool_choice")}
    fmt = _text_format(body)
    if fmt.get("type") in ("json_schema", "json_object"):
        chat["response_format"] = {"type": fmt["type"],
                                   "json_schema": {"schema": fmt.get("schema") or {}}}
    reply = chat_reply(chat, opts, words)
    reply.reasoning = []
    return reply


def _text_format(body: dict[str, Any]) -> dict[str, Any]:
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    return fmt if isinstance(fmt, dict) else {"type": "text"}


def _item_id(call: dict[str, Any]) -> str:
    return "fc_" + str(call["id"]).removeprefix("call_")


def _output(reply: ChatReply, msg_id: str, done: bool) -> list[dict[str, Any]]:
    """The output items: one ``function_call`` per tool call, or one message."""
    if not done:
        return []
    if reply.tool_calls:
        return [{"type": "function_call", "id": _item_id(c), "call_id": c["id"],
                 "name": c["name"], "arguments": "".join(c["arguments"]), "status": "completed"}
                for c in reply.tool_calls]
    return [{"type": "message", "id": msg_id, "status": "completed", "role": "assistant",
             "content": [_output_text("".join(reply.content))]}]


def response_object(model: str, reply: ChatReply, rid: str = "resp_mock",
                    msg_id: str = "msg_mock", *, status: str = "completed",
                    request: dict[str, Any] | None = None, style: str = "xai"
                    ) -> dict[str, Any]:
    """A Responses API ``response`` object; ``in_progress`` ones have no output and no usage.
    ``tools``, ``tool_choice`` and ``text`` echo the request's, as the API does."""
    done = status == "completed"
    request = request or {}
    tools = request.get("tools")
    return {"id": rid, "object": "response", "created_at": CREATED, "status": status,
            "completed_at": CREATED + 1 if done else None,
            "model": model, "output": _output(reply, msg_id, done), "error": None,
            "incomplete_details": None, "instructions": None, "metadata": {},
            "parallel_tool_calls": True, "temperature": None, "top_p": None,
            "tool_choice": request.get("tool_choice") or "auto",
            "tools": tools if isinstance(tools, list) else [],
            "text": {"format": _text_format(request)},
            "usage": _usage(reply, style) if done else None}


def _usage(reply: ChatReply, style: str) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "input_tokens": 12, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": reply.tokens, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 12 + reply.tokens}
    if style == "xai":
        usage["cost_in_usd_ticks"] = cost_in_usd_ticks(12, reply.tokens)
    return usage


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


@functools.lru_cache(maxsize=256)
def named_event(name: str, obj_json: bytes) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + obj_json + b"\n\n"


def responses_events(model: str, reply: ChatReply, rid: str = "resp_mock",
                     msg_id: str = "msg_mock", *, style: str = "xai",
                     request: dict[str, Any] | None = None) -> list[bytes]:
    """The named events of one streamed answer, numbered from 0 as OpenAI numbers them. A
    function call's arguments come in one delta (``style="xai"``: xAI sends calls whole) or
    in fragments (``"openai"``)."""
    seq = iter(range(1 << 30))

    def event(name: str, **fields: Any) -> bytes:
        return named_event(name, orjson.dumps({"type": name, **fields,
                                               "sequence_number": next(seq)}))

    pending = response_object(model, reply, rid, msg_id, status="in_progress", request=request)
    final = response_object(model, reply, rid, msg_id, request=request, style=style)
    out = [event("response.created", response=pending),
           event("response.in_progress", response=pending)]
    for index, call in enumerate(reply.tool_calls):
        item = final["output"][index]
        where = {"item_id": item["id"], "output_index": index}
        out.append(event("response.output_item.added", output_index=index,
                         item={**item, "arguments": "", "status": "in_progress"}))
        deltas = [item["arguments"]] if style == "xai" else call["arguments"]
        out += [event("response.function_call_arguments.delta", **where, delta=d)
                for d in deltas]
        out += [event("response.function_call_arguments.done", **where,
                      arguments=item["arguments"]),
                event("response.output_item.done", output_index=index, item=item)]
    if not reply.tool_calls:
        text = "".join(reply.content)
        where = {"item_id": msg_id, "output_index": 0, "content_index": 0}
        out += [event("response.output_item.added", output_index=0,
                      item={"type": "message", "id": msg_id, "status": "in_progress",
                            "role": "assistant", "content": []}),
                event("response.content_part.added", **where, part=_output_text(""))]
        out += [event("response.output_text.delta", **where, delta=w, logprobs=[])
                for w in reply.content]
        out += [event("response.output_text.done", **where, text=text, logprobs=[]),
                event("response.content_part.done", **where, part=_output_text(text)),
                event("response.output_item.done", output_index=0, item=final["output"][0])]
    out.append(event("response.completed", response=final))
    return out


def responses_error_event(sequence_number: int) -> bytes:
    """The Responses API's mid-stream error: the documented flat fields, and the nested
    ``error`` object the service sends (and the SDK raises ``APIError`` on)."""
    err = {"type": "server_error", "code": "mock_failure", "message": "mock mid-stream failure",
           "param": None}
    return named_event("error", orjson.dumps({
        "type": "error", "code": err["code"], "message": err["message"], "param": None,
        "error": err, "sequence_number": sequence_number}))


def responses_failed_event(model: str, reply: ChatReply, sequence_number: int, *,
                           request: dict[str, Any] | None = None) -> bytes:
    """``response.failed``: the terminal event of a response the service could not make (a
    quota or capacity failure after ``response.created``), its ``error`` inside ``response``."""
    failed = response_object(model, reply, status="failed", request=request)
    failed["error"] = {"code": "server_error", "message": "mock failure after response.created"}
    return named_event("response.failed", orjson.dumps({
        "type": "response.failed", "response": failed, "sequence_number": sequence_number}))
