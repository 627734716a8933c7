"""The one pooled HTTP client to the upstream provider, with its credentials and retries.

One ``ConnectionPool`` (``gateway/upstream/pool.py``) per upstream for the app's whole life:
keep-alive connections are reused across requests. Requests carry the operator's key, the
gateway's own headers and the client's that ``[upstream] forward_headers`` names, bounded; the
client's own credentials never go up. The key is also where the operator's ``Secrets`` are
built, once, for the stream layer to withhold (``gateway/upstream/secrets.py``).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from urllib.parse import urlsplit

from ..errors import UpstreamProtocolError, UpstreamTimeout, UpstreamUnreachable
from ..settings import Settings
from .http1 import InvalidHTTP, UpstreamResponse
from .pool import ConnectionPool
from .secrets import NO_SECRETS, Secrets

log = logging.getLogger("gateway.upstream")

_GATEWAYS_OWN = ("content-type", "x-request-id")
_MAX_HEADER_CHARS = 1024
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
"""Control characters (tab aside) a header value may not carry: CR and LF would start another
header; the rest a strict upstream refuses, request and all."""
_RETRY_STATUSES = frozenset((502, 503, 504))
MIN_SECRET_CHARS = 12


class UpstreamClient:
    def __init__(self, settings: Settings, base_url: str, api_key: str) -> None:
        self._base = base_url.rstrip("/") + "/"
        self._api_key = api_key
        self._stream = settings.stream
        self._retries = settings.upstream.max_retries
        self._backoff = settings.upstream.retry_backoff_seconds
        # Header names a request may carry up (lower case): the gateway's own, and the
        # client's that the settings name (never credentials: gateway/settings.py refuses those).
        self._forwarded = frozenset(
            (*_GATEWAYS_OWN, *(h.lower() for h in settings.upstream.forward_headers)))
        url = urlsplit(self._base)
        self._path = url.path
        # What every request carries, encoded once: the Host and the operator's key.
        host = url.netloc.rsplit("@", 1)[-1]
        fixed = f"Host: {host}\r\nAccept-Encoding: identity\r\n"
        if api_key:
            fixed += f"Authorization: Bearer {api_key}\r\n"
        self._fixed_headers = fixed.encode("latin-1")
        # What must never reach a client, whole or in part: what the stream layer looks for in
        # everything the upstream sends, built here, the one place the operator's key is known.
        # A key shorter than ``MIN_SECRET_CHARS`` is not one (real provider keys are dozens of
        # characters): looked for, its parts would match ordinary text in every event.
        self.secrets: Secrets = (Secrets.of(api_key) if len(api_key) >= MIN_SECRET_CHARS
                                 else NO_SECRETS)
        self.pool: ConnectionPool | None = None

    async def start(self) -> None:
        self.pool = ConnectionPool(self._base, self._stream.connect_timeout_seconds)

    async def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def _encode(self, method: str, path: str, body: bytes | None,
                headers: Mapping[str, str] | None) -> bytes:
        lines = [f"{method} {self._path}{path} HTTP/1.1\r\n".encode("latin-1"),
                 self._fixed_headers]
        for name, value in (headers or {}).items():
            if name.lower() in self._forwarded and len(value) <= _MAX_HEADER_CHARS \
                    and not _CONTROL.search(value):
                lines.append(f"{name}: {value}\r\n".encode("utf-8", "replace"))
        if body is not None:
            lines.append(b"Content-Length: %d\r\n\r\n" % len(body))
            lines.append(body)
        else:
            lines.append(b"\r\n")
        return b"".join(lines)

    async def request(self, method: str, path: str, *, body: bytes | None = None,
                      headers: Mapping[str, str] | None = None) -> UpstreamResponse:
        """Send a request and return once the upstream's response headers have arrived.

        Connection failures and 502/503/504 are retried up to ``max_retries`` times: nothing
        has reached the client yet, and the client's one rate-limit token covers all tries.
        An answer that is not HTTP is not retried (``UpstreamProtocolError``, 502).
        The caller owns the response and must release or close it.
        """
        assert self.pool is not None, "UpstreamClient.start() was not awaited"
        request = self._encode(method, path, body, headers)
        attempt = 0
        while True:
            try:
                resp = await self.pool.send(request)
            except InvalidHTTP as e:
                # Not an HTTP answer at all (garbage, a header line too long). Nothing of it
                # reaches the client: it may hold anything, the upstream's internals included.
                log.warning("upstream %s %s: the answer is not valid HTTP: %s", method, path, e)
                raise UpstreamProtocolError("The upstream's answer is not valid HTTP") from e
            except (OSError, TimeoutError) as e:  # ConnectionLost is an OSError too
                if attempt >= self._retries or isinstance(e, TimeoutError):
                    if isinstance(e, TimeoutError):
                        raise UpstreamTimeout("Timed out connecting to the upstream") from e
                    raise UpstreamUnreachable(
                        f"The upstream is unreachable ({type(e).__name__})") from e
                log.warning("upstream %s %s failed (%s), retrying", method, path,
                            type(e).__name__)
            else:
                if resp.status not in _RETRY_STATUSES or attempt >= self._retries:
                    return resp
                resp.close()
                log.warning("upstream %s %s answered %d, retrying", method, path, resp.status)
            attempt += 1
            await asyncio.sleep(self._backoff * attempt)
