"""The operator's secrets, and where a part of one may hide in what an upstream sends.

A part is any ``PART_CHARS`` consecutive characters of a secret (``gateway/errors.py``, whose
``redact`` takes every run of them out of a parsed string). ``Secrets.may_be_in`` tells, cheaply
enough for every upstream read, whether bytes may hold one; it never says no where they do, so
a read it clears may pass as it came, and one it does not goes to the exact path, which decides
on the parsed event (``gateway/stream/render.py``). Measured costs: ``docs/performance.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from ..errors import PART_CHARS

_COMMON = (b' "{}:,[]_.-/0123456789', b"etaoinsrhldcumfpgykxbjq", b"wvz")
"""Bytes an upstream's events hold often, in tiers, the most common first: JSON's own, the
separators and digits of ids and counts; lower case, which English and the events' own names
spell (``object``, ``index``, ``sequence_number``); the lower case they seldom spell. Capitals
and the rest are rarer still. A secret's probes are chosen by it (``_probes``): only a guide to
what costs least, never a decision about an event."""
_WORTH = [next((8 ** tier for tier, common in enumerate(_COMMON) if b in common),
               8 ** len(_COMMON)) for b in range(256)]
"""How much a byte is worth as a probe: eight times as much for each tier rarer."""
_FEW_PROBES = 8
_PROBE_COST = 1024
"""Where a read holds few probe bytes (``_FEW_PROBES``, or one per ``_PROBE_COST`` bytes for
each anchor), each one is looked at where it is; past that, the read is searched for the
anchors, in C, whatever its bytes: the cost of a read is bounded either way."""
_LONG_READ = 512
"""A read longer than this for each probe is searched for each probe byte (memchr) rather
than copied without them (``translate``): past it, that is cheaper
(``docs/performance.md``)."""
_ANCHOR_CHARS = 4
_ANCHOR_SPACING = 32
"""Past one place an anchor is found for each this many bytes of a read, the exact path takes
the read: following a run costs a fraction of a microsecond, parsing the events of those bytes
some tens (``docs/performance.md``)."""


@dataclass(frozen=True, slots=True, repr=False, eq=False)
class Secrets:
    """Strings that must never reach a client (the operator's key), nor any ``PART_CHARS``
    consecutive characters of them (``redact``, ``gateway/errors.py``, takes those out of a
    parsed string). Built once, where the operator's key is known (``UpstreamClient``), and
    handed as one value to everything that passes on what an upstream says. Its ``repr`` tells
    how many, never what they are.

    ``may_be_in`` says, cheaply enough for every upstream read, whether bytes may hold a part:
    never False where they do. Every ``PART_CHARS``-byte run of a secret holds one of its
    ``probes``, a few of its bytes chosen as the rarest in an upstream's events
    (``_COMMON``), so bytes with no probe in them (found in C: nearly every read) hold no
    part. Where a few probes are, the run of the secret's bytes around each is followed from
    each place the probe holds in a secret (``at``), once the four bytes on either side of it
    are found among the secret's (``quads``); where many are, the read is searched for the
    ``anchors``, runs of ``_ANCHOR_CHARS`` bytes so placed that every part holds one, and the
    run is followed around each place one is found (``anchored``): an anchor alone, such as a
    word the secret shares with an upstream's ids, sends nothing to the exact path.

    A part spelled with JSON escapes is not in the bytes at all: ``escapable`` says when a
    secret holds a character that JSON may escape without ``\\u`` (``/``, a quote, a
    backslash), so that whoever reads escapes checks the parsed strings (``may_hold``)."""

    text: tuple[str, ...] = ()
    probes: bytes = b""
    singles: tuple[bytes, ...] = ()  # the probes, one by one
    at: dict[int, tuple[tuple[bytes, int], ...]] = field(default_factory=dict)
    quads: frozenset[bytes] = frozenset()  # every 4-byte run of a secret
    anchors: tuple[bytes, ...] = ()
    anchored: dict[bytes, tuple[tuple[bytes, int], ...]] = field(default_factory=dict)
    marks: bytes = b""  # a translate table: a probe byte to 1, any other to 0
    escapable: bool = False
    alphabet: frozenset[int] = frozenset()  # every byte any secret holds
    long_read: int = 0  # past this length a read is searched probe by probe (``_LONG_READ``)

    @classmethod
    def of(cls, *secrets: str) -> Secrets:
        text = tuple(s for s in secrets if s)
        raw = [s.encode() for s in text]
        if any(len(r) < PART_CHARS for r in raw):
            raise ValueError(f"a secret of fewer than {PART_CHARS} characters would be found "
                             f"in ordinary text")
        probes = _probes(raw)
        at: dict[int, list[tuple[bytes, int]]] = {}
        for r in raw:
            for i, b in enumerate(r):
                if b in probes:
                    at.setdefault(b, []).append((r, i))
        stride = PART_CHARS + 1 - _ANCHOR_CHARS
        anchors = tuple({r[o:o + _ANCHOR_CHARS]: None for r in raw
                         for o in range(0, len(r) - _ANCHOR_CHARS + 1, stride)})
        anchored: dict[bytes, list[tuple[bytes, int]]] = {a: [] for a in anchors}
        for r in raw:
            for j in range(len(r) - _ANCHOR_CHARS + 1):
                if r[j:j + _ANCHOR_CHARS] in anchored:
                    anchored[r[j:j + _ANCHOR_CHARS]].append((r, j))
        return cls(text, probes, tuple(bytes([b]) for b in probes),
                   {b: tuple(where) for b, where in at.items()},
                   frozenset(r[j:j + 4] for r in raw for j in range(len(r) - 3)),
                   anchors, {a: tuple(where) for a, where in anchored.items()},
                   bytes(int(b in probes) for b in range(256)),
                   any(b in b'"/\\' or b < 0x20 for r in raw for b in r),
                   frozenset(b for r in raw for b in r), _LONG_READ * len(probes))

    def __repr__(self) -> str:
        return f"Secrets({len(self.text)} withheld)"

    def may_be_in(self, data: bytes, clean: bytes = b"") -> bool:
        """Whether ``data`` may hold ``PART_CHARS`` consecutive bytes of a secret: False only
        where it holds none; True where it does, and, past a few probes, maybe where not."""
        probes = self.probes
        if not probes or (len(data) <= self.long_read
                          and len(data.translate(None, probes)) == len(data)):
            return False
        return self.near_probes(data, clean)

    def near_probes(self, data: bytes, clean: bytes = b"") -> bool:
        """``may_be_in`` past its first test, for a caller that made it (the renderer's
        shortcut, where a method call on every read would cost more than the test): whether
        ``data``, which holds probe bytes or is longer than ``long_read``, holds a part around
        them. A long read is searched for each probe byte instead (memchr), which is cheaper
        there than a copy without them.

        ``clean``, when given, is bytes known to hold no part, the first and last of which no
        secret holds (``is_clean``): every copy of it in ``data`` is left out of the search
        (a stream's own id, in every event), which changes no answer. A part cannot hold
        either end of a copy, so it is wholly inside one, which holds none, or wholly outside
        all of them, where it is still found. A long read is copied without them only once it
        holds more than a few probe bytes."""
        if len(data) <= self.long_read:
            if clean:
                data = data.replace(clean, b"\n")
                if len(data.translate(None, self.probes)) == len(data):
                    return False  # the probes were all in its copies
            marked, budget = data.translate(self.marks), self._budget(data)
            # More probe bytes than the budget: straight to the anchors, none looked at.
            found = None if marked.count(1) > budget else self._around(data, marked, b"\x01",
                                                                        budget)
        elif not any(map(data.__contains__, self.singles)):
            return False
        else:
            found = self._around(data, data, self.probes,
                                 _FEW_PROBES if clean else self._budget(data))
            if found is None and clean:
                data = data.replace(clean, b"\n")
                found = self._around(data, data, self.probes, self._budget(data))
        if found is None:  # many probes: the anchors, found in C, the run followed around each
            return self._anchored(data)
        return found

    def _budget(self, data: bytes) -> int:
        """How many probe bytes of ``data`` to look at before the anchors cost less."""
        return max(_FEW_PROBES, len(data) * len(self.anchors) // _PROBE_COST)

    def _around(self, data: bytes, searched: bytes, wanted: bytes, budget: int) -> bool | None:
        """Whether a part of a secret is around one of the ``wanted`` bytes of ``searched``
        (``data``, or its probes marked); None past ``budget`` of them."""
        quads = self.quads
        for probe in wanted:
            at = searched.find(probe)
            while at != -1:
                budget -= 1
                if budget < 0:
                    return None
                # A part around the probe holds the four bytes that end at it, or those from
                # it on: a set lookup each, before the run is followed byte by byte.
                if (data[at:at + 4] in quads or data[at - 3:at + 1] in quads) \
                        and self._run_at(data, at):
                    return True
                at = searched.find(probe, at + 1)
        return False

    def _anchored(self, data: bytes) -> bool:
        """Whether a part of a secret is around one of the ``anchors`` in ``data``: every part
        holds one, so each place one is found, the run that matches a secret around it is
        followed from each place the anchor holds in one. Past a budget of places (a read made
        of a secret's own bytes), True: the exact path decides."""
        budget = max(_FEW_PROBES, len(data) // _ANCHOR_SPACING)
        for anchor in self.anchors:
            at = data.find(anchor)
            while at != -1:
                budget -= 1
                if budget < 0:
                    return True
                for secret, i in self.anchored[anchor]:
                    if _run_length(data, at, secret, i, _ANCHOR_CHARS) >= PART_CHARS:
                        return True
                at = data.find(anchor, at + 1)
        return False

    def is_clean(self, segment: bytes) -> bool:
        """Whether ``segment``, which holds no part, may be given to ``may_be_in`` as
        ``clean``: it is not empty, and no secret holds its first or its last byte."""
        return len(segment) > 1 and segment[0] not in self.alphabet \
            and segment[-1] not in self.alphabet

    def _run_at(self, data: bytes, at: int) -> bool:
        """Whether the probe byte at ``at`` is inside a part of a secret: the run that matches
        the secret around it, from each place the byte holds in one, is ``PART_CHARS`` long."""
        return any(_run_length(data, at, secret, i, 1) >= PART_CHARS
                   for secret, i in self.at[data[at]])

    def may_hold(self, raw: bytes, parsed: Any) -> bool:
        """Whether an upstream's JSON may hold a part of a secret as its reader decodes it:
        looked for in its bytes and, when they hold escapes and the value was parsed, in the
        canonical encoding orjson writes of it, which spells a secret's characters as they are
        unless ``escapable`` (then only its parsed strings can tell: True)."""
        if self.may_be_in(raw):
            return True
        if parsed is None or b"\\" not in raw:
            return False
        return self.escapable or self.may_be_in(orjson.dumps(parsed))


def _run_length(data: bytes, at: int, secret: bytes, i: int, size: int) -> int:
    """How long the run of ``data`` that matches ``secret`` around ``data[at:at + size]``, which
    is ``secret[i:i + size]``, goes on, both ways."""
    start, k = at, i
    while start > 0 and k > 0 and data[start - 1] == secret[k - 1]:
        start, k = start - 1, k - 1
    end, k = at + size, i + size
    while end < len(data) and k < len(secret) and data[end] == secret[k]:
        end, k = end + 1, k + 1
    return end - start


def _probes(secrets: list[bytes]) -> bytes:
    """Bytes of the secrets such that each ``PART_CHARS``-byte run of one holds one of them,
    few and rare: a greedy cover of the runs, each byte weighed by the runs it covers and how
    seldom an upstream's events hold it (``_COMMON``), since each of its bytes an event holds
    costs a look."""
    runs = [frozenset(s[j:j + PART_CHARS]) for s in secrets
            for j in range(len(s) - PART_CHARS + 1)]
    chosen: set[int] = set()
    while runs:
        worth: dict[int, int] = {}
        for run in runs:
            for b in run:
                worth[b] = worth.get(b, 0) + _WORTH[b]
        best = max(sorted(worth), key=worth.__getitem__)
        chosen.add(best)
        runs = [run for run in runs if best not in run]
    return bytes(sorted(chosen))


NO_SECRETS = Secrets()
