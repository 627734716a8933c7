"""Rounds and medians over them.

Each scenario runs the same load against every target round by round, the order rotating, so
that machine noise hits each alike; it reports medians over the rounds, and a proxy's latency
over direct as the median of the round-by-round differences (two targets measured in one round
saw the same machine).
"""

from __future__ import annotations

from typing import Any

from .processes import Target


def median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def rotated(items: list[Target], by: int) -> list[Target]:
    """The round's order: each target goes first in turn, so none always follows another."""
    by %= len(items)
    return items[by:] + items[:by]


def medians(runs: dict[str, list[dict[str, float]]], keys: tuple[str, ...],
            paired: tuple[str, ...] = (), digits: int = 3) -> dict[str, dict[str, Any]]:
    """Per target, the median over rounds of each of ``keys``; of ``paired`` (latencies), for
    each proxy also the median of its round-by-round difference from direct (``over_direct``)
    and the gateway's from nginx (``gateway_minus_nginx``)."""
    out: dict[str, dict[str, Any]] = {}
    for name, rounds in runs.items():
        out[name] = {k: round(median([r[k] for r in rounds]), digits) for k in keys if k in
                     rounds[0]}
    if not paired:
        return out
    for name, base in (*((n, "direct") for n in runs if n != "direct"), ("gateway", "nginx")):
        if name not in runs or base not in runs:
            continue
        diff = {k: round(median([a[k] - b[k] for a, b in zip(runs[name], runs[base],
                                                                strict=True)]), digits)
                for k in paired}
        if base == "direct":
            out[name]["over_direct"] = diff
        else:
            out["gateway_minus_nginx"] = diff
    return out
