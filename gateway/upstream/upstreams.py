"""Several upstreams as one: a client per upstream, its health, and one request's tries.

``UpstreamSet`` holds an ``UpstreamClient`` per ``[[upstreams]]`` entry (``[upstream]`` alone is
one, named ``default``: then ``only`` is its client and nothing here runs per request). A
request to several is an ``Attempts``: awaited, it is the answer of the first upstream that
gives one (``gateway/upstream/router.py`` says in which order), having moved on, at most
``[upstream] max_failovers`` times, past

- a connect failure, a timeout before the headers (``[stream] connect_timeout_seconds``, and
  ``[upstream] headers_timeout_seconds`` when set), an answer that is not HTTP;
- a 5xx, or a 429 (which rests that upstream: ``gateway/upstream/health.py``).

Any other status is the answer, a 4xx included (the client's mistake stays its own), and so is
the last failure when there is nowhere left to go. Nothing has reached the client before the
headers, so the client sees one answer. A stream whose upstream fails after its headers but
before its first output moves on as well: the relay asks ``again`` (``gateway/stream/relay.py``).
A request pinned to one upstream (a continuation of a response stored there) never moves.

Each try is judged once, into its upstream's health and the metrics (``Counters``): a plain
answer when its headers come, a stream when it ends (``settle``: a stream that answered 200 and
then failed before any output counts as a failure).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Coroutine, Generator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import (
    GatewayError,
    NotFound,
    UpstreamFailure,
    UpstreamProtocolError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from ..settings import Settings, UpstreamEntry
from .client import UpstreamClient
from .errors import retry_after_seconds
from .health import Health
from .http1 import UpstreamResponse
from .router import covered, order, serves
from .secrets import NO_SECRETS, Secrets

if TYPE_CHECKING:
    from ..request_info import RequestInfo

log = logging.getLogger("gateway.upstream")


class Counters(Protocol):
    """What the set counts (``gateway/metrics.py``); labels are the configured names only."""

    def upstream_attempt(self, name: str, outcome: str) -> None: ...
    def upstream_failover(self, name: str) -> None: ...
    def upstream_ejected(self, name: str) -> None: ...
    def upstream_returned(self, name: str) -> None: ...


class Member:
    """One upstream of the set (``router.Choosable``)."""

    __slots__ = ("name", "client", "weight", "patterns", "max_concurrent", "current", "health")

    def __init__(self, entry: UpstreamEntry, client: UpstreamClient, health: Health) -> None:
        self.name = entry.name
        self.client = client
        self.weight = entry.weight
        self.patterns = entry.models
        self.max_concurrent = entry.max_concurrent
        self.current = 0.0
        self.health = health

    def full(self) -> bool:
        pool = self.client.pool
        return bool(self.max_concurrent) and pool is not None \
            and pool.in_use >= self.max_concurrent

    def ready(self, now: float) -> bool:
        return self.health.available(now) and not self.full()


class UpstreamSet:
    def __init__(self, settings: Settings, clients: Sequence[tuple[UpstreamEntry, UpstreamClient]],
                 counters: Counters, clock: Callable[[], float] = time.monotonic) -> None:
        up = settings.upstream
        self.members = tuple(Member(entry, client, Health(up.eject_after_failures,
                                                          up.eject_seconds))
                             for entry, client in clients)
        self.by_name = {m.name: m for m in self.members}
        self.max_failovers = up.max_failovers
        self.headers_timeout = up.headers_timeout_seconds
        self.counters = counters
        self.clock = clock
        # One upstream: its client, called directly, as before there were several.
        self.only: UpstreamClient | None = clients[0][1] if len(clients) == 1 else None
        # Every upstream's key is withheld from every answer: an upstream may echo any of them.
        texts = tuple(t for _, c in clients for t in c.secrets.text)
        self.secrets: Secrets = (clients[0][1].secrets if len(clients) == 1
                                 else Secrets.of(*texts) if texts else NO_SECRETS)

    async def start(self) -> None:
        for m in self.members:
            await m.client.start()

    async def close(self) -> None:
        for m in self.members:
            await m.client.close()

    def attempts(self, info: RequestInfo, method: str, path: str, body: bytes | None,
                 headers: Mapping[str, str], model: str | None = None,
                 affinity: str | None = None, pinned: str | None = None) -> Attempts:
        return Attempts(self, info, (method, path, body, headers), model, affinity, pinned)

    def pick(self, info: RequestInfo, model: str | None, pinned: str | None) -> str:
        """The upstream a first try would take (``info.upstream`` names it), for what is not a
        request and is never moved: a WebSocket-mode socket's, for its life. Not judged: a
        socket's turns say nothing of its upstream's health here."""
        if self.only is not None:
            info.upstream = self.members[0].name
            return info.upstream
        tries = Attempts(self, info, ("GET", "responses", None, {}), model, None, pinned)
        member = tries._first()
        tries._abandon()
        return member.name

    def states(self) -> dict[str, str]:
        """Each upstream's state by name (``Health.state``; ``full`` at its ``max_concurrent``)."""
        now = self.clock()
        return {m.name: "full" if m.health.state(now) == "ok" and m.full()
                else m.health.state(now) for m in self.members}

    def may_eject(self, member: Member) -> bool:
        """Never the last one serving a model: only if the others still in cover its models."""
        return covered(member, (m for m in self.members
                                if m is not member and not m.health.ejected))

    def unavailable(self, serving: Sequence[Member], now: float) -> GatewayError:
        """None of the upstreams serving the model may take the request now."""
        rests = [m.health.rest_until - now for m in serving if m.health.rest_until > now]
        if len(rests) == len(serving):
            wait = max(1, math.ceil(min(rests)))
            return UpstreamStatus(
                429, f"The upstream is rate limited; retry after {wait} seconds",
                type="rate_limit_error", code="upstream_rate_limited",
                headers={"Retry-After": str(wait)})
        return UpstreamStatus(503, "No upstream is available for this request now; retry "
                                   "later", code="upstream_unavailable")


Request = tuple[str, str, "bytes | None", Mapping[str, str]]


class Attempts:
    """One request's tries, in order; awaited, the answer (``UpstreamClient.request``'s)."""

    __slots__ = ("upstreams", "info", "request", "model", "affinity", "pinned", "deferred",
                 "order", "at", "moves", "member", "judged", "answered")

    def __init__(self, upstreams: UpstreamSet, info: RequestInfo, request: Request,
                 model: str | None, affinity: str | None, pinned: str | None) -> None:
        self.upstreams = upstreams
        self.info = info
        self.request = request
        self.model = model
        self.affinity = affinity
        self.pinned = pinned
        self.deferred = False  # a stream: judged when it ends (``settle``), not at its headers
        self.order: list[Member] | None = None
        self.at = 0
        self.moves = 0
        self.member: Member | None = None
        self.judged = True
        self.answered = False

    def __await__(self) -> Generator[Any, None, UpstreamResponse]:
        return self._call(None).__await__()

    @property
    def may_move(self) -> bool:
        """Whether a failure may still move the request (the stream holds its preamble then)."""
        return self.pinned is None and self.upstreams.max_failovers > 0

    def again(self) -> Coroutine[Any, Any, UpstreamResponse] | None:
        """The stream failed after its headers, before any output: the next upstream's answer,
        or None when there is none to try (the failure is then the client's answer)."""
        self.answered = False
        following = self._failed("bad_stream")
        return None if following is None else self._call(following)

    def settle(self, reason: BaseException | None) -> None:
        """A stream ended (``reason``: why, None when complete): its try is judged, if it was
        not already."""
        if self.member is None or self.judged:
            return
        if isinstance(reason, UpstreamFailure):
            self._failed(reason.kind or "error", move=False)
        elif self.answered:
            self._succeeded("ok")
        else:
            self._abandon()

    async def _send(self, member: Member) -> UpstreamResponse:
        method, path, body, headers = self.request
        seconds = self.upstreams.headers_timeout
        if not seconds:
            return await member.client.request(method, path, body=body, headers=headers)
        try:
            async with asyncio.timeout(seconds):
                return await member.client.request(method, path, body=body, headers=headers)
        except TimeoutError:
            raise UpstreamTimeout(f"The upstream did not answer within {seconds:g} "
                                  f"seconds") from None

    async def _call(self, member: Member | None) -> UpstreamResponse:
        if member is None:
            member = self._first()
        while True:
            try:
                response = await self._send(member)
            except (UpstreamUnreachable, UpstreamTimeout, UpstreamProtocolError) as e:
                following = self._failed(e.kind or "error")
                if following is None:
                    raise
                member = following
                continue
            except BaseException:
                self._abandon()  # the client left (or a bug): nothing to judge
                raise
            status = response.status
            if status == 429 or status >= 500:
                following = self._failed(
                    "rate_limited" if status == 429 else "error_status",
                    retry_after=retry_after_seconds(response.headers) if status == 429 else None)
                if following is None:
                    return response  # the last word: the caller reads it as the error
                response.close()
                member = following
                continue
            if status < 300 and self.deferred:
                self.answered = True
            else:
                self._succeeded("ok" if status < 300 else "client_error")
            return response

    def _first(self) -> Member:
        upstreams = self.upstreams
        now = upstreams.clock()
        pinned = upstreams.by_name.get(self.pinned) if self.pinned is not None else None
        if pinned is not None:
            self.order = [pinned]  # where its response is stored, whatever its health
            return self._choose(pinned, now)
        serving = [m for m in upstreams.members if serves(m, self.model)]
        if not serving:
            raise NotFound(f"The model '{self.model}' does not exist or you do not have access "
                           f"to it", param="model", code="model_not_found")
        ready = [m for m in serving if m.ready(now)]
        if not ready:
            raise upstreams.unavailable(serving, now)
        self.order = order(ready, self.affinity)
        return self._choose(self.order[0], now)

    def _choose(self, member: Member, now: float) -> Member:
        member.health.chosen(now)
        self.member = member
        self.judged = False
        self.info.upstream = member.name
        return member

    def _failed(self, outcome: str, retry_after: float | None = None, move: bool = True
                ) -> Member | None:
        """Judge the try a failure; the upstream to move to, if the request may move."""
        member, upstreams = self.member, self.upstreams
        assert member is not None
        now = upstreams.clock()
        if not self.judged:
            self.judged = True
            upstreams.counters.upstream_attempt(member.name, outcome)
            if outcome == "rate_limited":
                member.health.rate_limited(now, retry_after)
            elif member.health.failed(now, upstreams.may_eject(member)):
                upstreams.counters.upstream_ejected(member.name)
                log.warning("upstream %s: out for %gs after %d failures in a row", member.name,
                            member.health.eject_seconds, member.health.failures)
        if not move or self.pinned is not None or self.moves >= upstreams.max_failovers:
            return None
        assert self.order is not None
        for at in range(self.at + 1, len(self.order)):
            following = self.order[at]
            if following.ready(now):
                self.at = at
                self.moves += 1
                upstreams.counters.upstream_failover(member.name)
                return self._choose(following, now)
        return None

    def _succeeded(self, outcome: str) -> None:
        member = self.member
        assert member is not None
        self.judged = True
        self.upstreams.counters.upstream_attempt(member.name, outcome)
        if member.health.succeeded():
            self.upstreams.counters.upstream_returned(member.name)
            log.warning("upstream %s: back after a successful trial", member.name)

    def _abandon(self) -> None:
        if self.member is not None and not self.judged:
            self.judged = True
            self.member.health.abandon()
