"""Which form an error takes: an SSE frame or a JSON body, from the request's ``Accept``."""

from __future__ import annotations

from aiohttp import web


def wants_event_stream(request: web.Request) -> bool:
    """Should an error be an SSE frame? Only when ``Accept`` names ``text/event-stream``.

    Never the body's ``"stream": true``: reading it would mean reading (up to
    ``max_body_bytes``) and parsing a body before authentication, for anyone. And clients that
    send no ``Accept`` or ``*/*`` (the AI SDK providers, LiteLLM, curl) parse an error as JSON,
    as the upstreams answer it; the status is the true one either way.
    """
    for part in request.headers.get("Accept", "").split(","):
        media, *params = part.split(";")
        if media.strip().lower() == "text/event-stream":
            return not any(_zero_quality(p) for p in params)
    return False


def _zero_quality(param: str) -> bool:
    """``q=0`` (or ``0.0``...): the type is named only to refuse it (RFC 9110, 12.4.2)."""
    name, _, value = param.strip().partition("=")
    value = value.strip()
    return (name.strip().lower() == "q" and bool(value)
            and value.rstrip("0").rstrip(".") in ("0", ""))
