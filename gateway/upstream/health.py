"""One upstream's health, as this process has seen it: resting after a 429, out after failing
again and again, back after one trial request. Pure: every method is handed the time (``now``,
``time.monotonic`` in the gateway, whatever a test likes), so the rules are tested without
waiting.

The states::

    OK ──429──> RESTING ──its time passes──> OK
     │
     └──eject_after_failures in a row──> EJECTED ──eject_seconds──> TRIAL ──success──> OK
                                            ^                         │
                                            └────────failure──────────┘

- RESTING: a 429 with ``Retry-After`` rests the upstream that long; without one, one second,
  doubled while 429s follow each other (at most ``MAX_REST_SECONDS``). A rest is no failure:
  the upstream said when to come back.
- EJECTED: connect failures, timeouts, 5xx answers and streams that failed before their first
  output count; a success in between starts the count again. Whether this upstream may go out
  at all is the set's to say (``may_eject``: never the last one serving a model).
- TRIAL: once ``eject_seconds`` have passed, one request may try it; the others keep away until
  that one is judged. A request that ends unjudged (its client left) gives the trial back
  (``abandon``).

Each process keeps its own: with ``--workers`` each worker learns from its own requests.
"""

from __future__ import annotations

MAX_REST_SECONDS = 60.0
FIRST_REST_SECONDS = 1.0


class Health:
    __slots__ = ("eject_after", "eject_seconds", "failures", "rest_until", "rest_step",
                 "out_until", "trial")

    def __init__(self, eject_after: int, eject_seconds: float) -> None:
        self.eject_after = eject_after
        self.eject_seconds = eject_seconds
        self.failures = 0  # in a row
        self.rest_until = 0.0
        self.rest_step = 0.0  # the last rest without Retry-After (doubled while 429s repeat)
        self.out_until: float | None = None  # ejected, until then (then: one trial)
        self.trial = False  # the trial request is in flight

    def state(self, now: float) -> str:
        """``ok``, ``resting``, ``ejected`` or ``trial`` (for ``/readyz``)."""
        if self.out_until is not None:
            return "trial" if now >= self.out_until else "ejected"
        return "resting" if now < self.rest_until else "ok"

    def available(self, now: float) -> bool:
        """Whether a request may go to it now."""
        if now < self.rest_until:
            return False
        return self.out_until is None or (now >= self.out_until and not self.trial)

    @property
    def ejected(self) -> bool:
        return self.out_until is not None

    def chosen(self, now: float) -> None:
        """A request goes to it: if it is out and its time has passed, this is the trial."""
        if self.out_until is not None and now >= self.out_until:
            self.trial = True

    def succeeded(self) -> bool:
        """It answered; True when that brought it back from ejection."""
        self.failures = 0
        self.rest_step = 0.0
        self.trial = False
        back, self.out_until = self.out_until is not None, None
        return back

    def failed(self, now: float, may_eject: bool) -> bool:
        """It failed; True when that put it out (a failed trial puts it out again)."""
        self.failures += 1
        if self.trial or (self.out_until is None and may_eject
                          and self.failures >= self.eject_after):
            self.trial = False
            self.out_until = now + self.eject_seconds
            return True
        return False

    def rate_limited(self, now: float, retry_after: float | None) -> None:
        """A 429: rest for ``retry_after`` seconds, or one doubling from one second."""
        self.trial = False  # it answered: no longer a trial in flight
        if retry_after is None:
            self.rest_step = min(max(self.rest_step * 2, FIRST_REST_SECONDS), MAX_REST_SECONDS)
            retry_after = self.rest_step
        self.rest_until = max(self.rest_until, now + retry_after)

    def abandon(self) -> None:
        """The request it was chosen for ended before its answer could be judged."""
        self.trial = False
