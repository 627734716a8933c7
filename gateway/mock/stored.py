"""The mock's stored responses, as xAI and OpenAI keep them (``store`` not false): retrieved
whole or as their events replayed after ``starting_after``, their input items listed, deleted,
and (those made with ``background``) cancelled. A continuation names a stored one
(``previous_response_id``), or is answered 404 ``previous_response_not_found``.

Bounded: past ``MAX_STORED`` the oldest is forgotten. Unknown ids get OpenAI's 404 body.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from .stream import MOCK_STATE

MAX_STORED = 10_000
_input_ids = itertools.count(1)


@dataclass
class Stored:
    response: dict[str, Any]
    events: list[tuple[int, bytes]]  # (sequence number, the SSE frame as it was streamed)
    input_items: list[dict[str, Any]]
    background: bool = False


@dataclass
class StoredResponses:
    responses: OrderedDict[str, Stored] = field(default_factory=OrderedDict)

    def keep(self, body: dict[str, Any], response: dict[str, Any], events: list[bytes]) -> None:
        """Store a created response, unless its request said ``store: false``."""
        if body.get("store") is False:
            return
        while len(self.responses) >= MAX_STORED:
            self.responses.popitem(last=False)
        numbered = [(orjson.loads(e.split(b"data: ", 1)[1])["sequence_number"], e)
                    for e in events]
        self.responses[response["id"]] = Stored(response, numbered, input_items(body),
                                                bool(body.get("background")))

    def missing_previous(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The 404 body for a ``previous_response_id`` the mock does not hold, else None."""
        previous = body.get("previous_response_id")
        if previous is None or (isinstance(previous, str) and previous in self.responses):
            return None
        return {"error": {"message": f"Previous response with id '{previous}' not found.",
                          "type": "invalid_request_error", "param": "previous_response_id",
                          "code": "previous_response_not_found"}}


MOCK_STORE = web.AppKey("mock_store", StoredResponses)


def input_items(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's ``input`` as the API lists it: a string is one user message."""
    given = body.get("input")
    if isinstance(given, str):
        given = [{"type": "message", "role": "user",
                  "content": [{"type": "input_text", "text": given}]}]
    items = [item for item in given or [] if isinstance(item, dict)] if isinstance(
        given, list) else []
    return [{"id": f"msg_in_{next(_input_ids)}", "status": "completed", **item}
            for item in items]


def _found(request: web.Request) -> Stored | web.Response:
    request.app[MOCK_STATE].record(request, None)
    rid = request.match_info["response_id"]
    stored = request.app[MOCK_STORE].responses.get(rid)
    if stored is None:
        return web.json_response({"error": {
            "message": f"Response with id '{rid}' not found.", "type": "invalid_request_error",
            "param": None, "code": None}}, status=404)
    return stored


async def retrieve(request: web.Request) -> web.StreamResponse:
    stored = _found(request)
    if isinstance(stored, web.Response):
        return stored
    if request.query.get("stream") != "true":
        return web.json_response(stored.response)
    after = _number(request, "starting_after", -1)
    if after is None:
        return _bad_number("starting_after")
    return web.Response(body=b"".join(e for n, e in stored.events if n > after),
                        headers={"Content-Type": "text/event-stream",
                                 "Cache-Control": "no-cache"})


async def list_input_items(request: web.Request) -> web.Response:
    stored = _found(request)
    if isinstance(stored, web.Response):
        return stored
    items = stored.input_items
    if request.query.get("order", "desc") == "desc":
        items = items[::-1]
    limit = _number(request, "limit", 20)
    if limit is None:
        return _bad_number("limit")
    page = items[:limit]
    return web.json_response({"object": "list", "data": page,
                              "first_id": page[0]["id"] if page else None,
                              "last_id": page[-1]["id"] if page else None,
                              "has_more": len(items) > limit})


async def delete(request: web.Request) -> web.Response:
    stored = _found(request)
    if isinstance(stored, web.Response):
        return stored
    rid = request.match_info["response_id"]
    del request.app[MOCK_STORE].responses[rid]
    return web.json_response({"id": rid, "object": "response.deleted", "deleted": True})


async def cancel(request: web.Request) -> web.Response:
    stored = _found(request)
    if isinstance(stored, web.Response):
        return stored
    if not stored.background:
        return web.json_response({"error": {
            "message": "Only responses created with background=true can be cancelled.",
            "type": "invalid_request_error", "param": None, "code": None}}, status=400)
    stored.response = {**stored.response, "status": "cancelled"}
    return web.json_response(stored.response)


def _number(request: web.Request, name: str, default: int) -> int | None:
    try:
        return int(request.query.get(name, default))
    except ValueError:
        return None


def _bad_number(name: str) -> web.Response:
    return web.json_response({"error": {
        "message": f"{name} must be an integer", "type": "invalid_request_error",
        "param": name, "code": None}}, status=400)


def add_routes(app: web.Application, prefix: str) -> None:
    one = f"{prefix}/responses/{{response_id}}"
    app.router.add_get(one, retrieve)
    app.router.add_delete(one, delete)
    app.router.add_get(f"{one}/input_items", list_input_items)
    app.router.add_post(f"{one}/cancel", cancel)
