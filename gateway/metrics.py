"""Prometheus metrics, recorded at one place per request.

``Metrics.observe(info)`` runs once per request, where the access-log line is written (the errors
middleware), from the same ``RequestInfo``; the open-streams gauge is the only metric kept
elsewhere (by ``Proxy.stream`` in ``gateway/stream/proxy.py``), because it must move while a
stream runs.

The hot path does little: label children are looked up once per label set and cached in plain
dicts, so a request costs a few dict lookups and ``inc``/``observe`` calls.

Multi-process: ``gateway serve --workers N`` gives every worker the same
``PROMETHEUS_MULTIPROC_DIR`` (the supervisor owns the directory and removes it). prometheus-client
then keeps each process's values in mmap files there, and ``/metrics`` on any worker adds up the
files of all of them; the supervisor marks a dead worker's gauges dead
(``multiprocess.mark_process_dead``). prometheus-client chooses the mode once, from the
environment, when it is first imported; ``Metrics`` asks the library which mode it is in rather
than guessing. https://prometheus.github.io/client_python/multiprocess/

Labels stay bounded, in number and in length, whatever clients send: ``route`` is the route's
pattern (``/v1/chat/completions``, ``unmatched``), ``key`` a configured key's name (never the
key), ``kind`` an error class's own label, ``limit`` one of a fixed set. ``model`` is the
client's string, so it appears only on token counts (models the upstream accepted), only when it
looks like a model name (``_MODEL_LABEL``), and only for the first ``_MAX_TOKEN_SERIES`` label
sets; past any of those it is ``other``.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, TypeGuard

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

from .request_info import RequestInfo

TTFB_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
"""Time to first byte: milliseconds for a fast model, minutes for a reasoning one."""
DURATION_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                    1200.0, 3600.0)
LOOP_LAG_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
LIMITER_STATES = ("memory", "redis", "fallback", "unavailable")
"""``Limiter.backend_state`` values (see ``gateway.ratelimit``)."""
CONTENT_TYPE = CONTENT_TYPE_LATEST

_REFUSAL_LIMITS = {"rate_limit_exceeded": "requests", "concurrency_limit_exceeded": "concurrency",
                   "too_many_auth_failures": "auth_failures", "token_limit_exceeded": "tokens",
                   "insufficient_quota": "usd"}
_MAX_TOKEN_SERIES = 2000
"""Past this many (key, model, type) label sets, further models are counted as ``other``."""
_MODEL_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/\-]{0,63}")
"""What a model name looks like (``grok-4-fast-reasoning``, ``ft:gpt-4o:org::id``): anything
else, a 300 KB string for one, is counted as ``other``."""


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


class _RouteSeries:
    """One route's label children, created on the route's first request."""

    __slots__ = ("ttfb", "duration", "chunks", "bytes", "disconnects")

    def __init__(self, metrics: Metrics, route: str) -> None:
        self.ttfb = metrics.ttfb.labels(route)
        self.duration = metrics.stream_duration.labels(route)
        self.chunks = metrics.chunks.labels(route)
        self.bytes = metrics.bytes.labels(route)
        self.disconnects = metrics.disconnects.labels(route)


class Metrics:
    """The gateway's metrics, in a registry of their own (one per app: tests build many apps)."""

    def __init__(self) -> None:
        self.multiprocess_dir: str | None = None
        if getattr(values.ValueClass, "_multiprocess", False):
            self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "gateway_requests", "Requests answered, by route, HTTP status and client key name "
            "(status 499: the client left before any response).",
            ("route", "status", "key"), registry=r)
        self.open_streams = Gauge(
            "gateway_open_streams", "Event streams being relayed now.",
            multiprocess_mode="livesum", registry=r)
        self.ttfb = Histogram(
            "gateway_time_to_first_byte_seconds", "From the request's arrival to the first "
            "upstream event (or the whole plain answer) sent to the client.",
            ("route",), buckets=TTFB_BUCKETS, registry=r)
        self.stream_duration = Histogram(
            "gateway_stream_duration_seconds", "Event streams, from the request's arrival to "
            "their end (completed or not).", ("route",), buckets=DURATION_BUCKETS, registry=r)
        self.chunks = Counter(
            "gateway_relayed_chunks", "Upstream events relayed to clients.", ("route",),
            registry=r)
        self.bytes = Counter(
            "gateway_relayed_bytes", "Response body bytes relayed to clients.", ("route",),
            registry=r)
        self.upstream_errors = Counter(
            "gateway_upstream_errors", "Requests that failed because of the upstream, by kind: "
            "status (an error status), unreachable, timeout, bad_stream, error (an error event "
            "inside a stream).", ("kind",), registry=r)
        self.disconnects = Counter(
            "gateway_client_disconnects", "Requests whose client went away before the end.",
            ("route",), registry=r)
        self.refusals = Counter(
            "gateway_ratelimit_refusals", "Requests refused with 429, by key name and by the "
            "limit that refused them (requests, concurrency, or auth_failures: a client address "
            "that presented too many unknown keys, key -; tokens and usd: the key's token and "
            "spend limits).", ("key", "limit"), registry=r)
        self.tokens = Counter(
            "gateway_tokens", "Tokens reported by the upstream's usage, by key name, model and "
            "type: prompt, completion (every output token, reasoning included, whichever way "
            "the upstream counts), reasoning (the part of completion spent reasoning).",
            ("key", "model", "type"), registry=r)
        self.spend = Counter(
            "gateway_spend_usd", "Dollars charged to keys with token or spend limits, by key "
            "name: xAI's exact cost_in_usd_ticks where the upstream sent it, else the usage at "
            "[models.prices]; an estimate for an answer that ended without usage.", ("key",),
            registry=r)
        self.loop_lag = Histogram(
            "gateway_event_loop_lag_seconds", "How late a timer set for a quarter of a second "
            "runs: the time every callback of this worker waits behind the others (each "
            "stream's next event, each request's next step).", buckets=LOOP_LAG_BUCKETS,
            registry=r)
        self.limiter_backend = Gauge(
            "gateway_limiter_backend", "Worker processes whose rate limiter is in this state: "
            "redis (shared limits), fallback (Redis down, per-process limits), unavailable "
            "(Redis down, refusing), memory (no Redis configured).", ("state",),
            multiprocess_mode="livesum", registry=r)
        self.upstream_requests = Counter(
            "gateway_upstream_requests", "Tries sent to each upstream (with several), by "
            "outcome: ok, client_error (another status: the request's own), rate_limited "
            "(429), error_status (5xx), unreachable, timeout, bad_stream (broken, or failed "
            "before its first output), error (an error event in a stream), status (a stream "
            "that ended with the upstream's error status).",
            ("upstream", "outcome"), registry=r)
        self.upstream_failovers = Counter(
            "gateway_upstream_failovers", "Requests moved from this upstream to another before "
            "their first output.", ("upstream",), registry=r)
        self.upstream_ejections = Counter(
            "gateway_upstream_ejections", "Times this upstream was put out of the choice after "
            "failing [upstream] eject_after_failures times in a row (or failing its trial).",
            ("upstream",), registry=r)
        self.upstream_returns = Counter(
            "gateway_upstream_returns", "Times this upstream came back after a successful "
            "trial request.", ("upstream",), registry=r)
        self._upstream: dict[tuple[str, ...], Any] = {}
        self._requests: dict[tuple[str, int, str], Any] = {}
        self._routes: dict[str, _RouteSeries] = {}
        self._upstream_errors: dict[str, Any] = {}
        self._refusals: dict[tuple[str, str], Any] = {}
        self._tokens: dict[tuple[str, str, str], Any] = {}
        self._limiter_state: str | None = None

    def observe(self, info: RequestInfo) -> None:
        """Count one finished request (called where its access-log line is written)."""
        key = info.key.name if info.key is not None else "-"
        status = info.status
        child = self._requests.get((info.route, status, key))
        if child is None:
            child = self._requests[(info.route, status, key)] = self.requests.labels(
                info.route, str(status), key)
        child.inc()
        route = self._routes.get(info.route)
        if route is None:
            route = self._routes[info.route] = _RouteSeries(self, info.route)
        ttfb = info.ttfb_seconds
        if ttfb is not None:
            route.ttfb.observe(ttfb)
        if info.stream and status == 200:
            route.duration.observe(time.monotonic() - info.started)
        if info.chunks:
            route.chunks.inc(info.chunks)
        if info.bytes_out:
            route.bytes.inc(info.bytes_out)
        outcome = info.outcome
        if outcome == "client_disconnect":
            route.disconnects.inc()
        elif outcome == "refused":
            self._refused(key, info.error or "")
        if info.upstream_error is not None:
            self._upstream_error(info.upstream_error)
        if info.usage is not None:
            self._count_tokens(key, info.model or "-", info.usage)
        if info.charge is not None:
            self.spend.labels(key).inc(info.charge.ticks / 10**10)

    def _refused(self, key: str, code: str) -> None:
        limit = _REFUSAL_LIMITS.get(code, "other")
        child = self._refusals.get((key, limit))
        if child is None:
            child = self._refusals[(key, limit)] = self.refusals.labels(key, limit)
        child.inc()

    def _upstream_error(self, kind: str) -> None:
        child = self._upstream_errors.get(kind)
        if child is None:
            child = self._upstream_errors[kind] = self.upstream_errors.labels(kind)
        child.inc()

    def _count_tokens(self, key: str, model: str, usage: dict[str, Any]) -> None:
        # Chat Completions name them prompt/completion, the Responses API input/output.
        details = usage.get("completion_tokens_details") or usage.get("output_tokens_details")
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens"))
        reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
        if _is_count(prompt) and _is_count(completion) and _is_count(reasoning) \
                and reasoning > 0 and prompt + completion + reasoning == usage.get("total_tokens"):
            # xAI's chat completions leave reasoning out of completion_tokens (prompt +
            # completion + reasoning = total); OpenAI's, and xAI's Responses API, count it in.
            # "completion" is every output token either way.
            completion += reasoning
        for kind, count in (("prompt", prompt), ("completion", completion),
                            ("reasoning", reasoning)):
            if not _is_count(count) or count <= 0:
                continue
            child = self._tokens.get((key, model, kind))
            if child is None:
                if len(self._tokens) >= _MAX_TOKEN_SERIES or not (
                        model == "-" or _MODEL_LABEL.fullmatch(model)):
                    model = "other"
                child = self._tokens.get((key, model, kind))
                if child is None:
                    child = self._tokens[(key, model, kind)] = self.tokens.labels(
                        key, model, kind)
            child.inc(count)

    # With several upstreams (``gateway/upstream/upstreams.py``'s ``Counters``); the label
    # values are the configured names and a fixed set of outcomes.

    def upstream_attempt(self, name: str, outcome: str) -> None:
        self._upstream_child("requests", name, outcome).inc()

    def upstream_failover(self, name: str) -> None:
        self._upstream_child("failovers", name).inc()

    def upstream_ejected(self, name: str) -> None:
        self._upstream_child("ejections", name).inc()

    def upstream_returned(self, name: str) -> None:
        self._upstream_child("returns", name).inc()

    def _upstream_child(self, metric: str, *labels: str) -> Any:
        child = self._upstream.get((metric, *labels))
        if child is None:
            counter = getattr(self, f"upstream_{metric}")
            child = self._upstream[(metric, *labels)] = counter.labels(*labels)
        return child

    def set_limiter_state(self, state: str) -> None:
        """This process's limiter state: 1 for it, 0 for the others (summed over workers)."""
        if state == self._limiter_state:
            return
        if self._limiter_state is not None:
            self.limiter_backend.labels(self._limiter_state).set(0)
        else:
            for other in LIMITER_STATES:  # every state shows, at 0 when no worker is in it
                self.limiter_backend.labels(other).set(0)
        self.limiter_backend.labels(state).set(1)
        self._limiter_state = state

    def render(self) -> bytes:
        """The Prometheus text exposition: this process's metrics, or every worker's."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        return generate_latest(registry)
