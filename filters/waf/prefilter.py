"""Multi-pattern prefilter: per transformation pipeline, the patterns of every ``@rx``/``@pm``
rule that uses that pipeline, in RE2 Sets of at most ``GROUP_SIZE`` patterns.

One Set scan of a transformed value (a single lazy-DFA pass, linear in the value) says which
patterns match; the engine then runs only those rules' RE2 (for captures and the exact match).
The Set has RE2's own semantics, so it can never disagree with the confirming RE2 match.

Why small Sets: a Set's lazy DFA builds its states as values meet them, and a state of a Set
of many patterns stands for the product of every pattern's position: with CRS's ~180
untransformed patterns in one Set, new states kept being built on every never-seen value
(12 µs per byte scanned, ~10 ms of a request's CPU on the CRS regression corpus), and the
state cache never settled. Sets of 8 patterns scan each value a few more times, but their
states are few and are built once: 4-12x less Set CPU on never-seen values, 5x less memory.

Why not hyperscan: it compiles CRS's large patterns in tens of seconds, and on some inputs it
disagreed with PCRE/RE2 (CRS 942210 on a 100-byte key: no match where RE2 matches), which for a
prefilter means a missed attack. Values longer than ``MAX_VALUE_SCAN`` skip the Set (each rule
then runs its own RE2, still linear time); values joined for one scan stay under ``MAX_SCAN``
(scanning.py). Every Set ends with a pattern every text matches (``SENTINEL``): RE2 reports a
DFA that ran out of memory as "no match", which without it would read as "no candidates".
"""

from __future__ import annotations

import logging
from typing import Any

import re2

log = logging.getLogger("portvakt.waf")

MAX_SCAN = 8192  # bytes of values joined into one buffer (scanning.py)
MAX_VALUE_SCAN = 1 << 20  # a single value longer than this is not scanned: every pattern is a candidate
SENTINEL = rb"\z"  # last pattern of every Set: a result without it means the Set failed
GROUP_SIZE = 8  # patterns per RE2 Set (see the module docstring)
SET_MEM = 64 << 20  # RE2 budget per Set: an upper bound, allocated only as DFA states are built
Pattern = tuple[int, int, list[bytes], bool]  # (pipeline idx, pattern id, sources, caseless literals)


class AllPatterns:
    """Stands for "every pattern may match" (value too long for the Set, or the Set failed)."""

    __slots__ = ()

    def __contains__(self, _pid: object) -> bool:
        return True

    def __bool__(self) -> bool:
        return True


ALL = AllPatterns()


class PipelineSet:
    """The Sets of one pipeline: ``groups`` holds (the Set's Match, the pattern id of each of
    its indexes)."""

    __slots__ = ("groups",)

    def __init__(self, groups: list[tuple[re2.Set, list[int]]]):
        self.groups = tuple((rset.Match, pids) for rset, pids in groups)

    @property
    def pids(self) -> list[int]:
        return [pid for _, pids in self.groups for pid in pids]

    def scan(self, value: bytes):
        return scan_groups(self.groups, value)


def scan_groups(groups: Any, value: bytes) -> Any:
    """The pattern ids of ``groups`` (some or all of a PipelineSet's) that match ``value``, or
    ALL."""
    if len(value) > MAX_VALUE_SCAN:
        return ALL
    found: set[int] = set()
    try:
        for match, pids in groups:
            hits = match(value)
            # index len(pids) is the SENTINEL, which every text matches: without it in the
            # result the Set failed (RE2 reports a DFA out of memory as "no match")
            if not hits or len(pids) not in hits:
                return ALL
            if len(hits) > 1:
                n = len(pids)
                found.update([pids[i] for i in hits if i != n])
    except Exception:  # pragma: no cover - DFA budget exhausted: be conservative
        return ALL
    return found


def set_options() -> re2.Options:
    opts = re2.Options()
    opts.encoding = re2.Options.Encoding.LATIN1
    opts.max_mem = SET_MEM
    return opts


def build(patterns: list[Pattern]) -> tuple[set[int], dict[int, PipelineSet]]:
    """Compile each pipeline's Sets. Returns (pattern ids the Sets cannot judge, sets)."""
    unsafe: set[int] = set()
    building: dict[int, list[tuple[re2.Set, list[int]]]] = {}
    for pidx, pid, srcs, caseless in patterns:
        groups = building.setdefault(pidx, [])
        if not groups or len(groups[-1][1]) >= GROUP_SIZE:
            groups.append((re2.Set.SearchSet(set_options()), []))
        rset, pids = groups[-1]
        pat = (b"(?i)(?:" + b"|".join(srcs) + b")") if caseless else (b"(?sm)" + srcs[0])
        try:
            idx = rset.Add(pat)
        except Exception:
            unsafe.add(pid)
            continue
        if idx != len(pids):  # pragma: no cover - defensive: indices must be dense
            raise RuntimeError("RE2 Set index mismatch")
        pids.append(pid)
    out: dict[int, PipelineSet] = {}
    for pidx, groups in building.items():
        compiled = []
        for rset, pids in groups:
            if not pids:
                continue
            try:
                if rset.Add(SENTINEL) != len(pids):  # pragma: no cover - defensive
                    raise RuntimeError("RE2 Set index mismatch")
                rset.Compile()
            except Exception:  # pragma: no cover
                log.warning("RE2 Set compile failed for pipeline %d: those rules run without prefilter", pidx)
                unsafe.update(pids)
                continue
            compiled.append((rset, pids))
        if compiled:
            out[pidx] = PipelineSet(compiled)
    return unsafe, out
