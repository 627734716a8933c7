"""What a request must pass before it costs a rate-limit token: a body that parses, and a model
the key may use. Refused here, a bad request spends nothing of the key's limits."""

from __future__ import annotations

from aiohttp import web

from ..errors import InvalidRequest, PermissionDenied
from ..request_body import json_body
from ..request_info import ClientKey, RequestInfo


async def admit(request: web.Request, info: RequestInfo, key: ClientKey) -> None:
    """Raise the client's error, or return with the body parsed (``info.model`` known)."""
    if "response_id" in request.match_info:  # a stored response's route: no body to read
        # Its events replayed (``GET responses/{id}?stream=true``) hold a stream slot, as the
        # stream that made them did.
        info.stream = request.method == "GET" and request.query.get("stream") == "true"
    elif request.method == "POST":
        await json_body(request)
        if info.model is None and key.models is not None:
            # Without a model the upstream picks its default, which the allow-list never saw.
            raise InvalidRequest("Missing required parameter: 'model' (this API key may use "
                                 "only some models, so every request must name one)",
                                 param="model", code="missing_required_parameter")
    if info.model is not None and not key.may_use(info.model):
        raise PermissionDenied(f"This API key may not use model '{info.model}'", param="model")
