"""Rule evaluation: a ``Transaction`` runs phases 1 and 2 of one request the way
libmodsecurity3 does.

- a rule matches when any of its target values (after its transformations) matches; each
  matching value runs the rule's ``setvar``/``ctl`` actions (as libmodsecurity3 does, so
  anomaly scores add up per matching value); a chain runs its next link only when this one
  matched; the starter's disruptive action, ``log`` and ``skipAfter`` apply when the whole chain
  matched;
- the phase loop runs the compiled program (ruleset.py): CRS's paranoia and threshold gates
  inline, the "prefilter says no" test inline, everything else through ``evaluate_link``.

Engine modes: ``On`` stops at the first ``deny``/``drop``; ``DetectionOnly`` records what would
have been denied and runs everything (CRS's own test mode).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from filters.waf import early, prefilter
from filters.waf.caches import SHARED_MAX, ValueCaches
from filters.waf.limits import NO_LIMITS, InspectionLimits
from filters.waf.operators import atoi
from filters.waf.request import seclang_int
from filters.waf.scanning import NO_CANDIDATES, ValueScanner
from filters.waf.variables import VarSpec

if TYPE_CHECKING:  # pragma: no cover
    from filters.waf.rules import Pipeline, Rule
    from filters.waf.ruleset import Ruleset

NO_MATCHES: tuple = ()  # MATCHED_VARS after a rule that did not match (never mutated)


@dataclass
class Outcome:
    matched: list[int]  # logged rule ids, in order
    interrupted: bool  # a deny/drop fired (enforced or, in DetectionOnly, would have)
    status: int | None
    rule_id: int | None  # the rule that interrupted
    score: int
    limit: str | None = None  # the inspection limit the request went over (no rule ran)
    stopped_early: bool = (
        False  # enforce: the blocking evaluation denied before the last rules ran (early.py)
    )


class Transaction(ValueScanner):
    """One request through a Ruleset. Not thread-safe; one per request.

    ``caches``: the rule set's shared value caches (``WafEngine.caches``); without, the
    transaction uses its own. ``limits``: the hostile-shape limits; ``max_args`` alone (older
    callers) means ModSecurity's SecArgumentsLimit with partial inspection."""

    def __init__(
        self,
        ruleset: Ruleset,
        *,
        method: str,
        uri: str,
        protocol: str = "HTTP/1.1",
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        remote_addr: str = "127.0.0.1",
        unique_id: str | None = None,
        tx_vars: dict[str, str] | None = None,
        removed_ids: frozenset[int] = frozenset(),
        removed_targets: dict[int, list[VarSpec]] | None = None,
        detection_only: bool = False,
        body_processor: str | None = None,
        max_args: int = 0,
        limits: InspectionLimits | None = None,
        caches: ValueCaches | None = None,
    ):
        self.logged: list[int] = []
        self.removed_ids = set(removed_ids)
        self.removed_tags: set[str] = set()
        self.engine_mode = "DetectionOnly" if detection_only else ruleset.engine_mode
        self.interrupted = False
        self.would_interrupt: tuple[int, int] | None = None
        self.allow_all = False
        self.stopped_early = False
        if limits is None:
            limits = InspectionLimits(max_args=max_args, args_partial=True) if max_args else NO_LIMITS
        super().__init__(
            ruleset,
            caches,
            method=method,
            uri=uri,
            protocol=protocol,
            headers=headers or [],
            body=body,
            remote_addr=remote_addr,
            unique_id=unique_id,
            removed_targets=removed_targets,
            body_processor=body_processor,
            limits=limits,
        )
        self.own_tx_vars = bool(tx_vars)  # then the initialisation prefix runs as written
        for k, v in (tx_vars or {}).items():
            self.tx_vars[k.lower()] = v.encode() if isinstance(v, str) else v

    def evaluate_link(self, rule: Rule) -> bool:
        """Whether one rule (or chain link) matches; runs its per-match actions on each
        matching value and sets MATCHED_VARS."""
        if rule.tx_compare is not None:
            return self.evaluate_tx_compare(rule)
        if rule.prefilter_decides and rule.pipeline.idx in self.ruleset.prefilter:
            return self.evaluate_prefiltered(rule)
        return self.evaluate_values(rule)

    def evaluate_tx_compare(self, rule: Rule) -> bool:
        """``TX:name @lt N`` and the like: one TX value against a constant."""
        txn = rule.tx_compare  # (key, compare, constant, &TX count): CRS's paranoia/threshold gates
        assert txn is not None
        v = self.tx_vars.get(txn[0])
        if txn[3]:  # &TX:name: 1 when set, else 0
            v = b"1" if v is not None else b"0"
            if txn[1](int(v), txn[2]) == rule.op.negated:
                return False
            return self.confirm(rule, [("TX", v)], check=False)
        if v is None or (txn[1](atoi(v), txn[2]) == rule.op.negated):
            return False
        return self.confirm(rule, [("TX:" + txn[0], v)], check=False)

    def evaluate_prefiltered(self, rule: Rule) -> bool:
        """A positive @rx/@pm over request variables: the Set scans decide which values the
        rule's own regex confirms."""
        u = self.universe_cache.get(rule.pipeline.idx)
        if u is None:
            u = self.universe_candidates(rule.pipeline)
        if rule.pattern_id not in u:
            return False
        extra = self.removed_targets.get(rule.id) if self.removed_targets else None
        key = (rule.target_signature, rule.pipeline.idx, id(extra) if extra else 0)
        entry = self.target_scan_cache.get(key)
        if entry is None:
            p = rule.pipeline
            tvals = self.transformed_values(self.values(rule), p)
            if not tvals:
                entry = [tvals, NO_CANDIDATES, None]
            else:
                # Set scans over all values of this target set at once (scan_values); extra
                # hits are confirmed per value.
                entry = [tvals, self.scan_values(p.idx, [tv for _, tv in tvals]), None]
            self.target_scan_cache[key] = entry
        pid = rule.pattern_id
        if pid not in entry[1]:
            return False
        tvals = entry[0]
        if len(tvals) > 1:  # which values: per-value scans, once per target set for all rules
            by_pattern = entry[2]
            if by_pattern is None:
                by_pattern = entry[2] = self.values_by_pattern(rule.pipeline.idx, tvals, entry[1])
            tvals = by_pattern.get(pid, ()) if by_pattern is not prefilter.ALL else tvals
        return self.confirm(rule, tvals)

    def evaluate_values(self, rule: Rule) -> bool:
        """Any other rule: its operator over each of its values, the prefilter skipping values
        it rules out (multiMatch: ``evaluate_multi_match``)."""
        if rule.multi_match:
            return self.evaluate_multi_match(rule)
        vals = self.values(rule)
        if not vals:
            return False
        p = rule.pipeline
        pidx = p.idx
        pid = rule.pattern_id
        use_pf = rule.general_prefilter  # (ruleset.py) a Set of this pipeline judges the pattern
        neg = rule.op.negated
        match = rule.op.match
        cap = rule.capture
        tf = self.transform
        new_matches: list[tuple[str, bytes]] = []
        for name, v in vals:
            tv = tf(v, p)
            if use_pf and pid not in self.candidates(pidx, tv):
                if not neg:
                    continue  # cannot match; a negated operator matches
            elif match(self, tv, cap) == neg:
                continue
            new_matches.append((name, tv))
            self.on_match(rule, name, tv)
        if new_matches:
            self.matched_vars = new_matches
            return True
        return False

    def evaluate_multi_match(self, rule: Rule) -> bool:
        """A multiMatch rule: its operator after every transformation step (and on the raw
        value), the prefilter skipping steps it rules out."""
        hot = None
        if rule.multi_match_pipelines:
            # multiMatch: only steps whose universe scan saw the pattern can match
            hot = set()
            for q in rule.multi_match_pipelines:
                u = self.universe_cache.get(q.idx)
                if u is None:
                    u = self.universe_candidates(q)
                if rule.pattern_id in u:
                    hot.add(q.idx)
            if not hot:
                return False
        vals = self.values(rule)
        if not vals:
            return False
        op = rule.op
        neg = op.negated
        pid = rule.pattern_id
        use_pf = rule.general_prefilter
        matched = False
        new_matches: list[tuple[str, bytes]] = []
        # multiMatch with a pure operator (libinjection): the verdict over all steps is a function
        # of (pipeline, operator, raw value), kept across requests; a hit that matched replays the
        # operator on the matching step (cached too) so captures are set as before.
        mmc = self.caches.multi_match_step if (op.pure and not neg and hot is None) else None
        for name, v in vals:
            if mmc is not None:
                ck = (rule.pipeline.idx, type(op), v)
                tv = mmc.get(ck, False)
                if tv is not False:
                    if tv is None or not op.match(self, tv, rule.capture):
                        continue
                else:
                    tv = None
                    p: Pipeline | None = rule.pipeline
                    steps = []
                    while p is not None:
                        steps.append(self.transform(v, p))
                        p = p.parent
                    seen_tv: set[bytes] = set()
                    for t in reversed(steps):
                        if t in seen_tv:
                            continue
                        seen_tv.add(t)
                        if op.match(self, t, rule.capture):
                            tv = t
                            break
                    if len(v) <= SHARED_MAX:
                        mmc[ck] = tv
                    if tv is None:
                        continue
            else:
                # the operator runs after every transformation step (and on the raw value)
                msteps = []
                p = rule.pipeline
                while p is not None:
                    msteps.append((p, self.transform(v, p)))
                    p = p.parent
                res = False
                seen: set[bytes] = set()
                pf = self.ruleset.prefilter
                for q, tv in reversed(msteps):
                    if hot is not None and q.idx not in hot:
                        continue
                    if tv in seen:
                        continue
                    seen.add(tv)
                    if use_pf and not neg and q.idx in pf and pid not in self.candidates(q.idx, tv):
                        continue
                    if op.match(self, tv, rule.capture) != neg:
                        res = True
                        break
                if not res:
                    continue
            matched = True
            new_matches.append((name, tv))
            self.on_match(rule, name, tv)
        if matched:
            self.matched_vars = new_matches
        return matched

    def transformed_values(self, values: list[tuple[str, bytes]], p: Pipeline) -> list[tuple[str, bytes]]:
        """(name, value through ``p``) pairs: ``transform`` with its two cache hits inline
        (a plain value in a plain-identity pipeline; a value transformed before)."""
        if p.fn is None:
            return list(values)
        pidx = p.idx
        cache = self.transform_cache
        plain = self.plain_cache if p.plain_identity else {}
        tf = self.transform
        out = []
        for name, v in values:
            if plain.get(v):
                out.append((name, v))
                continue
            r = cache.get((pidx, v))
            out.append((name, r if r is not None else tf(v, p)))
        return out

    def values_by_pattern(self, pidx: int, tvals: list[tuple[str, bytes]], wanted: Any) -> Any:
        """pattern id -> the (name, transformed value) pairs whose own Set scan saw it, in value
        order, for the patterns in ``wanted`` (the joined buffer's candidates). prefilter.ALL
        when a value's scan cannot rule anything out (then every value is a candidate)."""
        out: dict[int, list[tuple[str, bytes]]] = {}
        if wanted is prefilter.ALL:
            return prefilter.ALL
        ps = self.ruleset.prefilter.get(pidx)
        if ps is None:
            return prefilter.ALL
        # only the Sets holding a wanted pattern are asked: the others' answers are dropped below
        # anyway (a value already scanned whole reuses that scan)
        groups = [g for g in ps.groups if not wanted.isdisjoint(g[1])]
        for nt in tvals:
            v = nt[1]
            found = (self.scan_cache if len(v) <= SHARED_MAX else self.scan_cache_large).get((pidx, v))
            if found is None:
                found = prefilter.scan_groups(groups, v)
            if found is prefilter.ALL:
                return prefilter.ALL
            for q in found:
                if q in wanted:
                    hits = out.get(q)
                    if hits is None:
                        out[q] = [nt]
                    else:
                        hits.append(nt)
        return out

    def confirm(self, rule: Rule, tvals: list[tuple[str, bytes]], check: bool = True) -> bool:
        """Run a rule's operator on (already transformed) candidate values; act on matches."""
        op = rule.op
        matched = False
        new_matches: list[tuple[str, bytes]] = []
        for name, tv in tvals:
            if check and not op.match(self, tv, rule.capture):
                continue
            matched = True
            new_matches.append((name, tv))
            self.on_match(rule, name, tv)
        if matched:
            self.matched_vars = new_matches
        return matched

    def on_match(self, rule: Rule, name: str, tv: bytes) -> None:
        """One value matched: expose it as MATCHED_VAR(_NAME) and run the rule's per-match actions."""
        self.scalars["MATCHED_VAR"] = tv
        self.scalars["MATCHED_VAR_NAME"] = name.encode("latin-1", "replace")
        self.current_rule = rule
        if rule.setvars:
            self.run_setvars(rule)
        if rule.ctls:
            self.run_ctls(rule)

    def run_setvars(self, rule: Rule) -> None:
        for sv in rule.setvars:
            if sv.coll != "TX":
                continue  # persistent collections (ip, global, session) are not kept by a gateway
            name = sv.name.expand(self).decode("latin-1").lower()
            if sv.op == "!":
                self.tx_vars.pop(name, None)
                continue
            val = sv.value.expand(self)
            if sv.op == "=":
                self.tx_vars[name] = val
            else:
                cur = seclang_int(self.tx_vars.get(name, b"0"))
                d = seclang_int(val)
                self.tx_vars[name] = str(cur + d if sv.op == "+" else cur - d).encode()

    def run_ctls(self, rule: Rule) -> None:
        for k, v in rule.ctls:
            if k == "ruleengine":
                mode = {"on": "On", "off": "Off", "detectiononly": "DetectionOnly"}.get(v.lower())
                if mode and not (self.engine_mode == "DetectionOnly" and mode == "On"):
                    self.engine_mode = mode
            elif k == "ruleremovebyid":
                for spec in v.split():
                    if "-" in spec[1:]:
                        lo, _, hi = spec.partition("-")
                        self.removed_ids.update(r for r in self.ruleset.by_id if int(lo) <= r <= int(hi))
                    else:
                        self.removed_ids.add(int(spec))
            elif k == "ruleremovebytag":
                self.removed_tags.add(v)
            elif k in ("ruleremovetargetbyid", "ruleremovetargetbytag"):
                ids, specs = self.ruleset.ctl_targets(k, v)
                rt = self.removed_targets
                for rid in ids:
                    old = rt.get(rid)
                    rt[rid] = specs if not old else old + specs
            elif k == "requestbodyprocessor":
                self.body_processor = v.upper()
                self.scalars["REQBODY_PROCESSOR"] = v.upper().encode()
            elif k == "forcerequestbodyvariable":
                self.force_body_var = v.lower() == "on"
            # auditEngine, auditLogParts...: there is no audit log engine here.

    def evaluate_chain(self, rule: Rule) -> bool:
        link: Rule | None = rule
        self.matched_vars = []
        while link is not None:
            if not self.evaluate_link(link):
                return False
            link = link.chain
        return True

    def run_phase(self, phase: int, start: int = 0, stop: int | None = None) -> int:
        """Run a phase's program from index ``start``; with ``stop`` (folding.py: the
        initialisation prefix at load), up to the first rule at or after that index, whose
        index is returned."""
        rules = self.ruleset.program[phase]
        n = len(rules)
        if self.allow_all or self.interrupted:
            return n
        i = start
        if stop is not None:
            n = stop
        removed = self.removed_ids
        ucache = self.universe_cache  # cleared in place when variables change
        tx = self.tx_vars
        ints = self.caches.tx_ints
        rtags = self.removed_tags  # grows in place (ctl:ruleRemoveByTag)
        cpos = self.ruleset.candidate_pos.get(phase, {})
        cand_of: Any = None  # the universe candidates cand_at was made from
        cand_at: list[int] = []  # program indexes of the dispatch-1 rules among them, sorted
        # the engine mode changes only through ctl, i.e. in a general evaluation (below): it is
        # checked before the first rule and before each rule that follows such an evaluation
        check_engine = True
        ep = self.caches.early_plan if phase == 2 and stop is None else None  # early.py
        while i < n:
            r = rules[i]
            i += 1
            if check_engine:
                if self.engine_mode == "Off":
                    return n
                check_engine = False
            if r.id in removed or (rtags and rtags.intersection(r.tags)):
                continue
            k = r.dispatch
            if k == 1:
                # the universe scan of this pipeline did not see the pattern: no value can match
                u = ucache.get(r.pipeline.idx)
                if u is None:
                    u = self.universe_candidates(r.pipeline)
                if r.pattern_id not in u:
                    self.matched_vars = NO_MATCHES
                    # nor can any rule of this run the scan did not see: jump to the run's next
                    # candidate (u is the same for the whole run: only a rule that runs can
                    # change the variables, and none runs before that candidate)
                    end = r.run_end
                    if end > i:
                        if u is not cand_of:
                            cand_of = u
                            cand_at = sorted([j for j in map(cpos.get, u) if j is not None])
                        c = bisect_left(cand_at, i)
                        i = cand_at[c] if c < len(cand_at) and cand_at[c] < end else end
                        if i > n:
                            i = n
                    continue
            elif k:
                g: Any = r.tx_compare  # set whenever dispatch is 2 or 3 (ruleset.py)
                v = tx.get(g[0])
                if v is None:
                    self.matched_vars = NO_MATCHES
                    continue
                iv = ints.get(v)
                if iv is None:
                    iv = atoi(v)
                    ints[v] = iv
                if g[1](iv, g[2]) == r.op.negated:
                    self.matched_vars = NO_MATCHES
                    continue
                if k == 2:
                    # what _confirm + the action tail below do for a pass/nolog/skipAfter gate
                    name = r.gate_name
                    s = self.scalars
                    s["MATCHED_VAR"] = v
                    s["MATCHED_VAR_NAME"] = name[1]
                    self.matched_vars = [(name[0], v)]
                    self.current_rule = r
                    i = r.jump
                    continue
            check_engine = True
            if r.chain is None:
                self.matched_vars = []
                if not self.evaluate_link(r):
                    continue
            elif not self.evaluate_chain(r):
                continue
            self.current_rule = r
            if r.log:
                self.logged.append(r.id)
            d = r.disruptive
            if d in ("deny", "drop"):
                if self.would_interrupt is None:
                    self.would_interrupt = (r.id, r.status or 403)
                if self.engine_mode == "On":
                    self.interrupted = True
                    return n
            elif d == "allow":
                if r.allow == "phase":
                    return n
                self.allow_all = True
                return n
            if ep is not None and ep.first <= i < ep.section and r.id in ep.raises and early.decide(self, ep):
                return n
            if r.skip_after:
                i = r.jump
            elif r.skip:
                i = min(n, i + r.skip)
        return i

    def process_request(self) -> Outcome:
        """Run phase 1, parse the body, run phase 2. A request over an inspection limit runs
        no rule (``Outcome.limit``); one whose body goes over a limit only a phase-1 ctl made
        it parse runs phase 1 only."""
        if self.limit_exceeded is None:
            fold = self.ruleset.init_fold
            start = 0
            if fold is not None and not self.own_tx_vars and fold.applies(self):
                start = fold.apply(self)
            self.run_phase(1, start)
            if not self.interrupted and not self.allow_all:
                self.process_body()
                if self.limit_exceeded is None:
                    self.run_phase(2)
        return self.outcome()

    def outcome(self) -> Outcome:
        wi = self.would_interrupt
        score = seclang_int(
            self.tx_vars.get("blocking_inbound_anomaly_score", self.tx_vars.get("anomaly_score", b"0"))
        )
        return Outcome(
            list(self.logged),
            wi is not None,
            wi[1] if wi else None,
            wi[0] if wi else None,
            score,
            self.limit_exceeded,
            self.stopped_early,
        )
