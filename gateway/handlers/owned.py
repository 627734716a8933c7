"""Each stored response is its creator's (``gateway/records/``): the checks every route that
names a response makes before the upstream is asked, and the recorder a creating request
carries.

For another key's response and for an id the gateway never saw (or one no upstream could have
made: ``records.valid_id``), the answer is the same 404, with the same body: the client cannot
tell whether the id exists. The message names the id only when it is a valid one (an invalid
id is the client's bytes, of any length).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..appkeys import RECORDS
from ..errors import NotFound
from ..records import Record, Recorder, ResponseRecords, valid_id
from ..request_info import REQUEST_INFO, ClientKey, RequestInfo
from ..settings import DEFAULT_UPSTREAM


def unknown_response(response_id: str) -> NotFound:
    named = f" with id '{response_id}'" if valid_id(response_id) else ""
    return NotFound(f"Response{named} not found.")


def unknown_previous(response_id: Any) -> NotFound:
    named = f" with id '{response_id}'" if valid_id(response_id) else ""
    return NotFound(f"Previous response{named} not found.", param="previous_response_id",
                    code="previous_response_not_found")


async def owned(records: ResponseRecords, key: ClientKey | None, response_id: Any
                ) -> Record | None:
    """The response's record if ``key`` created it, else None."""
    if key is None or not valid_id(response_id):
        return None
    record = await records.get(response_id)
    return record if record is not None and record.owner == key.name else None


async def require_own_response(request: web.Request) -> str:
    """The path's response id, if the request's key created that response; else 404. The
    request goes to the upstream that holds it (``info.pinned``)."""
    response_id = request.match_info["response_id"]
    info = request[REQUEST_INFO]
    record = await owned(request.app[RECORDS], info.key, response_id)
    if record is None:
        raise unknown_response(response_id)
    info.pinned = record.upstream or DEFAULT_UPSTREAM
    return response_id


async def require_own_previous(records: ResponseRecords, info: RequestInfo,
                               body: dict[str, Any]) -> str | None:
    """A continuation (``previous_response_id``) only of the key's own responses, on the
    upstream that holds them: its name (``info.pinned``), when the record names one."""
    previous = body.get("previous_response_id")
    if previous is None:
        return None
    record = await owned(records, info.key, previous)
    if record is None:
        raise unknown_previous(previous)
    info.pinned = record.upstream or DEFAULT_UPSTREAM
    return info.pinned


def recorder_for(records: ResponseRecords, info: RequestInfo, body: dict[str, Any]
                 ) -> Recorder | None:
    """What records the response a request creates: none when the upstream will not store it
    (``store: false``), nor for a request without a key (there is no owner to record). The
    upstream that made it is recorded too (``info.upstream`` when the record is written), so
    that what continues it goes there."""
    if info.key is None or body.get("store") is False:
        return None
    return Recorder(records, info.key.name, info)
