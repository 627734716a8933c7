"""What a request costs a key's token and spend limits: its worst case before the upstream call,
the truth from the upstream's usage after it, and an estimate when no usage came. Pure.

The worst case is OpenAI's own: the output cap the request names (``max_tokens``,
``max_completion_tokens`` or ``max_output_tokens``, the largest if several, else
``[limits] default_output_tokens``) plus the prompt estimated as its body's UTF-8 bytes / 4.
The truth is the usage's tokens (chat: ``total_tokens``; Responses: ``input_tokens +
output_tokens``) and, in dollars, xAI's ``cost_in_usd_ticks`` when the upstream sends it (its
exact charge, after discounts and server-side tools), else the usage at the model's prices.
Every number taken from an upstream's usage is bounded: it is the upstream's word, not a fact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..settings import Price

_OUTPUT_CAPS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
MOST_TOKENS = 10**12
"""No usage count is believed past this (a hostile upstream's 1e308 must not become a debt)."""
MOST_TICKS = 10**18


@dataclass(frozen=True, slots=True)
class Charge:
    tokens: int
    ticks: int
    prompt: int = 0  # the tokens of the prompt (estimated, or the usage's)
    output: int = 0  # of the answer, reasoning included

    def plus(self, other: Charge) -> Charge:
        """Two charges as one (a WebSocket's turns, for its log line and metrics)."""
        return Charge(self.tokens + other.tokens, self.ticks + other.ticks,
                      self.prompt + other.prompt, self.output + other.output)


def worst_case(body: dict[str, Any], body_bytes: int, default_output: int,
               price: Price | None) -> Charge:
    """What a request reserves before its upstream call."""
    caps = [v for name in _OUTPUT_CAPS if isinstance(v := body.get(name), int)
            and not isinstance(v, bool) and v > 0]
    output = min(max(caps), MOST_TOKENS) if caps else default_output
    prompt = -(-body_bytes // 4)
    return Charge(prompt + output, cost(price, prompt, output, 0), prompt, output)


def cost(price: Price | None, prompt: int, output: int, cached: int) -> int:
    """Ticks for these tokens at ``price`` (USD per million tokens; a tick is 10^-10 USD, so a
    token costs the price times 10^4 ticks); 0 without a price."""
    if price is None:
        return 0
    cached = min(cached, prompt)
    cached_price = price.input if price.cached_input is None else price.cached_input
    return math.ceil(((prompt - cached) * price.input + cached * cached_price
                      + output * price.output) * 10_000)


def from_usage(usage: dict[str, Any], price: Price | None) -> Charge | None:
    """The truth, from a chat or Responses usage object; None if it holds no token counts."""
    prompt = _count(usage, "prompt_tokens", "input_tokens")
    if prompt is None:
        return None
    total = _count(usage, "total_tokens", None)
    output = _count(usage, "output_tokens", None)  # Responses: reasoning within
    if output is None:
        # Chat: xAI leaves reasoning out of completion_tokens, but not out of total_tokens.
        completion = _count(usage, "completion_tokens", None) or 0
        output = max(completion, (total or 0) - prompt)
    tokens = prompt + output if total is None or "output_tokens" in usage else total
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    cached = _count(details, "cached_tokens", None) if isinstance(details, dict) else None
    exact = usage.get("cost_in_usd_ticks")
    if isinstance(exact, int) and not isinstance(exact, bool) and 0 <= exact <= MOST_TICKS:
        spent = exact
    else:
        spent = cost(price, prompt, output, cached or 0)
    return Charge(min(tokens, MOST_TOKENS), spent, prompt, output)


def estimate(reserved: Charge, output: int, price: Price | None) -> Charge:
    """An answer that ended without usage: the prompt as reserved and ``output`` tokens of
    answer (what was relayed), never more than the reservation's output cap."""
    output = min(output, reserved.output)
    return Charge(reserved.prompt + output, cost(price, reserved.prompt, output, 0),
                  reserved.prompt, output)


def _count(obj: dict[str, Any], name: str, other: str | None) -> int | None:
    value = obj.get(name)
    if value is None and other is not None:
        value = obj.get(other)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        return None
    return int(min(value, MOST_TOKENS))
