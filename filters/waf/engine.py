"""The SecLang engine: a Ruleset compiled once at load, a Transaction per request.

``Ruleset.load(paths, pre_text=...)`` parses SecLang, compiles every operator (RE2), interns the
transformation pipelines and builds an RE2-Set prefilter per pipeline. ``Transaction`` holds one
request's variables and runs phases 1 and 2 the way libmodsecurity3 does:

- a rule matches when any of its target values (after its transformations) matches; each
  matching value runs the rule's ``setvar``/``ctl`` actions (as libmodsecurity3 does, so
  anomaly scores add up per matching value); a chain runs its next link only when this one
  matched; the starter's disruptive action, ``log`` and ``skipAfter`` apply when the whole chain
  matched;
- transformations are cached per (value, pipeline prefix) for the request, and the prefilter
  scans each transformed value once per pipeline: a rule whose pattern the scan did not see is
  not run at all.

Engine modes: ``On`` stops at the first ``deny``/``drop``; ``DetectionOnly`` records what would
have been denied and runs everything (CRS's own test mode).
"""

from __future__ import annotations

import bisect
import logging
import os
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from filters.waf import bodies, prefilter, transforms
from filters.waf.limits import NO_LIMITS, InspectionLimits
from filters.waf.macros import Constant, Macro, value_template
from filters.waf.operators import OperatorError, Operator, _atoi, _Num, compile_rx, parse_operator
from filters.waf.seclang import Action, Directive, SecLangError, parse_actions, parse_file, parse_text


log = logging.getLogger("portvakt.waf")

PHASES = {"1": 1, "2": 2, "3": 3, "4": 4, "5": 5, "request": 2, "response": 4, "logging": 5}
DISRUPTIVE = ("deny", "drop", "block", "pass", "allow", "redirect", "proxy")

# Collections that are key -> value lists; *_NAMES variables are derived from them.
_NAMES_OF = {
    "ARGS_NAMES": "ARGS",
    "ARGS_GET_NAMES": "ARGS_GET",
    "ARGS_POST_NAMES": "ARGS_POST",
    "REQUEST_HEADERS_NAMES": "REQUEST_HEADERS",
    "REQUEST_COOKIES_NAMES": "REQUEST_COOKIES",
    "RESPONSE_HEADERS_NAMES": "RESPONSE_HEADERS",
}
COLLECTIONS = frozenset(
    {"ARGS", "ARGS_GET", "ARGS_POST", "REQUEST_HEADERS", "REQUEST_COOKIES", "FILES", "FILES_NAMES",
     "FILES_SIZES", "FILES_TMPNAMES", "FILES_TMP_CONTENT", "MULTIPART_PART_HEADERS", "RESPONSE_HEADERS",
     "ENV", "GEO", "IP", "GLOBAL", "SESSION", "USER", "RESOURCE", "RULE"}
)
SCALARS = frozenset(
    {"REQUEST_URI", "REQUEST_URI_RAW", "REQUEST_LINE", "REQUEST_METHOD", "REQUEST_PROTOCOL",
     "REQUEST_FILENAME", "REQUEST_BASENAME", "QUERY_STRING", "REQUEST_BODY", "REQUEST_BODY_LENGTH",
     "REMOTE_ADDR", "REMOTE_HOST", "REMOTE_PORT", "SERVER_ADDR", "SERVER_NAME", "SERVER_PORT",
     "UNIQUE_ID", "REQBODY_PROCESSOR", "REQBODY_ERROR", "REQBODY_ERROR_MSG", "REQBODY_PROCESSOR_ERROR",
     "MATCHED_VAR", "MATCHED_VAR_NAME", "ARGS_COMBINED_SIZE", "FILES_COMBINED_SIZE", "FULL_REQUEST",
     "FULL_REQUEST_LENGTH", "AUTH_TYPE", "PATH_INFO", "MULTIPART_FILENAME", "MULTIPART_NAME",
     "MULTIPART_STRICT_ERROR", "MULTIPART_BOUNDARY_QUOTED", "MULTIPART_BOUNDARY_WHITESPACE",
     "MULTIPART_DATA_BEFORE", "MULTIPART_DATA_AFTER", "MULTIPART_HEADER_FOLDING", "MULTIPART_LF_LINE",
     "MULTIPART_MISSING_SEMICOLON", "MULTIPART_INVALID_QUOTING", "MULTIPART_INVALID_PART",
     "MULTIPART_INVALID_HEADER_FOLDING", "MULTIPART_FILE_LIMIT_EXCEEDED", "MULTIPART_UNMATCHED_BOUNDARY",
     "MULTIPART_CRLF_LF_LINES", "INBOUND_DATA_ERROR", "URLENCODED_ERROR", "RESPONSE_BODY",
     "RESPONSE_STATUS", "RESPONSE_PROTOCOL", "RESPONSE_CONTENT_TYPE", "RESPONSE_CONTENT_LENGTH",
     "STATUS_LINE", "DURATION", "TIME", "TIME_EPOCH", "HIGHEST_SEVERITY", "REQUEST_HEADERS_LENGTH"}
)
SPECIAL = frozenset({"TX", "XML", "MATCHED_VARS", "MATCHED_VARS_NAMES"}) | frozenset(_NAMES_OF)
KNOWN_VARIABLES = COLLECTIONS | SCALARS | SPECIAL


class WafLoadError(Exception):
    """A rule set could not be loaded; the message names file and line."""


# --------------------------------------------------------------------------- targets


@dataclass(slots=True)
class VarSpec:
    coll: str
    key: str | None = None  # lower-cased exact key
    key_rx: Any = None  # compiled RE2 on the key
    count: bool = False
    exclude: bool = False

    def key_matches(self, k: str) -> bool:
        if self.key_rx is not None:
            return self.key_rx.search(k.encode("latin-1", "replace")) is not None
        return self.key is None or k.lower() == self.key


def parse_targets(text: str) -> list[VarSpec]:
    """``ARGS|!ARGS:foo|&TX:x|REQUEST_COOKIES:/^_ga/`` -> VarSpecs. Raises ValueError."""
    out: list[VarSpec] = []
    i, n = 0, len(text)
    while i < n:
        j = i
        count = exclude = False
        while j < n and text[j] in "!&":
            if text[j] == "!":
                exclude = True
            else:
                count = True
            j += 1
        k = j
        while k < n and text[k] not in ":|":
            k += 1
        coll = text[j:k].strip().upper()
        key: str | None = None
        key_rx = None
        if k < n and text[k] == ":":
            k += 1
            if k < n and text[k] == "/" and coll != "XML":
                end = k + 1
                while end < n and not (text[end] == "/" and text[end - 1] != "\\" and (end + 1 == n or text[end + 1] == "|")):
                    end += 1
                if end >= n:
                    raise ValueError(f"unterminated /regex/ selector in {text!r}")
                key_rx = compile_rx(b"(?i)" + text[k + 1 : end].encode("latin-1"))
                k = end + 1
            else:
                s = k
                while k < n and text[k] != "|":
                    k += 1
                key = text[s:k].strip().strip("'")
                key = key if coll == "XML" else key.lower()
        if coll not in KNOWN_VARIABLES:
            raise ValueError(f"unknown variable {coll!r}")
        out.append(VarSpec(coll, key, key_rx, count, exclude))
        i = k + 1 if k < n and text[k] == "|" else k
    return out


# --------------------------------------------------------------------------- rules


@dataclass(slots=True, eq=False)
class Pipeline:
    idx: int
    names: tuple[str, ...]
    fn: Callable[[bytes], bytes] | None  # the last step; None for the empty pipeline
    parent: "Pipeline | None"
    plain_identity: bool = False  # every step leaves a "plain" value (see _PLAIN) unchanged


@dataclass(slots=True)
class SetVar:
    coll: str
    name: Macro | Constant
    op: str  # "=", "+", "-", "!" (unset)
    value: Macro | Constant


@dataclass(slots=True, eq=False)
class Rule:
    id: int
    phase: int
    file: str
    line: int
    targets: list[VarSpec]
    excludes: list[VarSpec]
    op: Operator
    pipeline: Pipeline
    chain: "Rule | None" = None
    chained: bool = False  # is a chain link (not a starter)
    disruptive: str | None = None
    status: int | None = None
    log: bool = True
    capture: bool = False
    multi_match: bool = False
    setvars: list[SetVar] = field(default_factory=list)
    ctls: list[tuple[str, str]] = field(default_factory=list)
    skip_after: str | None = None
    skip: int = 0
    msg: Macro | Constant | None = None
    tags: tuple[str, ...] = ()
    severity: str | None = None
    allow: str | None = None
    pid: int | None = None  # prefilter pattern id
    actions_raw: list[Action] = field(default_factory=list)
    has_count_only: bool = False
    tsig: int = 0  # interned signature of (targets, exclusions): rules sharing it share values
    cacheable: bool = False  # targets only read request variables that do not change mid-phase
    excl_plan: dict = field(default_factory=dict)  # coll -> (exact lower keys, key regexes, all)
    fast: bool = False  # prefilter decides at rule level (positive @rx/@pm, cacheable targets)
    tx_num: tuple | None = None  # (tx key, compare, constant) for "TX:key @lt N" style rules
    mm_pipes: tuple = ()  # multiMatch: every step's pipeline, when each has a prefilter Set
    # Compiled dispatch (Ruleset._compile_program): 0 general; 1 prefilter-rejectable starter
    # (the pipeline's universe scan decides "no match" with two lookups); 2 a pure TX gate
    # ("TX:x @lt N", pass, nolog, skipAfter, no chain/setvar/ctl) run inline; 3 another TX
    # compare whose no-match is decided inline.
    kind: int = 0
    jump: int = 0  # index in the phase program after this rule's skipAfter marker
    gate_name: tuple = ()  # (MATCHED_VAR_NAME str, its bytes) for kind 2


@dataclass(slots=True)
class Marker:
    name: str


SEVERITIES = {"0": "EMERGENCY", "1": "ALERT", "2": "CRITICAL", "3": "ERROR", "4": "WARNING", "5": "NOTICE", "6": "INFO", "7": "DEBUG"}


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
        self._pids = 0
        self.patterns: list[tuple[int, int, list[bytes], bool]] = []  # (pipeline idx, pid, srcs, caseless)
        self.empty = self.pipeline(())
        self._ctl_memo: dict[tuple[str, str], tuple[tuple[int, ...], tuple[VarSpec, ...]]] = {}
        self.key_rx_cache: dict[tuple[int, str], bool] = {}
        self.tcache: dict[tuple[int, bytes], bytes] = {}
        self.scache: dict[tuple[int, bytes], Any] = {}
        self.plain_cache: dict[bytes, bool] = {}
        self.mm_cache: dict[tuple, bytes | None] = {}  # (pipeline, pure operator, raw value) -> matching step
        self.uvalue_cache: dict[tuple[int, bytes], Any] = {}  # (variable group, raw value) -> Set results
        self.uvalue_seen: dict[tuple[int, bytes], int] = {}  # value -> the universe pass that met it
        self.serial = 0  # universe pass counter
        self.universe: dict[int, tuple[tuple[str, frozenset[str] | None], ...]] = {}
        self.uni_plan: tuple = ()  # (variable, (group id, pipelines), {key: (group id, pipelines)})
        self.uni_pipes: tuple[int, ...] = ()
        self.program: dict[int, list[Rule]] = {p: [] for p in range(1, 6)}

    # ----- building
    @classmethod
    def load(cls, files: Iterable[str], pre_text: str = "", post_text: str = "", prefilter: str = "on") -> "Ruleset":
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
        rs._compile_prefilter(prefilter)
        rs._compile_program()
        return rs

    @classmethod
    def from_text(cls, text: str, path: str = "<string>", prefilter: str = "on") -> "Ruleset":
        rs = cls()
        try:
            directives = parse_text(text, path)
        except SecLangError as e:
            raise WafLoadError(str(e)) from None
        rs._build(directives)
        rs._compile_prefilter(prefilter)
        rs._compile_program()
        return rs

    def pipeline(self, names: tuple[str, ...]) -> Pipeline:
        p = self.pipelines.get(names)
        if p is None:
            parent = self.pipeline(names[:-1]) if names else None
            p = Pipeline(len(self.pipeline_list), names, transforms.get(names[-1]) if names else None, parent,
                         all(n in transforms.PLAIN_IDENTITY for n in names))
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
                        self._remove(lambda r, s=spec: _id_in(r.id, s))
                elif name == "SecRuleRemoveByTag":
                    rx = compile_rx(d.args[0].encode("latin-1"))
                    self._remove(lambda r: any(rx.search(t.encode("latin-1", "replace")) for t in r.tags))
                elif name == "SecRuleRemoveByMsg":
                    rx = compile_rx(d.args[0].encode("latin-1"))
                    self._remove(lambda r: r.msg is not None and isinstance(r.msg, Constant) and rx.search(r.msg.value))
                elif name in ("SecRuleUpdateTargetById", "SecRuleUpdateTargetByTag"):
                    specs = parse_targets(d.args[1])
                    if name.endswith("ById"):
                        sel = [r for r in self._all_rules() if _id_in(r.id, d.args[0])]
                    else:
                        rx = compile_rx(d.args[0].encode("latin-1"))
                        sel = [r for r in self._all_rules() if any(rx.search(t.encode("latin-1", "replace")) for t in r.tags)]
                    for r in sel:
                        _update_targets(r, specs, d.args[2] if len(d.args) > 2 else None)
                elif name == "SecRuleUpdateActionById":
                    rid = int(d.args[0].split(":")[0])
                    r = self.by_id.get(rid)
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
            raise WafLoadError(f"rule {chain_parent.id} ({chain_parent.file}:{chain_parent.line}): chain without a following rule")
        sigs: dict[str, int] = {}
        for r0 in self._all_rules():
            r = r0
            while r is not None:
                r.excl_plan = _excl_plan(r.excludes)
                r.cacheable = all(t.coll in CACHEABLE for t in r.targets)
                sig = repr([(t.coll, t.key, t.key_rx and t.key_rx.pattern, t.count) for t in r.targets]) + repr(
                    [(e.coll, e.key, e.key_rx and e.key_rx.pattern) for e in r.excludes])
                r.tsig = sigs.setdefault(sig, len(sigs))
                r.fast = (r.pid is not None and r.cacheable and not r.op.negated and not r.multi_match)
                t0 = r.targets[0] if len(r.targets) == 1 else None
                if (t0 is not None and t0.coll == "TX" and t0.key is not None and not r.excludes
                        and r.pipeline.fn is None and isinstance(r.op, _Num) and r.op.macro is None
                        and not r.multi_match):
                    r.tx_num = (t0.key, type(r.op).cmp, _atoi(r.op.arg.encode()), t0.count)
                r = r.chain
        for ph, items in self.phases.items():
            m: dict[str, list[int]] = {}
            for i, it in enumerate(items):
                if type(it) is Marker:
                    m.setdefault(it.name, []).append(i)
            self.markers[ph] = m

    CACHE_ENTRIES = 10_000
    SHARED_MAX = 1024  # bytes: larger values are cached for their own request only

    def trim_caches(self) -> None:
        """Bound the shared value caches (cheap length checks per request)."""
        if len(self.tcache) > self.CACHE_ENTRIES:
            self.tcache.clear()
        if len(self.scache) > self.CACHE_ENTRIES:
            self.scache.clear()
        if len(self.plain_cache) > self.CACHE_ENTRIES:
            self.plain_cache.clear()
        if len(self.mm_cache) > self.CACHE_ENTRIES:
            self.mm_cache.clear()
        if len(self.uvalue_cache) > self.CACHE_ENTRIES:
            self.uvalue_cache.clear()
        if len(self.uvalue_seen) > self.CACHE_ENTRIES:
            self.uvalue_seen.clear()

    def clear_caches(self) -> None:
        """Forget every value met so far (benchmarks: the cost of values never seen before)."""
        for cache in (self.tcache, self.scache, self.plain_cache, self.mm_cache, self.uvalue_cache,
                      self.uvalue_seen, self.key_rx_cache):
            cache.clear()

    def ctl_targets(self, kind: str, value: str) -> tuple[tuple[int, ...], tuple[VarSpec, ...]]:
        """Resolve ``ctl:ruleRemoveTarget{ById,ByTag}=sel;TARGETS`` once per rule set (memoised)."""
        key = (kind, value)
        r = self._ctl_memo.get(key)
        if r is None:
            sel, _, target = value.partition(";")
            specs = tuple(VarSpec(s.coll, s.key, s.key_rx, s.count, True) for s in parse_targets(target))
            if kind == "ruleremovetargetbyid":
                ids = tuple(r for r in self.by_id if _id_in(r, sel))
            else:
                ids = tuple(r.id for r in self.by_id.values() if sel in r.tags)
            r = self._ctl_memo[key] = (ids, specs)
        return r

    def _all_rules(self) -> list[Rule]:
        return [r for items in self.phases.values() for r in items if type(r) is Rule]

    def _remove(self, pred: Callable[[Rule], bool]) -> None:
        for ph, items in self.phases.items():
            keep = [it for it in items if type(it) is Marker or not pred(it)]
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
            rule.pid = self._pids
            self._pids += 1
            p: Pipeline | None = rule.pipeline
            while p is not None:  # multiMatch also tests every intermediate step
                self.patterns.append((p.idx, rule.pid, op.rx_source, op.rx_caseless))
                p = p.parent if rule.multi_match else None
        rule.has_count_only = all(s.count for s in rule.targets)
        return rule

    def _apply_actions(self, rule: Rule, acts: list[Action], update: bool, where: str, inherit_t: bool = True) -> None:
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
                rule.setvars.append(_parse_setvar(v or ""))
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
            elif n in ("id", "phase", "chain", "auditlog", "noauditlog", "logdata", "ver", "rev", "maturity",
                       "accuracy", "expirevar", "initcol", "setenv", "setuid", "setsid", "deprecatevar",
                       "sanitisearg", "sanitisematched", "sanitisematchedbytes", "sanitiserequestheader",
                       "sanitiseresponseheader", "xmlns", "append", "prepend", "exec"):
                pass
            else:
                raise ValueError(f"unknown action {n!r}")
        rule.pipeline = self.pipeline(tuple(names))

    def _compile_prefilter(self, mode: str = "on") -> None:
        """``on``: one RE2 Set per pipeline (see prefilter.py); ``off``: every rule runs its RE2."""
        self.prefilter_unsafe = {pid for _, pid, _, _ in self.patterns}
        if mode == "off" or not self.patterns:
            return
        unsafe, sets = prefilter.build(self.patterns)
        self.prefilter = sets
        self.prefilter_unsafe = unsafe
        universe: dict[int, dict[str, set[str] | None]] = {}
        for r0 in self._all_rules():
            r = r0
            while r is not None:
                if r.pid in unsafe:
                    r.fast = False
                pipes: list[Pipeline] = []
                if r.fast:
                    pipes = [r.pipeline]
                elif (r.multi_match and r.pid is not None and r.pid not in unsafe and r.cacheable
                      and not r.op.negated):
                    q: Pipeline | None = r.pipeline
                    while q is not None:
                        pipes.append(q)
                        q = q.parent
                    if all(q.idx in sets for q in pipes):
                        r.mm_pipes = tuple(pipes)
                    else:
                        pipes = []
                for q in pipes:
                    u = universe.setdefault(q.idx, {})
                    for t in r.targets:
                        if t.key is not None and t.coll not in ("XML",) and u.get(t.coll, set()) is not None:
                            u.setdefault(t.coll, set()).add(t.key)  # type: ignore[union-attr]
                        else:
                            u[t.coll] = None  # the whole collection
                r = r.chain
        # Per pipeline: every variable any prefiltered rule of that pipeline reads (whole
        # collections, before exclusions): one scan of all of them rules most rules out at once.
        self.universe = {k: tuple(sorted((c, frozenset(keys) if keys is not None else None) for c, keys in v.items()))
                         for k, v in universe.items()}
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

        self.uni_plan = tuple(
            (c, group(full.get(c, [])), {k: group(full.get(c, []) + ps) for k, ps in keyed.get(c, {}).items()})
            for c in sorted(set(full) | set(keyed)))
        self.uni_pipes = tuple(sorted(self.universe))

    def _compile_program(self) -> None:
        """Per phase: the starters without markers, each skipAfter resolved to a program index,
        and each rule's dispatch kind (see ``Rule.kind``). Same order and jumps as the items list."""
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
                r.kind = 0
                if r.fast and r.pid is not None and r.pipeline.idx in self.prefilter:
                    r.kind = 1
                elif r.tx_num is not None and not r.tx_num[3]:
                    pure = (r.chain is None and not r.setvars and not r.ctls and not r.log and r.skip_after
                            and r.disruptive not in ("deny", "drop", "allow"))
                    r.kind = 2 if pure else 3
                    name = "TX:" + r.tx_num[0]
                    r.gate_name = (name, name.encode("latin-1", "replace"))
            self.program[ph] = prog

    @property
    def prefilter_state(self) -> str:
        return "on" if self.prefilter else "off"


CACHEABLE = (COLLECTIONS | SCALARS | {"XML"} | frozenset(_NAMES_OF)) - {
    "MATCHED_VAR", "MATCHED_VAR_NAME", "REQBODY_PROCESSOR", "REQBODY_ERROR", "REQBODY_ERROR_MSG",
    "REQBODY_PROCESSOR_ERROR", "RULE", "IP", "GLOBAL", "SESSION", "USER", "RESOURCE", "ENV"}


def _excl_plan(excludes: list[VarSpec]) -> dict:
    plan: dict[str, tuple[frozenset[str], tuple, bool]] = {}
    for e in excludes:
        exact, rxs, all_ = plan.get(e.coll, (frozenset(), (), False))
        if e.key_rx is not None:
            rxs = rxs + (e.key_rx,)
        elif e.key is not None:
            exact = exact | {e.key}
        else:
            all_ = True
        plan[e.coll] = (exact, rxs, all_)
    return plan


_EMPTY: frozenset[int] = frozenset()
_NO_MATCHES: tuple = ()  # MATCHED_VARS after a rule that did not match (never mutated)
_ATOI: dict[bytes, int] = {}  # atoi of TX values (pure; bounded)
# Values no decoding/normalising transformation changes (lower-case words, numbers, dotted names).
_PLAIN = re.compile(rb"(?:[a-z0-9_][a-z0-9_.@:=]*)?\Z")


def _union(sets: list[Any]) -> Any:
    """Union of candidate sets (prefilter.ALL absorbs); never mutates its inputs."""
    sets = [c for c in sets if c]
    if not sets:
        return _EMPTY
    if len(sets) == 1:
        return sets[0]
    for c in sets:
        if c is prefilter.ALL:
            return c
    return frozenset().union(*sets)


def _id_in(rid: int, spec: str) -> bool:
    spec = spec.strip()
    if "-" in spec[1:]:
        lo, _, hi = spec.partition("-")
        return int(lo) <= rid <= int(hi)
    return rid == int(spec)


def _update_targets(rule: Rule, specs: list[VarSpec], replace: str | None) -> None:
    for s in specs:
        if s.exclude:
            rule.excludes.append(s)
        elif replace:
            old = parse_targets(replace)
            rule.targets = [t for t in rule.targets if not any(t.coll == o.coll and t.key == o.key for o in old)]
            rule.targets.append(s)
        else:
            rule.targets.append(s)


def _parse_setvar(v: str) -> SetVar:
    v = v.strip()
    if v.startswith("!"):
        coll, _, name = v[1:].partition(".")
        return SetVar(coll.upper(), value_template(name.lower()), "!", Constant(""))
    lhs, eq, rhs = v.partition("=")
    coll, _, name = lhs.strip().partition(".")
    if not name:
        raise ValueError(f"setvar needs collection.name: {v!r}")
    if not eq:
        return SetVar(coll.upper(), value_template(name.lower()), "=", Constant("1"))
    op = "="
    if rhs[:1] in "+-" and rhs[1:2] and (rhs[1:2].isdigit() or rhs[1:3] == "%{"):
        op, rhs = rhs[0], rhs[1:]
    return SetVar(coll.upper(), value_template(name.lower()), op, value_template(rhs))


# --------------------------------------------------------------------------- transaction


@dataclass
class Outcome:
    matched: list[int]  # logged rule ids, in order
    interrupted: bool  # a deny/drop fired (enforced or, in DetectionOnly, would have)
    status: int | None
    rule_id: int | None  # the rule that interrupted
    score: int
    limit: str | None = None  # the inspection limit the request went over (no rule ran)


class Transaction:
    """One request through a Ruleset. Not thread-safe; one per request."""

    def __init__(
        self,
        rs: Ruleset,
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
    ):
        self.rs = rs
        self.c: dict[str, list[tuple[str, bytes]]] = {}
        self.s: dict[str, bytes] = {}
        self.tx: dict[str, bytes] = {}
        self.xml_text: list[bytes] = []
        self.xml_attrs: list[bytes] = []
        self.matched_vars: list[tuple[str, bytes]] = []
        self.logged: list[int] = []
        self.removed_ids = set(removed_ids)
        self.removed_tags: set[str] = set()
        self.removed_targets: dict[int, tuple[VarSpec, ...]] = {k: tuple(v) for k, v in (removed_targets or {}).items()}
        self.engine = "DetectionOnly" if detection_only else rs.engine_mode
        self.interrupted = False
        self.would_interrupt: tuple[int, int] | None = None
        # Transformation, Set-scan and plain-value results are pure functions of (pipeline, value):
        # they live on the rule set, shared by consecutive requests (header values, cookie names
        # and argument names repeat), bounded by clearing when large. Inspection is synchronous,
        # so no other request touches them meanwhile.
        rs.trim_caches()
        self._tcache = rs.tcache
        self._scache = rs.scache
        self._tbig: dict[tuple[int, bytes], bytes] = {}  # values over SHARED_MAX: this request only
        self._sbig: dict[tuple[int, bytes], Any] = {}
        self._vcache: dict[int, list[tuple[str, bytes]]] = {}
        self._pcache: dict[tuple[int, int], tuple[list, set[int]]] = {}
        self._kcache: dict[tuple[int, str], bool] = {}
        self._icache: dict[str, tuple[list, dict]] = {}
        self._ucache: dict[int, Any] = {}
        self._uvals: dict[tuple, list[bytes]] = {}
        self._plain = rs.plain_cache
        self.body = body
        self.body_processor = body_processor
        # The hostile-shape limits (see limits.py). ``max_args`` alone (older callers) means
        # SecArgumentsLimit with partial inspection: the first ones are inspected and
        # args_limit_exceeded is set. A limit reached otherwise sets limit_exceeded, and
        # process_request then runs no rule.
        if limits is None:
            limits = InspectionLimits(max_args=max_args, args_partial=True) if max_args else NO_LIMITS
        self.limits = limits
        self.max_args = limits.max_args
        self.args_limit_exceeded = False
        self.limit_exceeded: str | None = None
        self._parsed_body: tuple[str, bodies.BodyResult] | None = None  # parsed before phase 1
        self.phase_allow = False
        self.force_body_var = False
        self.allow_all = False
        self._set_request(method, uri, protocol, headers or [], remote_addr, unique_id)
        if self.limit_exceeded is None and body and self.body_processor:
            # Parsed now, so a body over a limit is refused before any rule runs; phase 2 uses
            # this result unless a phase-1 ctl chose another processor.
            res = self._parse_body(self.body_processor)
            self._parsed_body = (self.body_processor, res)
            self._check_body_limits(res)
        for k, v in (tx_vars or {}).items():
            self.tx[k.lower()] = v.encode() if isinstance(v, str) else v

    # ----- request variables
    def _set_request(self, method, uri, protocol, headers, remote_addr, unique_id) -> None:
        s = self.s
        c = self.c
        raw = _b(uri)
        path_q = raw
        m = re.match(rb"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#]*", raw)
        if m:
            path_q = raw[m.end() :] or b"/"
        path, q, query = path_q.partition(b"?")
        query = query.split(b"#", 1)[0] if q else b""
        fname = transforms.url_decode_uni(path.replace(b"+", b"%2B")) if b"%" in path else path
        s["REQUEST_URI_RAW"] = raw
        s["REQUEST_URI"] = path_q
        s["REQUEST_FILENAME"] = fname
        s["PATH_INFO"] = fname
        i = max(fname.rfind(b"/"), fname.rfind(b"\\"))
        s["REQUEST_BASENAME"] = fname[i + 1 :] if i >= 0 else fname
        s["QUERY_STRING"] = query
        mb = _b(method)
        pb = _b(protocol)
        s["REQUEST_METHOD"] = mb
        s["REQUEST_PROTOCOL"] = pb
        s["REQUEST_LINE"] = mb + b" " + raw + b" " + pb
        s["REMOTE_ADDR"] = remote_addr.encode()
        s["REMOTE_HOST"] = s["REMOTE_ADDR"]
        s["UNIQUE_ID"] = (unique_id or secrets.token_hex(12)).encode()
        s["REQBODY_ERROR"] = b"0"
        s["REQBODY_PROCESSOR_ERROR"] = b"0"
        s["INBOUND_DATA_ERROR"] = b"0"
        hdrs = [(str(k) if isinstance(k, str) else k.decode("latin-1"), _b(v)) for k, v in headers]
        lim = self.limits
        if lim.max_headers and len(hdrs) > lim.max_headers:
            self.limit_exceeded = "too_many_headers"
        c["REQUEST_HEADERS"] = hdrs
        self.headers_lower: dict[str, bytes] = {}
        for k, v in hdrs:
            self.headers_lower.setdefault(k.lower(), v)
        cookies: list[tuple[str, bytes]] = []
        for k, v in hdrs:
            if k.lower() == "cookie":
                for piece in v.split(b";"):
                    if not piece.strip():
                        continue
                    ck, eq, cv = piece.partition(b"=")
                    cookies.append((ck.strip().decode("latin-1"), cv.strip() if eq else b""))
        c["REQUEST_COOKIES"] = cookies
        if lim.max_args and bodies.count_urlencoded(query) > lim.max_args:
            args_get = bodies.parse_urlencoded(query, lim.max_args)
            self.args_limit_exceeded = True
            if not lim.args_partial:
                self.limit_exceeded = self.limit_exceeded or "too_many_args"
        else:
            args_get = bodies.parse_urlencoded(query)
        c["ARGS_GET"] = args_get
        c["ARGS_POST"] = []
        c["ARGS"] = list(args_get)
        ct = self.headers_lower.get("content-type", b"").lower()
        proc = None
        if ct.startswith(b"application/x-www-form-urlencoded"):
            proc = "URLENCODED"
        elif ct.startswith(b"multipart/form-data"):
            proc = "MULTIPART"
        elif re.match(rb"^(?:application(?:/soap\+|/)|text/)xml", ct):
            proc = "XML"  # modsecurity.conf-recommended rule 200000
        elif re.match(rb"^application/json", ct):
            proc = "JSON"  # modsecurity.conf-recommended rule 200001
        if self.body_processor is None:
            self.body_processor = proc
        if self.body_processor:
            s["REQBODY_PROCESSOR"] = self.body_processor.encode()
        s["REQUEST_BODY"] = b""
        s["REQUEST_BODY_LENGTH"] = str(len(self.body)).encode()
        s["ARGS_COMBINED_SIZE"] = str(sum(len(k) + len(v) for k, v in args_get)).encode()
        s["REQUEST_HEADERS_LENGTH"] = str(sum(len(k) + len(v) for k, v in hdrs)).encode()

    def _clear_caches(self) -> None:
        """Variables changed: drop the per-request value/prefilter caches (not transformations)."""
        self._vcache.clear()
        self._pcache.clear()
        self._ucache.clear()
        self._uvals.clear()
        for n in _NAMES_OF:
            self.c.pop(n, None)

    def _process_body(self) -> None:
        body = self.body
        s, c = self.s, self.c
        proc = self.body_processor
        before = s.get("REQUEST_BODY")
        # As ModSecurity: REQUEST_BODY with the URL-encoded processor, without a processor, or
        # when ctl:forceRequestBodyVariable=On; a parsed JSON/XML/multipart body is in ARGS etc.
        if proc in (None, "URLENCODED") or self.force_body_var:
            s["REQUEST_BODY"] = body
        else:
            s.pop("REQUEST_BODY", None)
        s["REQUEST_BODY_LENGTH"] = str(len(body)).encode()
        if not body or not proc:
            if body or s.get("REQUEST_BODY") != before:
                self._clear_caches()
            return
        self._clear_caches()
        if proc not in ("URLENCODED", "JSON", "MULTIPART", "XML"):
            return
        if self._parsed_body is not None and self._parsed_body[0] == proc:
            res = self._parsed_body[1]
        else:  # a phase-1 ctl chose this processor: parse and check the limits now
            res = self._parse_body(proc)
            if self._check_body_limits(res):
                return
        for k, v in res.flags.items():
            s[k] = str(v).encode()
        if res.error:
            s["REQBODY_ERROR"] = b"1"
            s["REQBODY_PROCESSOR_ERROR"] = b"1"
            s["REQBODY_ERROR_MSG"] = res.error.encode("latin-1", "replace")
            # Unparsed: the rules must still see the content. REQUEST_BODY, and the body read as
            # URL-encoded into ARGS (as CRS 901350 does for unknown types), so a broken JSON or XML
            # document cannot hide a payload from the argument rules.
            s["REQUEST_BODY"] = body
            if not res.args and proc in ("JSON", "XML"):
                res.args = bodies.parse_urlencoded(body)
        args = res.args
        if self.max_args and len(c["ARGS_GET"]) + len(args) > self.max_args:  # args_partial
            args = args[: max(0, self.max_args - len(c["ARGS_GET"]))]
            self.args_limit_exceeded = True
        c["ARGS_POST"] = args
        c["ARGS"] = c["ARGS_GET"] + args
        c["FILES"] = res.files
        c["FILES_NAMES"] = res.files_names
        c["FILES_SIZES"] = res.files_sizes
        c["MULTIPART_PART_HEADERS"] = res.part_headers
        if res.files:
            s["MULTIPART_FILENAME"] = res.files[-1][1]
        s["FILES_COMBINED_SIZE"] = str(sum(int(v) for _, v in res.files_sizes)).encode()
        s["ARGS_COMBINED_SIZE"] = str(sum(len(k) + len(v) for k, v in c["ARGS"])).encode()
        self.xml_text = res.xml_text
        self.xml_attrs = res.xml_attrs

    def _parse_body(self, proc: str) -> bodies.BodyResult:
        """The body through processor ``proc``, within the limits. Never raises: a processor
        failing unexpectedly is a body that does not parse (fail closed)."""
        lim = self.limits
        body = self.body
        # arguments the body may still add (None: no limit; args_partial: cut later instead)
        room = None if (not lim.max_args or lim.args_partial) else max(0, lim.max_args - len(self.c["ARGS_GET"]))
        try:
            if proc == "URLENCODED":
                return bodies.urlencoded(body, room)
            if proc == "JSON":
                return bodies.json_body(body, lim.max_json_depth, lim.max_json_values, room)
            if proc == "MULTIPART":
                ct = self.headers_lower.get("content-type", b"").decode("latin-1")
                res = bodies.multipart(body, ct, lim.max_multipart_parts)
                if room is not None and res.limit is None and len(res.args) > room:
                    res.limit = "too_many_args"
                return res
            if proc == "XML":
                return bodies.xml_body(body, room)
        except Exception as e:  # noqa: BLE001 - a body processor bug must not become a 500
            log.warning("WAF body processor %s failed: %s", proc, type(e).__name__)
            return bodies.BodyResult(error=f"{proc} body processor failed")
        return bodies.BodyResult()

    def _check_body_limits(self, res: bodies.BodyResult) -> bool:
        """Record the limit a parsed body went over (or, when refused, its parse error)."""
        if res.limit is not None:
            self.limit_exceeded = res.limit
        elif res.error and self.limits.reject_unparsable:
            self.limit_exceeded = "body_unparsable"
            self.s["REQBODY_ERROR"] = b"1"
        return self.limit_exceeded is not None

    # ----- variable access
    def _collection(self, name: str) -> list[tuple[str, bytes]]:
        if name == "TX":
            return list(self.tx.items())
        if name in _NAMES_OF:
            r = self.c.get(name)
            if r is None:
                r = self.c[name] = [(k, k.encode("latin-1", "replace")) for k, _ in self.c.get(_NAMES_OF[name], ())]
            return r
        if name == "MATCHED_VARS":
            return [(k, v) for k, v in self.matched_vars]
        if name == "MATCHED_VARS_NAMES":
            return [(k, k.encode("latin-1", "replace")) for k, _ in self.matched_vars]
        return self.c.get(name, [])

    def values(self, rule: Rule) -> list[tuple[str, bytes]]:
        """(variable name, value) pairs of a rule's targets, exclusions applied. Cached per
        target signature (and runtime exclusion set) while the request's variables do not change."""
        extra = self.removed_targets.get(rule.id) if self.removed_targets else None
        if extra:
            key: Any = (rule.tsig, id(extra))
        else:
            key = rule.tsig
        if rule.cacheable:
            r = self._vcache.get(key)
            if r is None:
                plan = _excl_plan(rule.excludes + list(extra)) if extra else rule.excl_plan
                r = self._vcache[key] = self._values(rule.targets, plan)
            return r
        plan = _excl_plan(rule.excludes + list(extra)) if extra else rule.excl_plan
        return self._values(rule.targets, plan)

    def _values(self, targets: list[VarSpec], plan: dict) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        s = self.s
        for spec in targets:
            coll = spec.coll
            ex = plan.get(coll) if plan else None
            if coll in s or coll in SCALARS:
                v = s.get(coll)
                if spec.count:
                    out.append((coll, b"1" if v is not None else b"0"))
                elif v is not None and not (ex and ex[2]):
                    out.append((coll, v))
                continue
            if coll == "XML":
                items = self.xml_attrs if spec.key and "@" in spec.key else self.xml_text
                if spec.count:
                    out.append(("XML", str(len(items)).encode()))
                else:
                    name = f"XML:{spec.key or '/*'}"
                    out.extend((name, v) for v in items)
                continue
            if coll == "MATCHED_VAR" or coll == "MATCHED_VAR_NAME":
                continue
            if coll == "TX" and spec.key is not None:
                v = self.tx.get(spec.key)
                if spec.count:
                    out.append(("TX", b"1" if v is not None else b"0"))
                elif v is not None:
                    out.append(("TX:" + spec.key, v))
                continue
            items = self._collection(coll)
            if not items:
                if spec.count:
                    out.append((coll, b"0"))
                continue
            if spec.key is not None:
                sel = self._index(coll, items).get(spec.key, ())
            elif spec.key_rx is not None:
                # _key_rx's cache lookup inline (TX:/regex/ walks every TX variable)
                kc = self.rs.key_rx_cache
                rx = spec.key_rx
                rid = id(rx)
                sel = []
                for kv in items:
                    hit = kc.get((rid, kv[0]))
                    if hit is None:
                        hit = self._key_rx(rx, kv[0])
                    if hit:
                        sel.append(kv)
            else:
                sel = items
            if ex:
                if ex[2]:
                    sel = []
                else:
                    exact, rxs = ex[0], ex[1]
                    sel = [kv for kv in sel if kv[0].lower() not in exact and not (rxs and any(self._key_rx(r, kv[0]) for r in rxs))]
            if spec.count:
                out.append((coll, str(len(sel)).encode()))
            else:
                out.extend((f"{coll}:{k}", v) for k, v in sel)
        return out

    def _index(self, coll: str, items: list[tuple[str, bytes]]) -> dict[str, list[tuple[str, bytes]]]:
        idx = self._icache.get(coll)
        if idx is None or idx[0] is not items:
            d: dict[str, list[tuple[str, bytes]]] = {}
            for kv in items:
                d.setdefault(kv[0].lower(), []).append(kv)
            idx = self._icache[coll] = (items, d)
        return idx[1]

    def _key_rx(self, rx: Any, key: str) -> bool:
        # Shared across requests (rule-set lifetime, cleared when large): key names repeat.
        kc = self.rs.key_rx_cache
        ck = (id(rx), key)
        r = kc.get(ck)
        if r is None:
            if len(kc) > 50_000:
                kc.clear()
            r = kc[ck] = rx.search(key.encode("utf-8", "surrogateescape")) is not None
        return r

    def macro_value(self, coll: str, key: str | None) -> bytes:
        if coll == "TX":
            return self.tx.get((key or "").lower(), b"")
        if key is None:
            if coll in self.s:
                return self.s[coll]
            return b""
        if coll == "RULE":
            r = getattr(self, "_rule", None)
            if r is None:
                return b""
            if key.lower() == "id":
                return str(r.id).encode()
            if key.lower() == "msg" and r.msg is not None:
                return r.msg.expand(self)
            return b""
        kl = key.lower()
        for k, v in self._collection(coll):
            if k.lower() == kl:
                return v
        return b""

    def set_captures(self, groups: list[bytes]) -> None:
        for i, g in enumerate(groups):
            self.tx[str(i)] = g

    # ----- transformation + prefilter caches
    def transform(self, v: bytes, p: Pipeline) -> bytes:
        """``v`` through pipeline ``p``, cached per (pipeline prefix, value) for the request."""
        if p.fn is None:
            return v
        if p.plain_identity:
            pl = self._plain.get(v)
            if pl is None:
                pl = _PLAIN.match(v) is not None
                if len(v) <= 1024:
                    self._plain[v] = pl
            if pl:
                return v
        c = self._tcache if len(v) <= 1024 else self._tbig
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
            r = q.fn(r)
            c[(q.idx, v)] = r
        return r

    def _universe(self, p: Pipeline):
        """Candidate pattern ids over the variables the prefiltered rules read, for every
        pipeline at once (pattern ids are unique to a pipeline's Set, multiMatch steps aside,
        where it only widens which steps are tried): one pass over the request's variables.

        A value met in an earlier request (client headers, cookie and argument names) keeps
        its Set results, over every pipeline that reads its variable, per (variable group, raw
        value) across requests; new values are transformed and scanned per pipeline joined by
        newlines (a pattern that matches one of them also matches the joined buffer). Only
        "not a candidate" is acted on."""
        rs = self.rs
        gc = rs.uvalue_cache
        seen = rs.uvalue_seen
        rs.serial += 1
        serial = rs.serial  # this pass: tells its own values from earlier passes' in uvalue_seen
        big = rs.SHARED_MAX
        plist = rs.pipeline_list
        tf = self.transform
        cand = self.candidates
        plain = self._plain
        s = self.s
        found: list[Any] = []
        fresh: dict[int, list[bytes]] = {}
        for coll, grp, keyed in rs.uni_plan:
            v = s.get(coll)
            if v is not None:
                pairs: Any = ((grp, v),)
            elif coll == "XML":
                pairs = [(grp, x) for x in self.xml_text] + [(grp, x) for x in self.xml_attrs]
            elif coll in SCALARS:
                continue
            else:
                items = self._collection(coll)
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
                    c = gc[k] = _union(cs)
                    if c:
                        found.append(c)
                else:
                    if len(v) <= big:
                        seen[k] = serial
                    # a plain value (see _PLAIN) is its own transform in plain-identity pipelines
                    pv = plain.get(v)
                    if pv is None:
                        pv = _PLAIN.match(v) is not None
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
            c = cand(q, fl[0] if len(fl) == 1 else b"\n".join(fl))
            if c:
                found.append(c)
        r = _union(found)
        uc = self._ucache
        for q in rs.uni_pipes:
            uc[q] = r
        uc[p.idx] = r
        return r

    def _universe_values(self, spec: tuple) -> list[bytes]:
        vals: list[bytes] = []
        s = self.s
        for coll, keys in spec:
            if coll in s:
                vals.append(s[coll])
            elif coll == "XML":
                vals.extend(self.xml_text)
                vals.extend(self.xml_attrs)
            elif coll not in SCALARS:
                items = self._collection(coll)
                if keys is None:
                    vals.extend(v for _, v in items)
                elif items:
                    idx = self._index(coll, items)
                    for k in keys:
                        vals.extend(v for _, v in idx.get(k, ()))
        return vals

    def candidates(self, pidx: int, v: bytes):
        """Pattern ids of pipeline ``pidx`` that match ``v`` (or prefilter.ALL)."""
        key = (pidx, v)
        sc = self._scache if len(v) <= 1024 else self._sbig
        r = sc.get(key)
        if r is None:
            ps = self.rs.prefilter.get(pidx)
            r = sc[key] = ps.scan(v) if ps is not None else prefilter.ALL
        return r

    # ----- evaluation
    def _eval_link(self, rule: Rule) -> bool:
        txn = rule.tx_num
        if txn is not None:
            # TX:name compared with a constant number (CRS's paranoia/threshold gates)
            v = self.tx.get(txn[0])
            if txn[3]:  # &TX:name: 1 when set, else 0
                v = b"1" if v is not None else b"0"
                if txn[1](int(v), txn[2]) == rule.op.negated:
                    return False
                return self._confirm(rule, [("TX", v)], check=False)
            if v is None or (txn[1](_atoi(v), txn[2]) == rule.op.negated):
                return False
            return self._confirm(rule, [("TX:" + txn[0], v)], check=False)
        if rule.fast and rule.pipeline.idx in self.rs.prefilter:
            u = self._ucache.get(rule.pipeline.idx)
            if u is None:
                u = self._universe(rule.pipeline)
            if rule.pid not in u:
                return False
            extra = self.removed_targets.get(rule.id) if self.removed_targets else None
            key = (rule.tsig, rule.pipeline.idx, id(extra) if extra else 0)
            entry = self._pcache.get(key)
            if entry is None:
                p = rule.pipeline
                tvals = [(name, self.transform(v, p)) for name, v in self.values(rule)]
                if not tvals:
                    entry = (tvals, _EMPTY)
                else:
                    # One Set scan over all values of this target set, joined by newlines: every
                    # pattern that matches one value also matches the joined buffer (patterns run
                    # multi-line, so ^/$ hold at value edges); extra hits are confirmed per value.
                    buf = tvals[0][1] if len(tvals) == 1 else b"\n".join(tv for _, tv in tvals)
                    entry = (tvals, self.candidates(p.idx, buf))
                self._pcache[key] = entry
            pid = rule.pid
            if pid not in entry[1]:
                return False
            tvals = entry[0]
            if len(tvals) > 1:  # which values: per-value scans (cached, shared by all rules)
                pidx = rule.pipeline.idx
                tvals = [nt for nt in tvals if pid in self.candidates(pidx, nt[1])]
            return self._confirm(rule, tvals)
        hot = None
        if rule.mm_pipes:
            # multiMatch: only steps whose universe scan saw the pattern can match
            hot = set()
            for q in rule.mm_pipes:
                u = self._ucache.get(q.idx)
                if u is None:
                    u = self._universe(q)
                if rule.pid in u:
                    hot.add(q.idx)
            if not hot:
                return False
        vals = self.values(rule)
        if not vals:
            return False
        op = rule.op
        neg = op.negated
        pid = rule.pid
        use_pf = pid is not None and pid not in self.rs.prefilter_unsafe and rule.pipeline.idx in self.rs.prefilter
        matched = False
        new_matches: list[tuple[str, bytes]] = []
        # multiMatch with a pure operator (libinjection): the verdict over all steps is a function
        # of (pipeline, operator, raw value), kept across requests; a hit that matched replays the
        # operator on the matching step (cached too) so captures are set as before.
        mmc = self.rs.mm_cache if (rule.multi_match and op.pure and not neg and hot is None) else None
        for name, v in vals:
            if mmc is not None:
                ck = (rule.pipeline.idx, type(op), v)
                tv = mmc.get(ck, False)
                if tv is not False:
                    if tv is None or not op.match(self, tv, rule.capture):
                        continue
                else:
                    tv = None
                    p = rule.pipeline
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
                    if len(v) <= self.rs.SHARED_MAX:
                        mmc[ck] = tv
                    if tv is None:
                        continue
            elif rule.multi_match:
                # the operator runs after every transformation step (and on the raw value)
                steps = []
                p = rule.pipeline
                while p is not None:
                    steps.append((p, self.transform(v, p)))
                    p = p.parent
                res = False
                seen: set[bytes] = set()
                pf = self.rs.prefilter
                for p, tv in reversed(steps):
                    if hot is not None and p.idx not in hot:
                        continue
                    if tv in seen:
                        continue
                    seen.add(tv)
                    if use_pf and not neg and p.idx in pf and pid not in self.candidates(p.idx, tv):
                        continue
                    if op.match(self, tv, rule.capture) != neg:
                        res = True
                        break
                if not res:
                    continue
            else:
                tv = self.transform(v, rule.pipeline)
                if use_pf and pid not in self.candidates(rule.pipeline.idx, tv):
                    hit = False
                else:
                    hit = op.match(self, tv, rule.capture)
                if hit == neg:
                    continue
            matched = True
            new_matches.append((name, tv))
            self._on_match(rule, name, tv)
        if matched:
            self.matched_vars = new_matches
        return matched

    def _confirm(self, rule: Rule, tvals: list[tuple[str, bytes]], check: bool = True) -> bool:
        """Run a rule's operator on (already transformed) candidate values; act on matches."""
        op = rule.op
        matched = False
        new_matches: list[tuple[str, bytes]] = []
        for name, tv in tvals:
            if check and not op.match(self, tv, rule.capture):
                continue
            matched = True
            new_matches.append((name, tv))
            self._on_match(rule, name, tv)
        if matched:
            self.matched_vars = new_matches
        return matched

    def _on_match(self, rule: Rule, name: str, tv: bytes) -> None:
        """One value matched: expose it as MATCHED_VAR(_NAME) and run the rule's per-match actions."""
        self.s["MATCHED_VAR"] = tv
        self.s["MATCHED_VAR_NAME"] = name.encode("latin-1", "replace")
        self._rule = rule
        if rule.setvars:
            self._setvars(rule)
        if rule.ctls:
            self._ctls(rule)

    def _setvars(self, rule: Rule) -> None:
        for sv in rule.setvars:
            if sv.coll != "TX":
                continue  # persistent collections (ip, global, session) are not kept by a gateway
            name = sv.name.expand(self).decode("latin-1").lower()
            if sv.op == "!":
                self.tx.pop(name, None)
                continue
            val = sv.value.expand(self)
            if sv.op == "=":
                self.tx[name] = val
            else:
                cur = _int(self.tx.get(name, b"0"))
                d = _int(val)
                self.tx[name] = str(cur + d if sv.op == "+" else cur - d).encode()

    def _ctls(self, rule: Rule) -> None:
        for k, v in rule.ctls:
            if k == "ruleengine":
                mode = {"on": "On", "off": "Off", "detectiononly": "DetectionOnly"}.get(v.lower())
                if mode and not (self.engine == "DetectionOnly" and mode == "On"):
                    self.engine = mode
            elif k == "ruleremovebyid":
                for spec in v.split():
                    if "-" in spec[1:]:
                        lo, _, hi = spec.partition("-")
                        self.removed_ids.update(r for r in self.rs.by_id if int(lo) <= r <= int(hi))
                    else:
                        self.removed_ids.add(int(spec))
            elif k == "ruleremovebytag":
                self.removed_tags.add(v)
            elif k in ("ruleremovetargetbyid", "ruleremovetargetbytag"):
                ids, specs = self.rs.ctl_targets(k, v)
                rt = self.removed_targets
                for rid in ids:
                    old = rt.get(rid)
                    rt[rid] = specs if not old else old + specs
            elif k == "requestbodyprocessor":
                self.body_processor = v.upper()
                self.s["REQBODY_PROCESSOR"] = v.upper().encode()
            elif k == "forcerequestbodyvariable":
                self.force_body_var = v.lower() == "on"
            # auditEngine, auditLogParts...: there is no audit log engine here.

    def _eval_chain(self, rule: Rule) -> bool:
        link: Rule | None = rule
        self.matched_vars = []
        while link is not None:
            if not self._eval_link(link):
                return False
            link = link.chain
        return True

    def run_phase(self, phase: int) -> None:
        if self.allow_all or self.interrupted:
            return
        rules = self.rs.program[phase]
        i, n = 0, len(rules)
        removed = self.removed_ids
        ucache = self._ucache  # cleared in place when variables change
        tx = self.tx
        ints = _ATOI
        rtags = self.removed_tags  # grows in place (ctl:ruleRemoveByTag)
        # the engine mode changes only through ctl, i.e. in a general evaluation (below): it is
        # checked before the first rule and before each rule that follows such an evaluation
        check_engine = True
        while i < n:
            r = rules[i]
            i += 1
            if check_engine:
                if self.engine == "Off":
                    return
                check_engine = False
            if r.id in removed or (rtags and rtags.intersection(r.tags)):
                continue
            k = r.kind
            if k == 1:
                # the universe scan of this pipeline did not see the pattern: no value can match
                u = ucache.get(r.pipeline.idx)
                if u is None:
                    u = self._universe(r.pipeline)
                if r.pid not in u:
                    self.matched_vars = _NO_MATCHES
                    continue
            elif k:
                g = r.tx_num
                v = tx.get(g[0])
                if v is None:
                    self.matched_vars = _NO_MATCHES
                    continue
                iv = ints.get(v)
                if iv is None:
                    iv = _atoi(v)
                    if len(ints) < 4096:
                        ints[v] = iv
                if g[1](iv, g[2]) == r.op.negated:
                    self.matched_vars = _NO_MATCHES
                    continue
                if k == 2:
                    # what _confirm + the action tail below do for a pass/nolog/skipAfter gate
                    name = r.gate_name
                    s = self.s
                    s["MATCHED_VAR"] = v
                    s["MATCHED_VAR_NAME"] = name[1]
                    self.matched_vars = [(name[0], v)]
                    self._rule = r
                    i = r.jump
                    continue
            check_engine = True
            if r.chain is None:
                self.matched_vars = []
                if not self._eval_link(r):
                    continue
            elif not self._eval_chain(r):
                continue
            self._rule = r
            if r.log:
                self.logged.append(r.id)
            d = r.disruptive
            if d in ("deny", "drop"):
                if self.would_interrupt is None:
                    self.would_interrupt = (r.id, r.status or 403)
                if self.engine == "On":
                    self.interrupted = True
                    return
            elif d == "allow":
                if r.allow == "phase":
                    return
                self.allow_all = True
                return
            if r.skip_after:
                i = r.jump
            elif r.skip:
                i = min(n, i + r.skip)

    def process_request(self) -> Outcome:
        """Run phase 1, parse the body, run phase 2. A request over an inspection limit runs
        no rule (``Outcome.limit``); one whose body goes over a limit only a phase-1 ctl made
        it parse runs phase 1 only."""
        if self.limit_exceeded is None:
            self.run_phase(1)
            if not self.interrupted and not self.allow_all:
                self._process_body()
                if self.limit_exceeded is None:
                    self.run_phase(2)
        return self.outcome()

    def outcome(self) -> Outcome:
        wi = self.would_interrupt
        score = _int(self.tx.get("blocking_inbound_anomaly_score", self.tx.get("anomaly_score", b"0")))
        return Outcome(list(self.logged), wi is not None, wi[1] if wi else None, wi[0] if wi else None, score,
                       self.limit_exceeded)


def _b(v: str | bytes) -> bytes:
    """Wire bytes of a value that aiohttp (or a JSON record) decoded as UTF-8 (surrogateescape)."""
    if isinstance(v, bytes):
        return v
    try:
        return v.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return v.encode("utf-8", "replace")


def _int(v: bytes) -> int:
    try:
        return int(v.strip() or b"0")
    except ValueError:
        m = re.match(rb"\s*[+-]?\d+", v)
        return int(m.group(0)) if m else 0
