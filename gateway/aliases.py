"""Model aliases: client-facing names (``[models]`` in the config) for upstream models.

A request's ``model`` is rewritten on the way up, and the ``model`` of every answer (a response
object, each stream chunk, the ``response`` inside Responses API events) is rewritten back to the
name the client used. Only aliased requests pay for that: without an alias the body goes up as
the client's own bytes and the answer comes back untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .stream.render import Rewrite


def apply_alias(aliases: Mapping[str, str], body: dict[str, Any]) -> Rewrite | None:
    """Puts the upstream's name for the body's ``model`` in its place, and returns what sets the
    client's name back in each answer object; None, and the body untouched, when the model has
    no alias (or the body no model: an image request may leave it out)."""
    model = body.get("model")
    if not isinstance(model, str):
        return None
    upstream = aliases.get(model, model)
    if upstream == model:
        return None
    body["model"] = upstream
    return model_rewriter(model)


def model_rewriter(client_model: str) -> Rewrite:
    """Sets ``model`` back to ``client_model`` in one parsed answer object, in place."""

    def rewrite(obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        if isinstance(obj.get("model"), str):
            obj["model"] = client_model
        inner = obj.get("response")  # Responses API lifecycle events carry the response
        if isinstance(inner, dict) and isinstance(inner.get("model"), str):
            inner["model"] = client_model

    return rewrite
