"""Which upstream a request tries first, and which next: pure (no I/O, no clock of its own), so
that weights and affinity are tested on their own.

- Models: an upstream serves the models its ``models`` patterns match (``fnmatch``, after the
  gateway's aliases: the name the upstream is sent).
- Weights, without affinity: smooth weighted round robin (nginx's) over the upstreams available
  now, so 3:1 is three of every four requests, evenly spread, with no randomness to wait out;
  the rest follow by weight, for failover.
- Affinity, with a key (a chat request's ``x-grok-conv-id``, a Responses request's
  ``prompt_cache_key``): weighted rendezvous hashing over the upstreams available now. xAI keeps
  its prompt cache per server: one conversation stays on one upstream as long as that one is
  available, moves when it is not, and comes back when it is; the others' keys do not move.
  The hash is BLAKE2b, not ``hash()``: every worker, and every restart, agrees.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, TypeVar


class Choosable(Protocol):
    name: str
    weight: float
    patterns: tuple[str, ...]
    current: float  # smooth weighted round robin's running weight


def serves(member: Choosable, model: str | None) -> bool:
    """Whether ``member`` serves ``model`` (a request without one goes anywhere)."""
    if model is None:
        return True
    return any(p == "*" or fnmatch.fnmatchcase(model, p) for p in member.patterns)


def covered(member: Choosable, others: Iterable[Choosable]) -> bool:
    """Whether every pattern of ``member`` is served by one of ``others`` too: only then may it
    go out (a pattern counts as served when another's pattern matches it as a name, so
    ``grok-*`` covers ``grok-4`` and ``*`` covers all; never more than that)."""
    others = list(others)
    return all(any(serves(o, p) for o in others) for p in member.patterns)


M = TypeVar("M", bound=Choosable)


def order(members: Sequence[M], affinity: str | None) -> list[M]:
    """``members`` (those available now) in the order to try them."""
    if len(members) <= 1:
        return list(members)
    if affinity is not None:
        return sorted(members, key=lambda m: _score(affinity, m), reverse=True)
    total = 0.0
    best = members[0]
    for m in members:
        m.current += m.weight
        total += m.weight
        if m.current > best.current:
            best = m
    best.current -= total
    return [best, *sorted((m for m in members if m is not best), key=lambda m: -m.weight)]


def _score(affinity: str, member: Choosable) -> float:
    """Weighted rendezvous: ``-weight / ln(u)``, ``u`` in (0, 1) from the key and the name."""
    digest = hashlib.blake2b(f"{member.name}\0{affinity}".encode("utf-8", "surrogatepass"),
                             digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 1) / (2**64 + 2)
    return -member.weight / math.log(u)


def union_of_lists(members: Sequence[Choosable], listings: Sequence[Any]) -> dict[str, Any]:
    """The model lists of several upstreams as one: each upstream's entries that its patterns
    serve, the first upstream's entry for an id listed twice. A listing that is not a list of
    models (an exception, for one that failed) is left out."""
    seen: dict[str, Any] = {}
    for member, listing in zip(members, listings, strict=True):
        data = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(data, list):
            continue
        for entry in data:
            if isinstance(entry, dict) and isinstance(entry.get("id"), str) \
                    and entry["id"] not in seen and serves(member, entry["id"]):
                seen[entry["id"]] = entry
    return {"object": "list", "data": list(seen.values())}
