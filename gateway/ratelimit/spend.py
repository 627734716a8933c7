"""One request's charge against its key's token and spend limits: reserved before the upstream
call, settled once when the answer ends, whichever way it ends.

Settled to the truth when the upstream's usage came (a refund or an extra debit); to an
estimate from what was relayed when it did not (the client left, the upstream broke, the
stream was cut: never nothing); refunded whole when the upstream never answered (refused, down,
an error status). ``[limits] on_token_overrun = "cut"`` ends a stream once its running count
passes what the key had left (``over``); "finish" lets it finish, and the key's minute bucket
goes into debt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson

from ..request_info import ClientKey, RequestInfo
from ..settings import Price, TokenBudget
from . import Limiter
from .budget import Allowance, TokenLimitExceeded, usd
from .charges import Charge, cost, estimate, from_usage

log = logging.getLogger("gateway.budget")

_JOINED = ("RateLimit-Policy", "RateLimit")
"""Structured-field lists: the tokens' policy joins the requests' one."""


class Spend:
    __slots__ = ("limiter", "key", "budget", "price", "reserved", "cut", "taken", "answered",
                 "settled")

    def __init__(self, limiter: Limiter, key: ClientKey, budget: TokenBudget,
                 price: Price | None, cut: bool) -> None:
        self.limiter = limiter
        self.key = key
        self.budget = budget
        self.price = price
        self.reserved = Charge(0, 0)
        self.cut = cut  # on_token_overrun = "cut"
        self.taken: Allowance | None = None
        self.answered = False  # the upstream's 2xx headers came: from here on, it costs
        self.settled = False

    async def reserve(self, info: RequestInfo, reserved: Charge, tell: bool = True) -> None:
        """Take the worst case, or raise the 429 that says which limit and when to retry;
        ``tell``: join the key's token state to the answer's headers (not for a socket's
        turn: its headers went out with the upgrade)."""
        self.reserved = reserved
        # Shielded: a client that leaves while the script runs must not leave a reservation
        # taken and never settled; it is given back as soon as it is known.
        taking = asyncio.ensure_future(
            self.limiter.reserve(self.key, reserved.tokens, reserved.ticks))
        try:
            taken = await asyncio.shield(taking)
        except asyncio.CancelledError:
            taking.add_done_callback(self._given_back)
            raise
        headers = taken.headers(self.budget, time.time()) if tell else {}
        if not taken.allowed:
            err = taken.refusal(self.budget, reserved.tokens, reserved.ticks)
            said = dict(info.limit_headers)
            _join_headers(said, headers)
            err.headers = {**said, **err.headers}
            raise err
        self.taken = taken
        _join_headers(info.limit_headers, headers)

    def _given_back(self, taking: asyncio.Future[Allowance]) -> None:
        if taking.cancelled() or taking.exception() is not None or not taking.result().allowed:
            return
        self.taken, self.settled = taking.result(), True
        reserved = self.reserved
        _refunds.add(refund := asyncio.ensure_future(
            self.limiter.settle(self.key, self.taken, -reserved.tokens, -reserved.ticks)))
        refund.add_done_callback(_refunded)

    async def settle(self, info: RequestInfo, usage: dict[str, Any] | None,
                     relayed: int) -> Allowance | None:
        """Once: the truth (or the estimate from ``relayed`` output tokens) replaces the
        reservation. A backend that fails here leaves the worst case charged, and says so."""
        if self.settled or self.taken is None:
            return None
        self.settled = True
        truth = self._truth(usage, relayed)
        info.charge = truth if info.charge is None else info.charge.plus(truth)  # a socket's
        try:
            return await self.limiter.settle(self.key, self.taken,
                                             truth.tokens - self.reserved.tokens,
                                             truth.ticks - self.reserved.ticks)
        except Exception as e:  # noqa: BLE001 (the answer is given; the worst case stands)
            log.warning("request %s: settling key %s's tokens failed (%s): the reservation "
                        "stands", info.request_id, self.key.name, type(e).__name__)
            return None

    def _truth(self, usage: dict[str, Any] | None, relayed: int) -> Charge:
        if not self.answered:
            return Charge(0, 0)
        if usage is not None and (truth := from_usage(usage, self.price)) is not None:
            return truth
        return estimate(self.reserved, relayed, self.price)

    def over(self, usage: dict[str, Any] | None, events: int) -> TokenLimitExceeded | None:
        """With "cut": the error that ends a stream whose running count passed what the key
        had left when it was reserved: the running usage where the upstream sends one (xAI
        does on every chunk unasked), else a token per event relayed."""
        taken = self.taken
        if taken is None:
            return None
        running = None if usage is None else from_usage(usage, self.price)
        output = events if running is None else running.output
        prompt = self.reserved.prompt if running is None else running.prompt
        if 0 <= taken.left_tokens < prompt + output or \
                0 <= taken.left_ticks < cost(self.price, prompt, output, 0):
            return TokenLimitExceeded("This stream passed what its key had left of its token "
                                      "or spend limit, and ends here")
        return None

    def comment(self, info: RequestInfo, after: Allowance | None) -> bytes:
        """The ``: usage {...}`` comment a stream ends with (every SSE client skips it)."""
        truth = info.charge
        if truth is None:
            return b""
        fields: dict[str, Any] = {"prompt_tokens": truth.prompt,
                                  "completion_tokens": truth.output,
                                  "total_tokens": truth.tokens}
        if truth.ticks or self.price is not None:
            fields["cost_usd"] = round(usd(truth.ticks), 10)
        if after is not None:
            fields.update(after.remaining(self.budget))
        return b": usage " + orjson.dumps(fields) + b"\n\n"


_refunds: set[asyncio.Future[Any]] = set()
"""Refunds of reservations whose request was gone before it knew it had one (held: a task
nobody holds may be collected before it ends)."""


def _refunded(refund: asyncio.Future[Any]) -> None:
    _refunds.discard(refund)
    if not refund.cancelled() and refund.exception() is not None:
        log.warning("a reservation given back failed (%s): it stands",
                    type(refund.exception()).__name__)


def _join_headers(headers: dict[str, str], tokens: dict[str, str]) -> None:
    for name, value in tokens.items():
        current = headers.get(name)
        headers[name] = f"{current}, {value}" if current and name in _JOINED else value
