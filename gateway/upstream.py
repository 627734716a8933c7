"""The one pooled HTTP client to the upstream provider, with its credentials and retries.

One ``ClientSession`` per upstream for the app's whole life: keep-alive connections are reused
across requests. Only a short list of client headers is forwarded; the client's own credentials
never are, the operator's key replaces them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import aiohttp

from .errors import UpstreamProtocolError, UpstreamTimeout, UpstreamUnreachable
from .settings import Settings

log = logging.getLogger("gateway.upstream")

_FORWARDED = ("Content-Type", "Accept", "User-Agent", "X-Request-ID")
_RETRY_STATUSES = frozenset((502, 503, 504))


class UpstreamClient:
    def __init__(self, settings: Settings, base_url: str, api_key: str) -> None:
        self._base = base_url.rstrip("/") + "/"
        self._api_key = api_key
        self._stream = settings.stream
        self._retries = settings.upstream.max_retries
        self._backoff = settings.upstream.retry_backoff_seconds
        self._session: aiohttp.ClientSession | None = None

    @property
    def secrets(self) -> tuple[str, ...]:
        """Strings that must never reach a client (used to redact upstream messages)."""
        return (self._api_key,) if self._api_key else ()

    @property
    def base_url(self) -> str:
        return self._base

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None,
                                          sock_connect=self._stream.connect_timeout_seconds,
                                          connect=self._stream.connect_timeout_seconds),
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, *, body: bytes | None = None,
                      headers: Mapping[str, str] | None = None) -> aiohttp.ClientResponse:
        """Send a request and return once the upstream's response headers have arrived.

        Connection failures and 502/503/504 are retried up to ``max_retries`` times: nothing
        has reached the client yet, and the client's one rate-limit token covers all tries.
        An answer that is not HTTP is not retried (``UpstreamProtocolError``, 502).
        The caller owns the response and must release or close it.
        """
        assert self._session is not None, "UpstreamClient.start() was not awaited"
        out = {k: v for k in _FORWARDED if (v := (headers or {}).get(k))}
        if self._api_key:
            out["Authorization"] = f"Bearer {self._api_key}"
        url = self._base + path
        attempt = 0
        while True:
            try:
                resp = await self._session.request(method, url, data=body, headers=out)
            except aiohttp.ClientResponseError as e:
                # Not an HTTP answer at all (garbage, a header line too long). Nothing of it
                # reaches the client: it may hold anything, the upstream's internals included.
                log.warning("upstream %s %s: the answer is not valid HTTP: %s", method, path,
                            e.message.splitlines()[0] if e.message else type(e).__name__)
                raise UpstreamProtocolError("The upstream's answer is not valid HTTP") from e
            except (aiohttp.ClientConnectionError, OSError) as e:
                if attempt >= self._retries or isinstance(e, aiohttp.ServerTimeoutError):
                    if isinstance(e, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
                        raise UpstreamTimeout("Timed out connecting to the upstream") from e
                    raise UpstreamUnreachable(
                        f"The upstream is unreachable ({type(e).__name__})") from e
                log.warning("upstream %s %s failed (%s), retrying", method, path,
                            type(e).__name__)
            else:
                if resp.status not in _RETRY_STATUSES or attempt >= self._retries:
                    return resp
                resp.release()
                log.warning("upstream %s %s answered %d, retrying", method, path, resp.status)
            attempt += 1
            await asyncio.sleep(self._backoff * attempt)
