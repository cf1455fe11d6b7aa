"""The rule-set compiler: SecLang directives -> a ``Ruleset`` compiled once at load.

``Ruleset.load(paths, pre_text=...)`` parses SecLang (seclang.py), builds every rule
(rules.py) with its operator compiled (RE2), interns the transformation pipelines, builds an
RE2-Set prefilter per pipeline (prefilter.py) and, per phase, a *program*: the rules without
markers, every ``skipAfter`` resolved to an index and each rule's dispatch kind; folding.py
runs phase 1's request-free prefix once and keeps the patterns of rules no request reaches out
of the Sets. After load the rule set does not change; what requests learn about values lives in
caches.py.
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

from filters.waf import folding, prefilter, transforms
from filters.waf.macros import Constant, value_template
from filters.waf.operators import NumericCompare, OperatorError, atoi, compile_rx, parse_operator
from filters.waf.rules import (
    DISRUPTIVE,
    PHASES,
    SEVERITIES,
    Marker,
    Pipeline,
    Rule,
    WafLoadError,
    id_in,
    parse_setvar,
    update_targets,
)
from filters.waf.seclang import Action, Directive, SecLangError, parse_actions, parse_file, parse_text
from filters.waf.variables import CACHEABLE, VarSpec, build_exclusion_plan, parse_targets


class Ruleset:
    """A compiled, immutable rule set. Build with ``Ruleset.load`` / ``Ruleset.from_text``."""

    def __init__(self) -> None:
        self.phases: dict[int, list[Rule | Marker]] = {p: [] for p in range(1, 6)}
        self.markers: dict[int, dict[str, list[int]]] = {}
        self.by_id: dict[int, Rule] = {}
        self.defaults: dict[int, list[Action]] = {}
        self.engine_mode = "On"
        self.body_access = True
        self.pipelines: dict[tuple[str, ...], Pipeline] = {}
        self.pipeline_list: list[Pipeline] = []
        self.prefilter: dict[int, Any] = {}  # pipeline idx -> prefilter.PipelineSet
        self.prefilter_unsafe: set[int] = set()  # pids the prefilter cannot judge (always run)
        self.pattern_count = 0
        self.patterns: list[tuple[int, int, list[bytes], bool]] = []  # (pipeline idx, pid, srcs, caseless)
        self.empty = self.pipeline(())
        # ctl:ruleRemoveTarget{ById,ByTag}=sel;TARGETS of every rule, resolved at load
        self.ctl_target_table: dict[tuple[str, str], tuple[tuple[int, ...], tuple[VarSpec, ...]]] = {}
        self.universe: dict[int, tuple[tuple[str, frozenset[str] | None], ...]] = {}
        self.universe_plan: tuple = ()  # (variable, (group id, pipelines), {key: (group id, pipelines)})
        self.universe_pipelines: tuple[int, ...] = ()
        # phase -> {pattern id: program index} of the dispatch-1 rules (see Rule.run_end)
        self.candidate_pos: dict[int, dict[int, int]] = {}
        self.program: dict[int, list[Rule]] = {p: [] for p in range(1, 6)}
        self.init_fold: folding.InitFold | None = None  # phase 1's request-free prefix, run at load
        self.unreachable_patterns: set[int] = set()  # patterns of rules no request reaches

    # ----- building
    @classmethod
    def load(
        cls, files: Iterable[str], pre_text: str = "", post_text: str = "", prefilter: str = "on"
    ) -> Ruleset:
        rs = cls()
        directives: list[Directive] = []
        try:
            if pre_text:
                directives += parse_text(pre_text, "<gateway-config>")
            for f in files:
                directives += parse_file(f)
            if post_text:
                directives += parse_text(post_text, "<gateway-config-post>")
        except SecLangError as e:
            raise WafLoadError(str(e)) from None
        rs._build(directives)
        rs._compile(prefilter)
        return rs

    @classmethod
    def from_text(cls, text: str, path: str = "<string>", prefilter: str = "on") -> Ruleset:
        rs = cls()
        try:
            directives = parse_text(text, path)
        except SecLangError as e:
            raise WafLoadError(str(e)) from None
        rs._build(directives)
        rs._compile(prefilter)
        return rs

    def _compile(self, prefilter: str) -> None:
        """Programs, the folded initialisation prefix, the prefilter without the patterns of
        rules no request reaches (folding.py), then the programs' dispatch with the prefilter."""
        self._compile_program()
        self.init_fold = folding.fold_init(self)
        dead = folding.pattern_ids(folding.unreachable_rules(self, self.init_fold))
        self._compile_prefilter(prefilter, dead)
        self._compile_program()
        self._compile_ctl_targets()
        for r0 in self._all_rules():
            r: Rule | None = r0
            while r is not None:
                r.general_prefilter = (
                    r.pattern_id is not None
                    and r.pattern_id not in self.prefilter_unsafe
                    and r.pipeline.idx in self.prefilter
                )
                r = r.chain

    def pipeline(self, names: tuple[str, ...]) -> Pipeline:
        p = self.pipelines.get(names)
        if p is None:
            parent = self.pipeline(names[:-1]) if names else None
            p = Pipeline(
                len(self.pipeline_list),
                names,
                transforms.get(names[-1]) if names else None,
                parent,
                all(n in transforms.PLAIN_IDENTITY for n in names),
            )
            self.pipelines[names] = p
            self.pipeline_list.append(p)
        return p

    def _build(self, directives: list[Directive]) -> None:
        chain_parent: Rule | None = None
        for d in directives:
            where = d.where()
            try:
                name = d.name
                if name in ("SecRule", "SecAction"):
                    if name == "SecRule":
                        targets_text, op_text = d.args[0], d.args[1]
                        actions_text = d.args[2] if len(d.args) > 2 else ""
                    else:
                        targets_text, op_text, actions_text = None, "@unconditionalMatch", d.args[0]
                    rule = self._make_rule(d, targets_text, op_text, actions_text, chain_parent)
                    if chain_parent is not None:
                        last = chain_parent
                        while last.chain is not None:
                            last = last.chain
                        last.chain = rule
                        rule.chained = True
                        rule.phase = chain_parent.phase
                        if not any(a.name == "chain" for a in rule.actions_raw):
                            chain_parent = None
                    else:
                        if rule.id in self.by_id:
                            raise ValueError(f"duplicate rule id {rule.id}")
                        if rule.id:
                            self.by_id[rule.id] = rule
                        self.phases[rule.phase].append(rule)
                        if any(a.name == "chain" for a in rule.actions_raw):
                            chain_parent = rule
                elif chain_parent is not None:
                    raise ValueError(f"{name} inside an unfinished chain")
                elif name == "SecMarker":
                    for p in self.phases.values():
                        p.append(Marker(d.args[0].strip("'")))
                elif name == "SecDefaultAction":
                    acts = parse_actions(d.args[0], where)
                    ph = next((PHASES.get(a.value or "") for a in acts if a.name == "phase"), 2)
                    if ph is None:
                        raise ValueError("bad phase")
                    self.defaults[ph] = [a for a in acts if a.name not in ("phase", "id")]
                elif name == "SecRuleRemoveById":
                    for spec in " ".join(d.args).replace(",", " ").split():
                        self._remove(lambda r, s=spec: id_in(r.id, s))  # type: ignore[misc]
                elif name == "SecRuleRemoveByTag":
                    rx = compile_rx(d.args[0].encode("latin-1"))
                    self._remove(
                        lambda r, rx=rx: any(rx.search(t.encode("latin-1", "replace")) for t in r.tags)  # type: ignore[misc]
                    )
                elif name == "SecRuleRemoveByMsg":
                    rx = compile_rx(d.args[0].encode("latin-1"))
                    self._remove(
                        lambda r, rx=rx: (  # type: ignore[misc]
                            r.msg is not None and isinstance(r.msg, Constant) and rx.search(r.msg.value)
                        )
                    )
                elif name in ("SecRuleUpdateTargetById", "SecRuleUpdateTargetByTag"):
                    specs = parse_targets(d.args[1])
                    if name.endswith("ById"):
                        sel = [r for r in self._all_rules() if id_in(r.id, d.args[0])]
                    else:
                        rx = compile_rx(d.args[0].encode("latin-1"))
                        sel = [
                            r
                            for r in self._all_rules()
                            if any(rx.search(t.encode("latin-1", "replace")) for t in r.tags)
                        ]
                    for r in sel:
                        update_targets(r, specs, d.args[2] if len(d.args) > 2 else None)
                elif name == "SecRuleUpdateActionById":
                    rid = int(d.args[0].split(":")[0])
                    r = self.by_id.get(rid)  # type: ignore[assignment]
                    if r is None:
                        raise ValueError(f"no rule {rid}")
                    self._apply_actions(r, parse_actions(d.args[1], where), update=True, where=where)
                elif name == "SecRuleEngine":
                    v = d.args[0]
                    if v.lower() not in ("on", "off", "detectiononly"):
                        raise ValueError("SecRuleEngine must be On, Off or DetectionOnly")
                    self.engine_mode = {"on": "On", "off": "Off", "detectiononly": "DetectionOnly"}[v.lower()]
                elif name == "SecRequestBodyAccess":
                    self.body_access = d.args[0].lower() == "on"
                # other settings (limits) come from the gateway config
            except (ValueError, OperatorError, KeyError, re.error) as e:
                raise WafLoadError(f"{where}: {d.name}: {e}") from None
        if chain_parent is not None:
            raise WafLoadError(
                f"rule {chain_parent.id} ({chain_parent.file}:{chain_parent.line}): chain without a following rule"
            )
        sigs: dict[str, int] = {}
        for r0 in self._all_rules():
            r = r0
            while r is not None:
                r.exclusion_plan = build_exclusion_plan(r.excludes)
                r.cacheable = all(t.coll in CACHEABLE for t in r.targets)
                sig = repr(
                    [(t.coll, t.key, t.key_rx and t.key_rx.pattern, t.count) for t in r.targets]
                ) + repr([(e.coll, e.key, e.key_rx and e.key_rx.pattern) for e in r.excludes])
                r.target_signature = sigs.setdefault(sig, len(sigs))
                r.prefilter_decides = (
                    r.pattern_id is not None and r.cacheable and not r.op.negated and not r.multi_match
                )
                t0 = r.targets[0] if len(r.targets) == 1 else None
                if (
                    t0 is not None
                    and t0.coll == "TX"
                    and t0.key is not None
                    and not r.excludes
                    and r.pipeline.fn is None
                    and isinstance(r.op, NumericCompare)
                    and r.op.macro is None
                    and not r.multi_match
                ):
                    r.tx_compare = (t0.key, type(r.op).cmp, atoi(r.op.arg.encode()), t0.count)  # type: ignore[attr-defined]
                r = r.chain  # type: ignore[assignment]
        for ph, items in self.phases.items():
            m: dict[str, list[int]] = {}
            for i, it in enumerate(items):
                if type(it) is Marker:
                    m.setdefault(it.name, []).append(i)
            self.markers[ph] = m

    def ctl_targets(self, kind: str, value: str) -> tuple[tuple[int, ...], tuple[VarSpec, ...]]:
        """``ctl:ruleRemoveTarget{ById,ByTag}=sel;TARGETS`` -> (rule ids, exclusions); resolved
        at load for every ctl the rules carry."""
        r = self.ctl_target_table.get((kind, value))
        return r if r is not None else self._resolve_ctl_targets(kind, value)

    def _resolve_ctl_targets(self, kind: str, value: str) -> tuple[tuple[int, ...], tuple[VarSpec, ...]]:
        sel, _, target = value.partition(";")
        specs = tuple(VarSpec(s.coll, s.key, s.key_rx, s.count, True) for s in parse_targets(target))
        if kind == "ruleremovetargetbyid":
            ids = tuple(r for r in self.by_id if id_in(r, sel))
        else:
            ids = tuple(r.id for r in self.by_id.values() if sel in r.tags)
        return ids, specs

    def _compile_ctl_targets(self) -> None:
        for r0 in self._all_rules():
            r: Rule | None = r0
            while r is not None:
                for k, v in r.ctls:
                    if (
                        k in ("ruleremovetargetbyid", "ruleremovetargetbytag")
                        and (k, v) not in self.ctl_target_table
                    ):
                        try:
                            self.ctl_target_table[(k, v)] = self._resolve_ctl_targets(k, v)
                        except (ValueError, OperatorError) as e:
                            raise WafLoadError(f"{r.file}:{r.line}: rule {r.id}: ctl:{k}={v}: {e}") from None
                r = r.chain

    def _all_rules(self) -> list[Rule]:
        return [r for items in self.phases.values() for r in items if type(r) is Rule]

    def _remove(self, pred: Callable[[Rule], bool]) -> None:
        for ph, items in self.phases.items():
            keep = [it for it in items if type(it) is Marker or not pred(it)]  # type: ignore[arg-type]
            for it in items:
                if type(it) is Rule and pred(it):
                    self.by_id.pop(it.id, None)
            self.phases[ph] = keep

    def _make_rule(self, d: Directive, targets_text, op_text, actions_text, parent) -> Rule:
        where = d.where()
        acts = parse_actions(actions_text, where) if actions_text else []
        specs = parse_targets(targets_text) if targets_text is not None else [VarSpec("REQUEST_METHOD")]
        ctx = {"dir": os.path.dirname(os.path.abspath(d.file)) if not d.file.startswith("<") else os.getcwd()}
        op = parse_operator(op_text, ctx)
        phase = 2
        for a in acts:
            if a.name == "phase":
                if a.value not in PHASES:
                    raise ValueError(f"bad phase {a.value!r}")
                phase = PHASES[a.value]
        rid = 0
        for a in acts:
            if a.name == "id":
                rid = int(a.value or "0")
        if parent is None and not rid:
            raise ValueError("rule without id")
        rule = Rule(
            id=rid if parent is None else parent.id,
            phase=phase,
            file=d.file,
            line=d.line,
            targets=[s for s in specs if not s.exclude],
            excludes=[s for s in specs if s.exclude],
            op=op,
            pipeline=self.empty,
            actions_raw=acts,
        )
        if parent is None:
            defaults = self.defaults.get(phase, [])
            self._apply_actions(rule, defaults, update=False, where=where)
        self._apply_actions(rule, acts, update=False, where=where, inherit_t=parent is None)
        if parent is not None:
            rule.log = False
            rule.disruptive = None
        if op.rx_source is not None:
            rule.pattern_id = self.pattern_count
            self.pattern_count += 1
            p: Pipeline | None = rule.pipeline
            while p is not None:  # multiMatch also tests every intermediate step
                self.patterns.append((p.idx, rule.pattern_id, op.rx_source, op.rx_caseless))
                p = p.parent if rule.multi_match else None
        rule.has_count_only = all(s.count for s in rule.targets)
        return rule

    def _apply_actions(
        self, rule: Rule, acts: list[Action], update: bool, where: str, inherit_t: bool = True
    ) -> None:
        names = list(rule.pipeline.names)
        for a in acts:
            n, v = a.name, a.value
            if n == "t":
                if v is None:
                    raise ValueError("t: needs a name")
                if v.lower() == "none":
                    names = []
                else:
                    transforms.get(v)
                    names.append(v.lower())
            elif n in DISRUPTIVE:
                rule.disruptive = n
                if n == "allow":
                    rule.allow = (v or "").lower()
            elif n == "status":
                rule.status = int(v or "403")
            elif n == "log":
                rule.log = True
            elif n == "nolog":
                rule.log = False
            elif n == "capture":
                rule.capture = True
            elif n == "multimatch":
                rule.multi_match = True
            elif n == "setvar":
                rule.setvars.append(parse_setvar(v or ""))
            elif n == "ctl":
                k, _, val = (v or "").partition("=")
                rule.ctls.append((k.strip().lower(), val.strip()))
            elif n == "skipafter":
                rule.skip_after = (v or "").strip("'")
            elif n == "skip":
                rule.skip = int(v or "0")
            elif n == "msg":
                rule.msg = value_template(v or "")
            elif n == "tag":
                rule.tags = rule.tags + ((v or ""),)
            elif n == "severity":
                rule.severity = SEVERITIES.get(v or "", (v or "").upper())
            elif n in (
                "id",
                "phase",
                "chain",
                "auditlog",
                "noauditlog",
                "logdata",
                "ver",
                "rev",
                "maturity",
                "accuracy",
                "expirevar",
                "initcol",
                "setenv",
                "setuid",
                "setsid",
                "deprecatevar",
                "sanitisearg",
                "sanitisematched",
                "sanitisematchedbytes",
                "sanitiserequestheader",
                "sanitiseresponseheader",
                "xmlns",
                "append",
                "prepend",
                "exec",
            ):
                pass
            else:
                raise ValueError(f"unknown action {n!r}")
        rule.pipeline = self.pipeline(tuple(names))

    def _compile_prefilter(self, mode: str = "on", unreachable: set[int] | None = None) -> None:
        """``on``: RE2 Sets per pipeline (see prefilter.py) of the patterns of rules a request
        can reach; ``off``: every rule runs its RE2."""
        self.prefilter_unsafe = {pid for _, pid, _, _ in self.patterns}
        if mode == "off" or not self.patterns:
            return
        self.unreachable_patterns = unreachable = unreachable or set()
        unsafe, sets = prefilter.build([p for p in self.patterns if p[1] not in unreachable])
        unsafe |= unreachable
        self.prefilter = sets
        self.prefilter_unsafe = unsafe
        universe: dict[int, dict[str, set[str] | None]] = {}
        for r0 in self._all_rules():
            r = r0
            while r is not None:
                if r.pattern_id in unsafe:
                    r.prefilter_decides = False
                pipes: list[Pipeline] = []
                if r.prefilter_decides:
                    pipes = [r.pipeline]
                elif (
                    r.multi_match
                    and r.pattern_id is not None
                    and r.pattern_id not in unsafe
                    and r.cacheable
                    and not r.op.negated
                ):
                    q: Pipeline | None = r.pipeline
                    while q is not None:
                        pipes.append(q)
                        q = q.parent
                    if all(q.idx in sets for q in pipes):
                        r.multi_match_pipelines = tuple(pipes)
                    else:
                        pipes = []
                for q in pipes:
                    u = universe.setdefault(q.idx, {})
                    for t in r.targets:
                        if t.key is not None and t.coll not in ("XML",) and u.get(t.coll, set()) is not None:
                            u.setdefault(t.coll, set()).add(t.key)  # type: ignore[union-attr]
                        else:
                            u[t.coll] = None  # the whole collection
                r = r.chain  # type: ignore[assignment]
        # Per pipeline: every variable any prefiltered rule of that pipeline reads (whole
        # collections, before exclusions): one scan of all of them rules most rules out at once.
        self.universe = {
            k: tuple(sorted((c, frozenset(keys) if keys is not None else None) for c, keys in v.items()))
            for k, v in universe.items()
        }
        # The same, per variable: which pipelines' universes read it (whole, or by key). One pass
        # over the request's variables then serves every pipeline (see Transaction._universe).
        full: dict[str, list[int]] = {}
        keyed: dict[str, dict[str, list[int]]] = {}
        for pidx, spec in self.universe.items():
            for c, keys in spec:
                if keys is None:
                    full.setdefault(c, []).append(pidx)
                else:
                    for k in keys:
                        keyed.setdefault(c, {}).setdefault(k, []).append(pidx)
        groups: dict[tuple[int, ...], int] = {}

        def group(pids: list[int]) -> tuple[int, tuple[int, ...]]:
            t = tuple(sorted(set(pids)))
            return groups.setdefault(t, len(groups)), t

        self.universe_plan = tuple(
            (
                c,
                group(full.get(c, [])),
                {k: group(full.get(c, []) + ps) for k, ps in keyed.get(c, {}).items()},
            )
            for c in sorted(set(full) | set(keyed))
        )
        self.universe_pipelines = tuple(sorted(self.universe))

    def _compile_program(self) -> None:
        """Per phase: the starters without markers, each skipAfter resolved to a program index,
        and each rule's dispatch kind (see ``Rule.dispatch``). Same order and jumps as the items list."""
        for ph, items in self.phases.items():
            prog = [it for it in items if type(it) is Rule]
            before = [0] * (len(items) + 1)  # rules among items[:k]
            for k, it in enumerate(items):
                before[k + 1] = before[k] + (type(it) is Rule)
            markers = self.markers.get(ph, {})
            for k, r in enumerate(items):
                if type(r) is not Rule:
                    continue
                r.jump = len(prog)
                if r.skip_after:
                    pos = markers.get(r.skip_after)
                    if pos:
                        j = bisect.bisect_left(pos, k + 1)
                        if j < len(pos):
                            r.jump = before[pos[j] + 1]
                r.dispatch = 0
                if r.prefilter_decides and r.pattern_id is not None and r.pipeline.idx in self.prefilter:
                    r.dispatch = 1
                elif r.tx_compare is not None and not r.tx_compare[3]:
                    pure = (
                        r.chain is None
                        and not r.setvars
                        and not r.ctls
                        and not r.log
                        and r.skip_after
                        and r.disruptive not in ("deny", "drop", "allow")
                    )
                    r.dispatch = 2 if pure else 3
                    name = "TX:" + r.tx_compare[0]
                    r.gate_name = (name, name.encode("latin-1", "replace"))
            self.program[ph] = prog
            # Runs of consecutive dispatch-1 rules: run_phase jumps from a rule the universe
            # scan rules out to the run's next candidate (or past the run) in one step.
            cpos: dict[int, int] = {}
            end = len(prog)
            for j in range(len(prog) - 1, -1, -1):
                r = prog[j]
                if r.dispatch == 1:
                    assert r.pattern_id is not None
                    cpos[r.pattern_id] = j
                    r.run_end = end
                else:
                    end = j
            self.candidate_pos[ph] = cpos

    @property
    def prefilter_state(self) -> str:
        return "on" if self.prefilter else "off"
