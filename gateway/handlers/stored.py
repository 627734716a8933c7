"""A stored response, by its id: retrieve it (JSON, or its events replayed as SSE after
``starting_after``), list its input items, delete it, cancel it (a background response). Each
only for the key that created it (``handlers/owned.py``): for any other key, and for an id the
gateway never saw, 404 before the upstream is asked.

The query goes on to the upstream re-encoded from its parsed pairs, bounded in count and size
(``_query``); the id is one ``records.valid_id`` accepted, so it cannot step out of the path.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable
from urllib.parse import urlencode

from aiohttp import web

from ..appkeys import PROXY, RECORDS
from ..errors import InvalidRequest
from ..request_info import REQUEST_INFO, RequestInfo
from ..stream.dialect import RESPONSES
from .owned import require_own_response

MAX_QUERY_PAIRS = 32
MAX_QUERY_CHARS = 4096
_PARAM = re.compile(r"[A-Za-z_][A-Za-z0-9_.\[\]]{0,63}")


async def retrieve(request: web.Request) -> web.StreamResponse:
    """``GET responses/{id}``: the response object, or with ``stream=true`` the stored events
    (after ``starting_after``) relayed as the upstream sends them."""
    response_id = await require_own_response(request)
    proxy = request.app[PROXY]
    info = request[REQUEST_INFO]
    call = proxy.get(request, f"responses/{response_id}{_query(request)}")
    if info.stream:  # ``stream=true`` (``middleware/admission.py``)
        return await _not_counted(info, proxy.stream(request, call, dialect=RESPONSES))
    return await _not_counted(info, proxy.plain.relay(info, call))


async def input_items(request: web.Request) -> web.Response:
    response_id = await require_own_response(request)
    proxy = request.app[PROXY]
    call = proxy.get(request, f"responses/{response_id}/input_items{_query(request)}")
    return await proxy.plain.relay(request[REQUEST_INFO], call)


async def delete(request: web.Request) -> web.Response:
    """The record goes once the upstream has deleted the response (a refusal keeps it)."""
    response_id = await require_own_response(request)
    proxy = request.app[PROXY]
    answer = await proxy.plain.relay(request[REQUEST_INFO],
                                     proxy.get(request, f"responses/{response_id}", "DELETE"))
    await request.app[RECORDS].forget(response_id)
    return answer


async def cancel(request: web.Request) -> web.StreamResponse:
    response_id = await require_own_response(request)
    proxy = request.app[PROXY]
    info = request[REQUEST_INFO]
    return await _not_counted(info, proxy.plain.relay(
        info, proxy.get(request, f"responses/{response_id}/cancel", "POST")))


async def _not_counted(info: RequestInfo, answer: Awaitable[web.StreamResponse]
                       ) -> web.StreamResponse:
    """A stored response's tokens were counted when it was made: its usage, read again, is
    left out of the access log and the metrics."""
    try:
        return await answer
    finally:
        info.usage = None


def _query(request: web.Request) -> str:
    """The client's query, as ``?...`` re-encoded from its parsed pairs (or nothing)."""
    pairs = list(request.query.items())
    if not pairs:
        return ""
    if len(pairs) > MAX_QUERY_PAIRS or len(request.query_string) > MAX_QUERY_CHARS:
        raise InvalidRequest(f"The query is too long: at most {MAX_QUERY_PAIRS} parameters "
                             f"and {MAX_QUERY_CHARS} characters")
    for name, _ in pairs:
        if _PARAM.fullmatch(name) is None:
            raise InvalidRequest("The query has a parameter name that is not an identifier")
    return "?" + urlencode(pairs)
