"""What each API's stream events mean: which one ends the stream, which one is an error, where
the token usage sits, and what the gateway's own error frame looks like. Pure: no I/O.

Two dialects: chat completions (``CHAT``: ``[DONE]`` ends the stream, ``usage`` at the top of a
chunk, an error is any object with an ``error`` member) and the Responses API (``RESPONSES``:
named events, a terminal ``response.*`` event carrying the usage inside ``response``, an
``error`` event of its own). The renderer (``gateway/stream/render.py``) asks its dialect once
per parsed event (``classify``); plain answers ask ``usage_of``.
"""

from __future__ import annotations

import enum
from typing import Any

from ..errors import GatewayError

_RESPONSES_TERMINAL = frozenset(("response.completed", "response.incomplete", "response.failed"))


class Kind(enum.IntEnum):
    DATA = 0
    USAGE = 1
    TERMINAL = 2
    ERROR = 3
    OTHER = 4
    CREATED = 5  # a Responses ``response.created``: its id is the response's, to be recorded
    HIDDEN = 6  # a chat usage chunk the client did not ask for (the gateway did): dropped


def usage_of(obj: Any) -> dict[str, Any] | None:
    """The token counts an answer object carries (a chat completion or chunk, a Responses
    ``response``), for the access log, the metrics and, later, settling a token budget."""
    usage = obj.get("usage") if isinstance(obj, dict) else None
    return usage if isinstance(usage, dict) else None


class Dialect:
    """Chat completions: ``[DONE]`` ends the stream; ``usage`` sits at the top of a chunk."""

    responses_api = False

    def classify(self, obj: Any) -> Kind:
        if not isinstance(obj, dict):
            return Kind.OTHER
        if self.is_error(obj):
            return Kind.ERROR
        if self.is_terminal(obj):
            return Kind.TERMINAL
        return Kind.USAGE if self.usage(obj) is not None else Kind.DATA

    def is_error(self, obj: dict[str, Any]) -> bool:
        return obj.get("error") is not None

    def is_terminal(self, obj: dict[str, Any]) -> bool:
        return False  # [DONE] is not JSON: the renderer knows it before parsing

    def usage(self, obj: Any) -> dict[str, Any] | None:
        return usage_of(obj)

    def error_frame(self, err: GatewayError, seq: int) -> bytes:
        return err.sse_frame()


class ResponsesDialect(Dialect):
    """The Responses API: named events, a terminal ``response.*`` event that carries the usage
    inside ``response``, and an ``error`` event of its own."""

    responses_api = True

    def classify(self, obj: Any) -> Kind:
        kind = super().classify(obj)
        if (kind is Kind.DATA or kind is Kind.USAGE) and obj.get("type") == "response.created":
            return Kind.CREATED  # its usage, if any, is the terminal event's to give
        return kind

    def is_error(self, obj: dict[str, Any]) -> bool:
        return obj.get("error") is not None or obj.get("type") == "error"

    def is_terminal(self, obj: dict[str, Any]) -> bool:
        return obj.get("type") in _RESPONSES_TERMINAL

    def usage(self, obj: Any) -> dict[str, Any] | None:
        return usage_of(obj.get("response") if isinstance(obj, dict) else None)

    def error_frame(self, err: GatewayError, seq: int) -> bytes:
        return err.response_error_frame(seq)


CHAT = Dialect()
RESPONSES = ResponsesDialect()
