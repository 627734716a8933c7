"""How far a request may push the mock: its options are the client's, and the mock runs inside
``gateway serve`` on the embedded default. Unbounded, one request could make the process build
gigabytes (``chunks`` times ``chunk_bytes``) or sleep for a year; an option past its bound is
answered 400, naming it."""

from __future__ import annotations

from typing import Any

MiB = 1024 * 1024

MOST = {
    "chunks": 100_000,
    "chunk_bytes": 1 * MiB,
    "answer_bytes": 1024 * MiB,  # written a piece at a time, never held
    "error_text_bytes": 1 * MiB,
    "tool_calls": 100,
    "split": 64 * MiB,
    "fail_first": 1_000,
    "failed_after": 100_000,
    "hold_until_open": 10_000,
    "chunk_delay": 60.0,
    "headers_delay": 600.0,
    "first_token_delay": 600.0,
    "pause": 600.0,
    "reasoning_silence": 600.0,
}
"""The largest value of each numeric option (seconds for the delays)."""

MOST_STREAM_BYTES = 64 * MiB
"""``chunks`` times ``chunk_bytes``: what one answer may make the mock build."""


def out_of_bounds(opts: dict[str, Any]) -> str | None:
    """What is wrong with the request's mock options, or None."""
    for name, most in MOST.items():
        value = opts.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"mock option {name!r} must be a number"
        if not 0 <= value <= most:
            return f"mock option {name!r} must be from 0 to {most:g}, got {value:g}"
    chunks, size = opts.get("chunks"), opts.get("chunk_bytes")
    if isinstance(chunks, int) and isinstance(size, int) and chunks * size > MOST_STREAM_BYTES:
        return (f"mock options 'chunks' times 'chunk_bytes' must be at most {MOST_STREAM_BYTES} "
                f"bytes, got {chunks * size}")
    return None
