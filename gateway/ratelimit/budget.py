"""Token and spend limits: what a key has left, what the client is told, and the in-process
book that keeps them as ``budget.lua`` keeps them in Redis. Pure: no I/O.

A key may have tokens per minute (a bucket that refills continuously, as the providers' own
TPM limits do, and may go into debt), tokens per day, and dollars per day and per month (UTC
days and months; counted in xAI's ticks, 10^-10 USD, so that an exact charge stays exact). A
request reserves its worst case before the upstream call and is settled to the truth when its
answer ends (``gateway/ratelimit/spend.py``); both are one atomic step of the backend.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from typing import Any

from ..errors import RateLimited
from ..settings import TokenBudget

TICKS_PER_USD = 10**10
"""xAI's ``cost_in_usd_ticks``: 1 USD is 10^10 ticks."""
DAY = 86400

_REFUSED_BY = ("", "tokens_per_minute", "tokens_per_day", "usd_per_day", "usd_per_month",
               "tokens_too_large", "usd_too_large")


def openai_duration(seconds: float) -> str:
    """OpenAI's reset format: ``1m30s``, ``6s``, ``120ms``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    minutes, secs = divmod(seconds, 60)
    if minutes >= 1:
        whole = int(secs)
        return f"{int(minutes)}m{whole}s" if whole else f"{int(minutes)}m"
    return f"{secs:.3g}s" if secs != int(secs) else f"{int(secs)}s"


class TokenLimitExceeded(RateLimited):
    code = "token_limit_exceeded"


class QuotaExceeded(RateLimited):
    """OpenAI's answer for a spent quota (``insufficient_quota``), which its SDKs name."""

    type = "insufficient_quota"
    code = "insufficient_quota"


def ticks(usd: float) -> int:
    return round(usd * TICKS_PER_USD)


def usd(ticks_: int) -> float:
    return ticks_ / TICKS_PER_USD


@dataclass(frozen=True, slots=True)
class Allowance:
    """What a reservation or a settlement found (``budget.lua``'s reply); -1: no such limit."""

    allowed: bool
    refused_by: str
    retry_after: float  # seconds; -1: never (the request alone is past a limit)
    tpm_left: int
    tpm_reset: float  # seconds until the minute's bucket is full
    tpd_left: int
    usd_day_left: int  # ticks
    usd_month_left: int  # ticks
    day: int  # the UTC day (since 1970-01-01) and month (since 1970-01) it was taken in
    month: int
    left_tokens: int  # before this reservation: the fewest tokens a token limit had left
    left_ticks: int  # and the fewest ticks a dollar limit had left
    local: bool = False  # taken by this process's books, not Redis': settled there too

    @classmethod
    def from_reply(cls, reply: Any) -> Allowance:
        (allowed, refused, retry_ms, tpm_left, tpm_reset_ms, tpd_left, day_left, month_left,
         day, month, left_tokens, left_ticks) = (int(v) for v in reply)
        return cls(bool(allowed), _REFUSED_BY[refused],
                   -1.0 if retry_ms < 0 else retry_ms / 1000, tpm_left, tpm_reset_ms / 1000,
                   tpd_left, day_left, month_left, day, month, left_tokens, left_ticks)

    def headers(self, budget: TokenBudget, now: float) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*-tokens`` (the minute's limit, else the day's) and the
        ``"tokens"`` policy of the IETF fields, to be joined to the requests' ones."""
        if budget.tokens_per_minute:
            limit, left, reset, window = budget.tokens_per_minute, self.tpm_left, \
                self.tpm_reset, 60
        elif budget.tokens_per_day:
            limit, left, reset, window = budget.tokens_per_day, self.tpd_left, \
                (self.day + 1) * DAY - now, DAY
        else:
            return {}
        return {"x-ratelimit-limit-tokens": str(limit),
                "x-ratelimit-remaining-tokens": str(left),
                "x-ratelimit-reset-tokens": openai_duration(reset),
                "RateLimit-Policy": f'"tokens";q={limit};w={window}',
                "RateLimit": f'"tokens";r={left};t={max(0, math.ceil(reset))}'}

    def remaining(self, budget: TokenBudget) -> dict[str, Any]:
        """What the stream's closing ``: usage`` comment tells of the key (the limits set)."""
        out: dict[str, Any] = {}
        if budget.tokens_per_minute:
            out["remaining_tokens_minute"] = self.tpm_left
        if budget.tokens_per_day:
            out["remaining_tokens_day"] = self.tpd_left
        if budget.usd_per_day:
            out["remaining_usd_day"] = round(usd(self.usd_day_left), 10)
        if budget.usd_per_month:
            out["remaining_usd_month"] = round(usd(self.usd_month_left), 10)
        return out

    def refusal(self, budget: TokenBudget, tokens: int, cost: int) -> RateLimited:
        """The 429 for a refused reservation of ``tokens`` costing ``cost`` ticks."""
        retry = max(1, math.ceil(self.retry_after))
        headers = {} if self.retry_after < 0 else {
            "Retry-After": str(retry),
            "retry-after-ms": str(max(1, round(self.retry_after * 1000)))}
        need = f"this request needs up to {tokens:,} tokens (its output cap and its prompt)"
        spend = f"this request may cost up to {_dollars(cost)}"
        match self.refused_by:
            case "tokens_per_minute":
                return TokenLimitExceeded(
                    f"Token rate limit reached: this key may use {budget.tokens_per_minute:,} "
                    f"tokens a minute and has {max(0, self.left_tokens):,} left; {need}; retry "
                    f"in {retry}s", headers=headers)
            case "tokens_per_day":
                return TokenLimitExceeded(
                    f"Daily token limit reached: this key may use {budget.tokens_per_day:,} "
                    f"tokens a day (UTC) and has {self.tpd_left:,} left; {need}; retry in "
                    f"{retry}s", headers=headers)
            case "usd_per_day" | "usd_per_month":
                per, limit, left = ("day", budget.usd_per_day, self.usd_day_left) \
                    if self.refused_by == "usd_per_day" else \
                    ("month", budget.usd_per_month, self.usd_month_left)
                return QuotaExceeded(
                    f"Spend limit reached: this key may spend {_dollars(ticks(limit))} a {per} "
                    f"(UTC) and has {_dollars(left)} left; {spend}; retry in {retry}s",
                    headers=headers)
            case "usd_too_large":
                return QuotaExceeded(
                    f"This request may cost up to {_dollars(cost)}, more than this key may "
                    f"spend at all ({_limits_text(budget)}): ask for fewer output tokens "
                    f"(max_tokens)", headers=headers)
        return TokenLimitExceeded(
            f"This request needs up to {tokens:,} tokens, more than this key's limit "
            f"({_limits_text(budget)}): ask for fewer output tokens (max_tokens) or send a "
            f"shorter prompt", headers=headers)


def _dollars(ticks_: int) -> str:
    """USD with the cents, and as many more digits as a small amount needs: ``$0.000125``."""
    value = usd(ticks_)
    return f"${value:,.2f}" if value >= 1 or value == 0 else f"${value:.6g}"


def _limits_text(budget: TokenBudget) -> str:
    parts = []
    if budget.tokens_per_minute:
        parts.append(f"{budget.tokens_per_minute:,} tokens a minute")
    if budget.tokens_per_day:
        parts.append(f"{budget.tokens_per_day:,} tokens a day")
    if budget.usd_per_day:
        parts.append(f"{_dollars(ticks(budget.usd_per_day))} a day")
    if budget.usd_per_month:
        parts.append(f"{_dollars(ticks(budget.usd_per_month))} a month")
    return ", ".join(parts)


def day_and_month(unix_seconds: float) -> tuple[int, int, float, float]:
    """The UTC day and month of a time (as ``budget.lua`` numbers them) and when each ends."""
    day = int(unix_seconds // DAY)
    date = datetime.date(1970, 1, 1) + datetime.timedelta(days=day)
    month = (date.year - 1970) * 12 + date.month - 1
    nxt = datetime.date(date.year + date.month // 12, date.month % 12 + 1, 1)
    return day, month, (day + 1) * DAY, (nxt - datetime.date(1970, 1, 1)).days * DAY


@dataclass(slots=True)
class _Book:
    tpm: float = 0.0
    tpm_at: float = 0.0
    day: int = -1
    day_tokens: int = 0
    day_ticks: int = 0
    month: int = -1
    month_ticks: int = 0


class BudgetBook:
    """The in-process budgets (the embedded default, and the fallback while Redis is down):
    ``budget.lua``'s arithmetic, line for line, with the wall clock (UTC days need it)."""

    def __init__(self) -> None:
        self._books: dict[str, _Book] = {}

    def reserve(self, name: str, budget: TokenBudget, tokens: int, cost: int, now: float
                ) -> Allowance:
        return self._apply(name, budget, tokens, cost, now, None)

    def settle(self, name: str, budget: TokenBudget, tokens: int, cost: int, now: float,
               taken: Allowance) -> Allowance:
        return self._apply(name, budget, tokens, cost, now, taken)

    def _apply(self, name: str, budget: TokenBudget, tokens: int, cost: int, now: float,
               taken: Allowance | None) -> Allowance:
        tpm, tpd = budget.tokens_per_minute, budget.tokens_per_day
        per_day, per_month = ticks(budget.usd_per_day), ticks(budget.usd_per_month)
        day, month, day_end, month_end = day_and_month(now)
        book = self._books.get(name) or _Book(tpm=float(tpm), tpm_at=now)
        bucket = min(tpm, book.tpm + max(0.0, now - book.tpm_at) * tpm / 60) if tpm else 0.0
        day_tokens, day_ticks = (book.day_tokens, book.day_ticks) if book.day == day else (0, 0)
        month_ticks = book.month_ticks if book.month == month else 0
        left_tokens = _fewest(bucket if tpm else -1, tpd - day_tokens if tpd else -1)
        left_ticks = _fewest(per_day - day_ticks if per_day else -1,
                             per_month - month_ticks if per_month else -1)
        refused, retry = 0, 0.0
        if taken is None:
            if (tpm and tokens > tpm) or (tpd and tokens > tpd):
                refused, retry = 5, -1.0
            elif (per_day and cost > per_day) or (per_month and cost > per_month):
                refused, retry = 6, -1.0
            elif tpm and bucket < tokens:
                refused, retry = 1, (tokens - bucket) * 60 / tpm
            elif tpd and day_tokens + tokens > tpd:
                refused, retry = 2, day_end - now
            elif per_day and day_ticks + cost > per_day:
                refused, retry = 3, day_end - now
            elif per_month and month_ticks + cost > per_month:
                refused, retry = 4, month_end - now
        if not refused:
            if tpm:
                bucket = min(tpm, bucket - tokens)
            if taken is None or taken.day == day:
                day_tokens, day_ticks = max(0, day_tokens + tokens), max(0, day_ticks + cost)
            if taken is None or taken.month == month:
                month_ticks = max(0, month_ticks + cost)
            self._books[name] = _Book(bucket, now, day, day_tokens, day_ticks, month,
                                      month_ticks)
        return Allowance(
            not refused, _REFUSED_BY[refused], retry if retry <= 0 else math.ceil(retry * 1000)
            / 1000, max(0, math.floor(bucket)) if tpm else -1,
            (tpm - bucket) * 60 / tpm if tpm else 0.0, max(0, tpd - day_tokens) if tpd else -1,
            max(0, per_day - day_ticks) if per_day else -1,
            max(0, per_month - month_ticks) if per_month else -1, day, month,
            math.floor(left_tokens), math.floor(left_ticks), local=True)

    def clear(self) -> None:
        self._books.clear()


def _fewest(a: float, b: float) -> float:
    if a < 0:
        return b
    if b < 0:
        return a
    return min(a, b)
