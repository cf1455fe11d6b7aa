"""Multi-pattern prefilter: one RE2 Set per transformation pipeline, holding the patterns of
every ``@rx``/``@pm`` rule that uses that pipeline.

One Set scan of a transformed value (a single lazy-DFA pass, linear in the value) says which
patterns match; the engine then runs only those rules' RE2 (for captures and the exact match).
The Set has RE2's own semantics, so it can never disagree with the confirming RE2 match.

Why not hyperscan: it compiles CRS's large patterns in tens of seconds, and on some inputs it
disagreed with PCRE/RE2 (CRS 942210 on a 100-byte key: no match where RE2 matches), which for a
prefilter means a missed attack. Values longer than ``MAX_SCAN`` skip the Set (each rule then
runs its own RE2, still linear time) so the Set's DFA cache stays small.
"""

from __future__ import annotations

import logging

import re2

log = logging.getLogger("portvakt.waf")

MAX_SCAN = 8192
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
    __slots__ = ("set", "pids", "_match")

    def __init__(self, rset, pids: list[int]):
        self.set = rset
        self.pids = pids
        # the compiled RE2::Set's own Match (bytes in, list of indexes out), without the
        # wrapper's str check; the wrapper's Match when that object is not there
        inner = getattr(rset, "_set", None)
        self._match = getattr(inner, "Match", None) or rset.Match

    def scan(self, value: bytes):
        if len(value) > MAX_SCAN:
            return ALL
        try:
            hits = self._match(value)
        except Exception:  # pragma: no cover - DFA budget exhausted: be conservative
            return ALL
        pids = self.pids
        return {pids[i] for i in hits} if hits else set()


SMALL_SET_MEM = 64 << 20
LARGE_SET_MEM = 256 << 20
LARGE_SET = 64  # patterns


def set_options(n_patterns: int) -> re2.Options:
    """RE2 options for a Set of ``n_patterns``. A large Set (CRS's untransformed pipeline holds
    ~180 patterns, urlDecodeUni ~70) has DFA states that each stand for many NFA states: with
    64 MB, the lazy DFA's state cache filled on benign form bodies and RE2 threw it away and
    rebuilt it over and over (8 ms per KB scanned instead of ~0.1). The budget is an upper
    bound, allocated only as states are built (+26 MB RSS on the benign corpus)."""
    opts = re2.Options()
    opts.encoding = re2.Options.Encoding.LATIN1
    opts.max_mem = LARGE_SET_MEM if n_patterns >= LARGE_SET else SMALL_SET_MEM
    return opts


def build(patterns: list[Pattern]) -> tuple[set[int], dict[int, PipelineSet]]:
    """Compile one Set per pipeline. Returns (pattern ids the Sets cannot judge, sets)."""
    per_pipeline: dict[int, int] = {}
    for pat in patterns:
        per_pipeline[pat[0]] = per_pipeline.get(pat[0], 0) + 1
    unsafe: set[int] = set()
    building: dict[int, tuple[object, list[int]]] = {}
    for pidx, pid, srcs, caseless in patterns:
        entry = building.get(pidx)
        if entry is None:
            entry = building[pidx] = (re2.Set.SearchSet(set_options(per_pipeline[pidx])), [])
        pat = (b"(?i)(?:" + b"|".join(srcs) + b")") if caseless else (b"(?sm)" + srcs[0])
        try:
            idx = entry[0].Add(pat)
        except Exception:
            unsafe.add(pid)
            continue
        if idx != len(entry[1]):  # pragma: no cover - defensive: indices must be dense
            raise RuntimeError("RE2 Set index mismatch")
        entry[1].append(pid)
    out: dict[int, PipelineSet] = {}
    for pidx, (rset, pids) in building.items():
        if not pids:
            continue
        if rset.Compile() is False:  # pragma: no cover
            log.warning("RE2 Set compile failed for pipeline %d: those rules run without prefilter", pidx)
            unsafe.update(pids)
            continue
        out[pidx] = PipelineSet(rset, pids)
    return unsafe, out
