"""What the mock upstream says: chat replies (text, tool calls, structured output, reasoning)
and their chunks, and generated images. Pure functions, no I/O. (The Responses API's objects
and events, built from the same ``ChatReply``, are ``responses.py``'s.)

The shapes follow the xAI / OpenAI references closely enough that the OpenAI SDK parses them:
chat chunks as in https://docs.x.ai/docs/guides/streaming-response, in xAI's style by default
or OpenAI's on request (``reply_chunks`` says how they differ).
"""

from __future__ import annotations

import fnmatch
import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

CREATED = 1700000000
TICKS_PER_TOKEN = {"input": 2_000, "output": 5_000}
"""What the mock charges in xAI's ``cost_in_usd_ticks`` (10^-10 USD): $0.20 per million prompt
tokens, $0.50 per million output tokens, reasoning included."""


def cost_in_usd_ticks(prompt: int, output: int) -> int:
    return prompt * TICKS_PER_TOKEN["input"] + output * TICKS_PER_TOKEN["output"]


REASONING_MODELS = ("grok-3-mini*",)
"""Models that stream ``reasoning_content`` before their answer. xAI: "In Chat Completions,
only grok-3-mini returns message.reasoning_content" (https://docs.x.ai/docs/guides/reasoning);
among the models the mock serves (``upstream.MODELS``), only grok-3-mini streams it."""
VISION_MODELS = ("grok-4*", "*vision*")
"""Models the mock accepts image parts for; others answer 400, as xAI does."""
DEFAULT_REASONING = "The user asks a question. Let me think it through step by step."
# The smallest valid PNG: one transparent pixel.
PNG_1PX_B64 = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA"
               "60e6kgAAAABJRU5ErkJggg==")


def _matches(model: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(model, p) for p in patterns)


def is_reasoning_model(model: str) -> bool:
    return _matches(model, REASONING_MODELS)


def sees_images(model: str) -> bool:
    return _matches(model, VISION_MODELS)


@dataclass
class ChatReply:
    """One assistant turn, as fragments in the order they stream."""

    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    """``{"id", "name", "arguments": [fragments]}`` each."""

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_calls else "stop"

    @property
    def answer_tokens(self) -> int:
        """Tokens of the answer itself: one per content or tool-argument fragment."""
        return len(self.content) + sum(len(c["arguments"]) for c in self.tool_calls)

    @property
    def tokens(self) -> int:
        """Every output token: the answer's and one per reasoning fragment."""
        return self.answer_tokens + len(self.reasoning)

    def usage(self, style: str = "xai", spent: tuple[int, int] | None = None
              ) -> dict[str, Any]:
        """The usage object; with ``spent`` (reasoning, answer), the running count after that
        many tokens of each.

        The dialects count reasoning differently. xAI leaves it out of ``completion_tokens``:
        prompt + completion + reasoning = total, as every grok-3-mini stream recorded in
        vercel/ai's ``packages/xai/src/__fixtures__`` adds up (``xai-text.chunks.txt``:
        12 + 1 + 290 = 303). OpenAI counts it within ``completion_tokens``
        (``completion_tokens_details.reasoning_tokens`` is a part of it)."""
        reasoning, answer = (len(self.reasoning), self.answer_tokens) if spent is None else spent
        completion = answer if style == "xai" else answer + reasoning
        usage: dict[str, Any] = {"prompt_tokens": 12, "completion_tokens": completion,
                                 "total_tokens": 12 + answer + reasoning}
        if self.reasoning:
            usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
        if style == "xai":  # xAI's exact charge, on chat completions and Responses alike
            usage["cost_in_usd_ticks"] = cost_in_usd_ticks(12, answer + reasoning)
        return usage

    def message(self) -> dict[str, Any]:
        """The whole turn as a non-streamed ``message``."""
        message: dict[str, Any] = {"role": "assistant",
                                   "content": "".join(self.content) if not self.tool_calls
                                   else None}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c["id"], "type": "function",
                 "function": {"name": c["name"], "arguments": "".join(c["arguments"])}}
                for c in self.tool_calls]
        return message


def chat_reply(body: dict[str, Any], opts: dict[str, Any], words: list[str]) -> ChatReply:
    """Decide what the mock answers to a chat request: tool calls when tools are offered (and
    not refused with ``tool_choice: "none"``), schema-shaped JSON for ``response_format``,
    reasoning first for reasoning models, otherwise ``words``."""
    model = str(body.get("model"))
    reply = ChatReply()
    if is_reasoning_model(model) or "reasoning" in opts:
        reply.reasoning = _split_words(str(opts.get("reasoning", DEFAULT_REASONING)))
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)
             and isinstance(t.get("function"), dict)]
    if tools and body.get("tool_choice") != "none":
        count = opts.get("tool_calls", 1)
        for i in range(count if isinstance(count, int) and count > 0 else 1):
            fn = tools[i % len(tools)]["function"]
            args = opts.get("tool_arguments")
            if not isinstance(args, dict):
                args = example_value(fn.get("parameters") or {"type": "object"})
            reply.tool_calls.append({"id": f"call_mock_{i + 1}", "name": str(fn.get("name")),
                                     "arguments": json_fragments(args)})
        return reply
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_schema", "json_object"):
        if "json" in opts:
            value = opts["json"]
        elif fmt.get("type") == "json_schema":
            value = example_value((fmt.get("json_schema") or {}).get("schema") or {})
        else:
            value = {"answer": "".join(words)}
        reply.content = json_fragments(value)
        return reply
    images = count_chat_images(body.get("messages"))
    reply.content = seen_words(images) if images and "text" not in opts else words
    return reply


def seen_words(images: int) -> list[str]:
    """What the mock says about the images it was sent."""
    return _split_words(f"I see {images} image{'s' if images > 1 else ''}: a small mock picture.")


def _split_words(text: str) -> list[str]:
    words = [w + " " for w in text.split(" ")]
    words[-1] = words[-1].rstrip(" ")
    return words


_TOKENS = re.compile(r"[A-Za-z0-9_.\-]+|[^A-Za-z0-9_.\-]+")


def json_fragments(value: Any) -> list[str]:
    """JSON text cut into token-like fragments: ``{"``, ``location``, ``": "``, ... (how
    OpenAI streams tool arguments, and how the mock streams structured output)."""
    return _TOKENS.findall(json.dumps(value, ensure_ascii=False))


def example_value(schema: Any, name: str = "value") -> Any:
    """A value that matches a (simple) JSON schema: every property present, arrays of three."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return example_value(schema[key][0], name)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties") or {}
        return {k: example_value(v, k) for k, v in props.items()}
    if kind == "array":
        count = max(int(schema.get("minItems", 3)), 1)
        return [_nth(example_value(schema.get("items") or {"type": "string"}, name), i)
                for i in range(count)]
    if kind == "string":
        return name.replace("_", " ")
    if kind == "integer":
        return 42
    if kind == "number":
        return 4.2
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return name


def _nth(value: Any, i: int) -> Any:
    return f"{value} {i + 1}" if isinstance(value, str) else value


def count_chat_images(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    return sum(1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
               for p in m["content"] if isinstance(p, dict) and p.get("type") == "image_url")


def count_input_images(items: Any) -> int:
    if not isinstance(items, list):
        return 0
    return sum(1 for m in items if isinstance(m, dict) and isinstance(m.get("content"), list)
               for p in m["content"] if isinstance(p, dict) and p.get("type") == "input_image")


# --- chat completion chunks -------------------------------------------------------------------

def chat_completion(model: str, reply: ChatReply, cid: str, style: str = "xai"
                    ) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": CREATED, "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "finish_reason": reply.finish_reason,
                         "message": reply.message()}],
            "usage": reply.usage(style)}


def reply_chunks(model: str, reply: ChatReply, include_usage: bool,
                 cid: str = "chatcmpl-mock", style: str = "xai") -> Iterator[bytes]:
    """The JSON of each chunk, in order: reasoning, then tool-call or content deltas, then the
    finish chunk, then (with ``include_usage``) a usage chunk with no choices.

    ``style="xai"`` streams as xAI does. Each tool call comes whole in one delta (``@ai-sdk/xai``
    accepts nothing else), and a content chunk has no ``finish_reason`` key at all, as in the
    chunks recorded from xAI in vercel/ai's ``packages/xai/src/__fixtures__``
    (``xai-text.chunks.txt``, ``xai-tool-call.chunks.txt``). Usage depends on the request:
    with ``include_usage`` (those recordings, which the AI SDK asks for) only the final
    ``choices: []`` chunk carries it; without it, every chunk carries the running ``usage``, as
    in xAI's streaming guide (https://docs.x.ai/docs/guides/streaming-response), so that a
    reader must take the last one rather than add them up. xAI's ``completion_tokens`` leaves
    reasoning out (``ChatReply.usage``).

    ``"openai"``: tool arguments in fragments after a delta that names the call,
    ``"finish_reason": null`` on every chunk before the last, and usage (reasoning counted in
    ``completion_tokens``) only in the ``include_usage`` chunk."""
    base = {"id": cid, "object": "chat.completion.chunk", "created": CREATED, "model": model,
            "system_fingerprint": "fp_mock"}
    xai = style == "xai"
    running = xai and not include_usage
    first = True
    reasoning = answer = 0

    def chunk(delta: dict[str, Any], tokens: int = 1, thought: bool = False) -> bytes:
        nonlocal first, reasoning, answer
        if first:
            delta = {**delta, "role": "assistant"}
            first = False
        if thought:
            reasoning += tokens
        else:
            answer += tokens
        choice: dict[str, Any] = {"index": 0, "delta": delta}
        if not xai:
            choice["finish_reason"] = None
        obj = {**base, "choices": [choice]}
        if running:
            obj["usage"] = reply.usage(style, (reasoning, answer))
        return orjson.dumps(obj)

    for piece in reply.reasoning:
        yield chunk({"reasoning_content": piece}, thought=True)
    for index, call in enumerate(reply.tool_calls):
        if xai:
            yield chunk({"tool_calls": [
                {"index": index, "id": call["id"], "type": "function",
                 "function": {"name": call["name"], "arguments": "".join(call["arguments"])}}]},
                len(call["arguments"]))
            continue
        # The first delta names the call; the rest carry argument fragments only.
        yield chunk({"content": None, "tool_calls": [
            {"index": index, "id": call["id"], "type": "function",
             "function": {"name": call["name"], "arguments": ""}}]}, 0)
        for fragment in call["arguments"]:
            yield chunk({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
    for word in reply.content:
        yield chunk({"content": word})
    finish: dict[str, Any] = {**base, "choices": [
        {"index": 0, "delta": {}, "finish_reason": reply.finish_reason}]}
    if running:
        finish["usage"] = reply.usage(style)
    yield orjson.dumps(finish)
    if include_usage:
        yield orjson.dumps({**base, "choices": [], "usage": reply.usage(style)})


# --- images ------------------------------------------------------------------------------------

def images_result(prompt: str, n: int, response_format: str) -> dict[str, Any]:
    if response_format == "b64_json":
        data = [{"b64_json": PNG_1PX_B64, "revised_prompt": prompt} for _ in range(n)]
    else:
        data = [{"url": f"https://imgen.x.ai/mock/image-{i + 1}.png", "revised_prompt": prompt}
                for i in range(n)]
    return {"created": CREATED, "data": data}


@functools.lru_cache(maxsize=64)
def encode_event(obj_json: bytes, fmt: str) -> bytes:
    """One event in the requested wire format (cached: the mock must not be the bottleneck)."""
    if fmt == "multiline":
        pretty = orjson.loads(obj_json)
        lines = [b"{"] + [orjson.dumps(k) + b": " + orjson.dumps(v) + b","
                          for k, v in pretty.items()]
        lines[-1] = lines[-1].rstrip(b",")
        return b"data: " + b"\n".join(lines) + b"\n}\n\n"
    if fmt == "multidata":
        obj = orjson.loads(obj_json)
        body = orjson.dumps(obj, option=orjson.OPT_INDENT_2)
        return b"".join(b"data: " + line + b"\n" for line in body.split(b"\n")) + b"\n"
    event = b"data: " + obj_json + b"\n\n"
    if fmt == "crlf":
        return event.replace(b"\n", b"\r\n")
    if fmt == "cr":
        return event.replace(b"\n", b"\r")
    return event


def chat_chunks(model: str, words: list[str], include_usage: bool, fmt: str = "oneline",
                cid: str = "chatcmpl-mock", style: str = "xai") -> list[bytes]:
    """The events of a plain text answer of ``words``, as the mock streams them."""
    chunks = reply_chunks(model, ChatReply(content=words), include_usage, cid, style)
    return [encode_event(c, fmt) for c in chunks]
