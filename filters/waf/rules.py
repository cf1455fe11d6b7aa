"""The rule model: what one compiled SecLang rule is, and the small parsers its actions need.

A ``Rule`` is built by the rule-set compiler (ruleset.py) from a ``SecRule``/``SecAction``
directive and never changes after load. ``Pipeline`` is an interned transformation chain
(``t:lowercase,t:urlDecodeUni``), each a step on its parent, so a value's transformations are
cached per prefix. Chains: the starter holds the next link in ``chain``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from filters.waf.macros import Constant, Macro, value_template
from filters.waf.operators import Operator
from filters.waf.seclang import Action
from filters.waf.variables import VarSpec, parse_targets

PHASES = {"1": 1, "2": 2, "3": 3, "4": 4, "5": 5, "request": 2, "response": 4, "logging": 5}
DISRUPTIVE = ("deny", "drop", "block", "pass", "allow", "redirect", "proxy")


class WafLoadError(Exception):
    """A rule set could not be loaded; the message names file and line."""


@dataclass(slots=True, eq=False)
class Pipeline:
    idx: int
    names: tuple[str, ...]
    fn: Callable[[bytes], bytes] | None  # the last step; None for the empty pipeline
    parent: Pipeline | None
    plain_identity: bool = False  # every step leaves a "plain" value (see PLAIN_VALUE) unchanged


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
    chain: Rule | None = None
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
    pattern_id: int | None = None  # prefilter pattern id
    actions_raw: list[Action] = field(default_factory=list)
    has_count_only: bool = False
    target_signature: int = 0  # interned signature of (targets, exclusions): rules sharing it share values
    cacheable: bool = False  # targets only read request variables that do not change mid-phase
    exclusion_plan: dict = field(default_factory=dict)  # coll -> (exact lower keys, key regexes, all)
    prefilter_decides: bool = False  # prefilter decides at rule level (positive @rx/@pm, cacheable targets)
    tx_compare: tuple | None = None  # (tx key, compare, constant) for "TX:key @lt N" style rules
    general_prefilter: bool = False  # evaluate_values may skip a value its pipeline's Set rules out
    multi_match_pipelines: tuple = ()  # multiMatch: every step's pipeline, when each has a prefilter Set
    # Compiled dispatch (Ruleset._compile_program): 0 general; 1 prefilter-rejectable starter
    # (the pipeline's universe scan decides "no match" with two lookups); 2 a pure TX gate
    # ("TX:x @lt N", pass, nolog, skipAfter, no chain/setvar/ctl) run inline; 3 another TX
    # compare whose no-match is decided inline.
    dispatch: int = 0
    jump: int = 0  # index in the phase program after this rule's skipAfter marker
    gate_name: tuple = ()  # (MATCHED_VAR_NAME str, its bytes) for dispatch 2
    run_end: int = 0  # dispatch 1: program index after its run of consecutive dispatch-1 rules


@dataclass(slots=True)
class Marker:
    name: str


SEVERITIES = {
    "0": "EMERGENCY",
    "1": "ALERT",
    "2": "CRITICAL",
    "3": "ERROR",
    "4": "WARNING",
    "5": "NOTICE",
    "6": "INFO",
    "7": "DEBUG",
}


def id_in(rid: int, spec: str) -> bool:
    """Whether rule id ``rid`` is ``spec`` (an id, or a ``lo-hi`` range)."""
    spec = spec.strip()
    if "-" in spec[1:]:
        lo, _, hi = spec.partition("-")
        return int(lo) <= rid <= int(hi)
    return rid == int(spec)


def update_targets(rule: Rule, specs: list[VarSpec], replace: str | None) -> None:
    for s in specs:
        if s.exclude:
            rule.excludes.append(s)
        elif replace:
            old = parse_targets(replace)
            rule.targets = [
                t for t in rule.targets if not any(t.coll == o.coll and t.key == o.key for o in old)
            ]
            rule.targets.append(s)
        else:
            rule.targets.append(s)


def parse_setvar(v: str) -> SetVar:
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
