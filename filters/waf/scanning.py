"""Value scanning: transformations and the RE2-Set prefilter over a request's values.

A rule whose pattern the prefilter did not see in any value it reads is not run at all. The
*universe pass* scans, once per request, every variable any prefiltered rule reads, for every
transformation pipeline at once; values met in earlier requests reuse their results
(caches.py). Only "not a candidate" is ever acted on: a candidate is confirmed by the rule's
own operator.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from filters.waf import prefilter
from filters.waf.caches import SHARED_MAX, ValueCaches
from filters.waf.prefilter import MAX_SCAN
from filters.waf.request import RequestVariables
from filters.waf.transforms import PLAIN_VALUE
from filters.waf.variables import SCALARS

if TYPE_CHECKING:  # pragma: no cover
    from filters.waf.rules import Pipeline
    from filters.waf.ruleset import Ruleset

NO_CANDIDATES: frozenset[int] = frozenset()


def union_candidates(sets: list[Any]) -> Any:
    """Union of candidate sets (prefilter.ALL absorbs); never mutates its inputs."""
    sets = [c for c in sets if c]
    if not sets:
        return NO_CANDIDATES
    if len(sets) == 1:
        return sets[0]
    for c in sets:
        if c is prefilter.ALL:
            return c
    return frozenset().union(*sets)


class ValueScanner(RequestVariables):
    """Request variables plus the value-level work rules share: transformations (cached per
    pipeline prefix and value) and prefilter scans (candidate pattern ids per value, and the
    universe pass that rules most rules out at once)."""

    def __init__(self, ruleset: Ruleset, caches: ValueCaches | None, **request: Any) -> None:
        self.transform_cache_large: dict[
            tuple[int, bytes], bytes
        ] = {}  # values over SHARED_MAX: this request only
        self.scan_cache_large: dict[tuple[int, bytes], Any] = {}
        # (targets, pipeline, exclusions) -> [transformed values, joined-buffer candidates,
        # pattern id -> values (built when a rule first needs it)]
        self.target_scan_cache: dict[tuple, list] = {}
        self.universe_cache: dict[int, Any] = {}  # pipeline -> candidates of the universe pass
        super().__init__(ruleset, caches, **request)
        self.transform_cache = self.caches.transformed
        self.scan_cache = self.caches.scanned
        self.plain_cache = self.caches.plain

    def variables_changed(self) -> None:
        super().variables_changed()
        self.target_scan_cache.clear()
        self.universe_cache.clear()

    def transform(self, v: bytes, p: Pipeline) -> bytes:
        """``v`` through pipeline ``p``, cached per (pipeline prefix, value) for the request."""
        if p.fn is None:
            return v
        if p.plain_identity:
            pl = self.plain_cache.get(v)
            if pl is None:
                pl = PLAIN_VALUE.match(v) is not None
                if len(v) <= SHARED_MAX:
                    self.plain_cache[v] = pl
            if pl:
                return v
        c = self.transform_cache if len(v) <= SHARED_MAX else self.transform_cache_large
        r = c.get((p.idx, v))
        if r is not None:
            return r
        todo = [p]
        q = p.parent
        r = v
        while q is not None and q.fn is not None:
            hit = c.get((q.idx, v))
            if hit is not None:
                r = hit
                break
            todo.append(q)
            q = q.parent
        for q in reversed(todo):
            r = q.fn(r)  # type: ignore[misc]  # every q in todo passed the loop's q.fn is not None
            c[(q.idx, v)] = r
        return r

    def universe_candidates(self, p: Pipeline):
        """Candidate pattern ids over the variables the prefiltered rules read, for every
        pipeline at once (pattern ids are unique to a pipeline's Set, multiMatch steps aside,
        where it only widens which steps are tried): one pass over the request's variables.

        A value met in an earlier request (client headers, cookie and argument names) keeps
        its Set results, over every pipeline that reads its variable, per (variable group, raw
        value) across requests; new values are transformed and scanned per pipeline joined by
        newlines (a pattern that matches one of them also matches the joined buffer). Only
        "not a candidate" is acted on."""
        rs = self.ruleset
        caches = self.caches
        gc = caches.universe_results
        seen = caches.universe_seen
        caches.universe_pass += 1
        serial = caches.universe_pass  # this pass: tells its own values from earlier passes' in universe_seen
        big = SHARED_MAX
        plist = rs.pipeline_list
        tf = self.transform
        cand = self.candidates
        plain = self.plain_cache
        s = self.scalars
        found: list[Any] = []
        fresh: dict[int, list[bytes]] = {}
        for coll, grp, keyed in rs.universe_plan:
            v = s.get(coll)
            if v is not None:
                pairs: Any = ((grp, v),)
            elif coll == "XML":
                pairs = [(grp, x) for x in self.xml_text] + [(grp, x) for x in self.xml_attrs]
            elif coll in SCALARS:
                continue
            else:
                items = self.collection(coll)
                if not items:
                    continue
                if keyed:
                    pairs = [(keyed.get(k.lower(), grp), x) for k, x in items]
                else:
                    pairs = [(grp, x) for _, x in items]
            for g, v in pairs:
                pipes = g[1]
                if not pipes:
                    continue
                k = (g[0], v)
                c = gc.get(k)
                if c is not None:
                    if c:
                        found.append(c)
                    continue
                met = seen.get(k)
                if met == serial:
                    continue  # the same value of the same variable group: already in this pass
                if met is not None:  # met in an earlier pass: keep its own results
                    cs = [cand(q, tf(v, plist[q])) for q in pipes]
                    c = gc[k] = union_candidates(cs)
                    if c:
                        found.append(c)
                else:
                    if len(v) <= big:
                        seen[k] = serial
                    # a plain value (see PLAIN_VALUE) is its own transform in plain-identity pipelines
                    pv = plain.get(v)
                    if pv is None:
                        pv = PLAIN_VALUE.match(v) is not None
                        if len(v) <= big:
                            plain[v] = pv
                    for q in pipes:
                        pq = plist[q]
                        tv = v if (pv and pq.plain_identity) else tf(v, pq)
                        fl = fresh.get(q)
                        if fl is None:
                            fresh[q] = [tv]
                        else:
                            fl.append(tv)
        for q, fl in fresh.items():
            c = self.scan_values(q, fl)
            if c:
                found.append(c)
        r = union_candidates(found)
        uc = self.universe_cache
        for q in rs.universe_pipelines:
            uc[q] = r
        uc[p.idx] = r
        return r

    def scan_values(self, pidx: int, values: list[bytes]) -> Any:
        """Candidates of pipeline ``pidx`` over several values: joined by newlines (a pattern
        that matches one value also matches the joined buffer; patterns run multi-line, so ^/$
        hold at value edges), in pieces no longer than the Set scans whole, so a thousand short
        values never make one buffer too long to rule anything out."""
        if len(values) == 1:
            return self.candidates(pidx, values[0])
        found: list[Any] = []
        piece: list[bytes] = []
        size = 0
        for v in values:
            n = len(v) + 1
            if piece and size + n > MAX_SCAN:
                found.append(self.candidates(pidx, piece[0] if len(piece) == 1 else b"\n".join(piece)))
                piece, size = [], 0
            piece.append(v)
            size += n
        if piece:
            found.append(self.candidates(pidx, piece[0] if len(piece) == 1 else b"\n".join(piece)))
        return union_candidates(found)

    def candidates(self, pidx: int, v: bytes):
        """Pattern ids of pipeline ``pidx`` that match ``v`` (or prefilter.ALL)."""
        key = (pidx, v)
        sc = self.scan_cache if len(v) <= SHARED_MAX else self.scan_cache_large
        r = sc.get(key)
        if r is None:
            ps = self.ruleset.prefilter.get(pidx)
            r = sc[key] = ps.scan(v) if ps is not None else prefilter.ALL
        return r
