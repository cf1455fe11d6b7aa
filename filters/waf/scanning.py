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
STEP_MEMO_MIN = 512  # bytes: shorter texts are transformed again rather than looked up


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
        self.step_memo: dict[tuple[Any, bytes], bytes] = {}  # (step function, long text) -> result
        self.sep_cache: dict[tuple[int, bytes], Any] = {}  # (pipeline, value) -> separator-pattern hits
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
        memo = self.step_memo
        for q in reversed(todo):
            if len(r) > STEP_MEMO_MIN:
                # another pipeline may have run this step on the same text (a step before it
                # was the identity): per request, (step, text) -> result
                k = (q.fn, r)
                t = memo.get(k)
                if t is None:
                    t = memo[k] = q.fn(r)  # type: ignore[misc]
                r = t
            else:
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
        s = self.scalars
        found: list[Any] = []
        fresh: dict[int, tuple[tuple[int, ...], list[bytes]]] = {}  # group id -> (pipelines, new values)
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
                    fg = fresh.get(g[0])
                    if fg is None:
                        fresh[g[0]] = (pipes, [v])
                    else:
                        fg[1].append(v)
        if fresh:
            found.extend(self.scan_fresh(fresh))
        r = union_candidates(found)
        uc = self.universe_cache
        for q in rs.universe_pipelines:
            uc[q] = r
        uc[p.idx] = r
        return r

    def scan_fresh(self, fresh: dict[int, tuple[tuple[int, ...], list[bytes]]]) -> list[Any]:
        """The universe pass's values never met before, per variable group: joined by newlines
        into pieces of at most ``MAX_SCAN`` raw bytes, each piece transformed once per pipeline
        step (a step's result shared by every pipeline that starts with it) where the step's
        batched form (transforms.batch_step) gives exactly the per-value results joined;
        otherwise, or when a piece outgrows what the Set scans, value by value as before."""
        steps = self.caches.batch_steps
        plist = self.ruleset.pipeline_list
        cand = self.candidates
        sep = self.caches.separator_sets
        memo: dict[tuple[int, int], Any] = {}  # (pipeline, piece number) -> batch_transform's state
        found: list[Any] = []
        serial = 0
        for pipes, raws in fresh.values():
            pieces = []  # (piece number, joined raw values, how many, the values)
            start = size = 0
            for i, v in enumerate(raws):
                n = len(v) + 1
                if i > start and size + n > MAX_SCAN:
                    pieces.append((serial, raws[start:i]))
                    serial += 1
                    start, size = i, 0
                size += n
            pieces.append((serial, raws[start:]))
            serial += 1
            joined = [(no, vs[0] if len(vs) == 1 else b"\n".join(vs), vs) for no, vs in pieces]
            for q in pipes:
                for no, j, vs in joined:
                    if len(vs) == 1:  # one value: its transformations are cached for the rules too
                        c = cand(q, self.transform(j, plist[q]))
                        if c:
                            found.append(c)
                        continue
                    tp = self.batch_transform(plist[q], no, j, len(vs), memo, steps)
                    if tp is None or len(tp) > MAX_SCAN:
                        c = self.scan_values(q, [self.transform(v, plist[q]) for v in vs])
                    else:
                        c = cand(q, tp)
                        if c and q in sep and tp.count(b"\n") == len(vs) - 1:
                            c = self.refine_joined(q, c, tp.split(b"\n"))
                    if c:
                        found.append(c)
        return found

    @staticmethod
    def batch_transform(
        p: Pipeline, no: int, j: bytes, n: int, memo: dict[tuple[int, int], Any], steps: list
    ) -> bytes | None:
        """Joined piece ``no`` (``n`` values joined by newlines) through pipeline ``p``, step by
        step from the longest prefix already done for this piece. A step runs once over the
        joined text where its batched form is exact for it; otherwise on each value (the
        joined text split at its newlines when no value holds one, or the values of the
        previous per-value step). None when neither is possible (a value with a newline meets
        a step without a batched form): the caller then transforms value by value."""
        todo = []
        q: Pipeline | None = p
        r: Any = j  # bytes: the joined results; list: the per-value results; None: give up
        while q is not None and q.fn is not None:
            k = (q.idx, no)
            if k in memo:
                r = memo[k]
                break
            todo.append(q)
            q = q.parent
        for q in reversed(todo):
            if r is not None:
                if type(r) is bytes:
                    st = steps[q.idx]
                    t = st(r, n) if st is not None else None
                    if t is None:
                        if r.count(b"\n") == n - 1:
                            f = q.fn
                            t = [f(x) for x in r.split(b"\n")]  # type: ignore[misc]
                        # else: None, a value holds a newline
                    r = t
                else:
                    f = q.fn
                    r = [f(x) for x in r]  # type: ignore[misc]
            memo[(q.idx, no)] = r
        if type(r) is list:
            return b"\n".join(r)
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
                found.append(self.scan_piece(pidx, piece))
                piece, size = [], 0
            piece.append(v)
            size += n
        if piece:
            found.append(self.scan_piece(pidx, piece))
        return union_candidates(found)

    def scan_piece(self, pidx: int, piece: list[bytes]) -> Any:
        if len(piece) == 1:
            return self.candidates(pidx, piece[0])
        return self.refine_joined(pidx, self.candidates(pidx, b"\n".join(piece)), piece)

    def refine_joined(self, pidx: int, found: Any, values: list[bytes]) -> Any:
        """Candidates ``found`` in ``values`` joined by newlines, without the patterns that
        match only because of a separator: a pattern that a lone newline matches (see
        ValueCaches.separator_sets) stays a candidate only if one of the values has it."""
        if found is prefilter.ALL or not found:
            return found
        sp = self.caches.separator_sets.get(pidx)
        if sp is None:
            return found
        pids, small = sp
        hit = pids.intersection(found)
        if not hit:
            return found
        seen: set[int] = set()
        cache = self.sep_cache
        for v in values:
            s = cache.get((pidx, v))
            if s is None:
                s = small.scan(v)
                if s is prefilter.ALL:
                    return found
                if len(v) <= SHARED_MAX:
                    cache[(pidx, v)] = s
            if s:
                seen.update(s)
                if hit <= seen:
                    return found
        return frozenset(found).difference(hit - seen)

    def candidates(self, pidx: int, v: bytes):
        """Pattern ids of pipeline ``pidx`` that match ``v`` (or prefilter.ALL)."""
        key = (pidx, v)
        sc = self.scan_cache if len(v) <= SHARED_MAX else self.scan_cache_large
        r = sc.get(key)
        if r is None:
            ps = self.ruleset.prefilter.get(pidx)
            r = sc[key] = ps.scan(v) if ps is not None else prefilter.ALL
        return r
