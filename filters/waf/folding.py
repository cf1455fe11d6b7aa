"""What a rule set decides the same way for every request, worked out once at load.

**The initialisation prefix.** A rule set starts phase 1 with rules that read nothing from the
request: the gateway's and crs-setup's ``SecAction`` settings and CRS's REQUEST-901 defaults
(``SecRule &TX:x "@eq 0" "setvar:tx.x=..."``). ``fold_init`` runs those rules once on an
empty request and keeps what they leave: the TX collection, the logged ids, the program
index where the first request-dependent rule sits. A transaction then starts from a copy of
that TX dict at that index (``InitFold.apply``) instead of evaluating ~30 rules and their
setvars. A transaction that starts with its own TX values, or a route that removes one of
those rules or its targets, runs them as written.

**Unreachable rules.** After the prefix, a TX variable that no later rule writes keeps its
folded value; a pure gate on it (CRS's ``TX:DETECTION_PARANOIA_LEVEL "@lt 2"`` ...
``skipAfter``) then always jumps, or never does. ``unreachable_rules`` walks phases 1 and 2
with those decisions and returns the rules no request can reach (at PL1: the PL2-4 rules), and
the phases the gateway never runs (3-5). Their patterns stay out of the RE2 prefilter Sets
(fewer patterns per Set: less DFA work per value). Such a rule is still evaluated exactly if
something makes it reachable (a route that removes a gate, a ``ctl:ruleRemoveById``, a
transaction given its own TX values): without the prefilter, by its own operator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from filters.waf.macros import Constant, Macro
from filters.waf.operators import UnconditionalMatch, atoi

if TYPE_CHECKING:  # pragma: no cover
    from filters.waf.evaluation import Transaction
    from filters.waf.rules import Rule
    from filters.waf.ruleset import Ruleset

# Macro references whose value does not depend on the request (in a rule that reads only TX)
REQUEST_FREE_REFS = ("TX", "RULE")


@dataclass(frozen=True)
class InitFold:
    """What the initialisation prefix of phase 1 leaves, for every request alike."""

    tx_vars: dict[str, bytes]
    logged: tuple[int, ...]
    resume: int  # program[1] index of the first rule not folded
    rule_ids: frozenset[int]  # the prefix's rules (a route removing one runs the prefix as written)
    matched_vars: tuple[tuple[str, bytes], ...]  # MATCHED_VARS the last folded rule left
    from_method: bool  # ... and they were the request method (SecAction's target): take the request's

    def applies(self, tx: Transaction) -> bool:
        if self.rule_ids & tx.removed_ids:
            return False
        rt = tx.removed_targets
        return not (rt and any(rid in rt for rid in self.rule_ids))

    def apply(self, tx: Transaction) -> int:
        """Put a transaction in the state the prefix leaves; returns where phase 1 goes on."""
        tx.tx_vars.update(self.tx_vars)
        tx.logged.extend(self.logged)
        if self.matched_vars:
            if self.from_method:
                method = tx.scalars["REQUEST_METHOD"]
                tx.matched_vars = [("REQUEST_METHOD", method)]
                tx.scalars["MATCHED_VAR"] = method
                tx.scalars["MATCHED_VAR_NAME"] = b"REQUEST_METHOD"
            else:
                name, value = self.matched_vars[-1]
                tx.matched_vars = list(self.matched_vars)
                tx.scalars["MATCHED_VAR"] = value
                tx.scalars["MATCHED_VAR_NAME"] = name.encode("latin-1", "replace")
        return self.resume


def macro_is_request_free(m: Macro | Constant | None) -> bool:
    if m is None or isinstance(m, Constant):
        return True
    return all(type(p) is bytes or p[0] in REQUEST_FREE_REFS for p in m.parts)


def reads_only_tx(rule: Rule) -> bool:
    """Whether a rule (every link of its chain) reads nothing from the request and does nothing
    but set TX variables (or deny/allow on them): its outcome is the same for every request that
    starts with the same TX."""
    link: Rule | None = rule
    while link is not None:
        op = link.op
        if isinstance(op, UnconditionalMatch):
            if link.chain is not None or link.chained:
                return False  # its MATCHED_VAR would be the request method, read by the next link
        elif not all(t.coll == "TX" for t in link.targets) or not link.targets:
            return False
        if link.excludes and not all(e.coll == "TX" for e in link.excludes):
            return False
        if op.macro is not None and not macro_is_request_free(op.macro):
            return False
        if link.ctls:
            return False
        for sv in link.setvars:
            if not (macro_is_request_free(sv.name) and macro_is_request_free(sv.value)):
                return False
        if link.msg is not None and not macro_is_request_free(link.msg):
            return False
        link = link.chain
    return True


def fold_init(ruleset: Ruleset) -> InitFold | None:
    """Run phase 1's request-free prefix on an empty request (see the module docstring)."""
    from filters.waf.evaluation import Transaction

    if ruleset.engine_mode == "Off":
        return None
    rules = ruleset.program[1]
    stop = 0
    while stop < len(rules) and reads_only_tx(rules[stop]):
        stop += 1
    if stop == 0:
        return None
    tx = Transaction(ruleset, method="GET", uri="/")
    resume = tx.run_phase(1, stop=stop)
    if tx.would_interrupt is not None or tx.allow_all or tx.engine_mode != ruleset.engine_mode:
        return None  # the prefix itself denies (CRS 901001 without its setup) or allows: run it as written
    last = tx.matched_vars
    return InitFold(
        tx_vars=dict(tx.tx_vars),
        logged=tuple(tx.logged),
        resume=resume,
        rule_ids=frozenset(r.id for r in rules[:stop]),
        matched_vars=tuple(last),
        from_method=bool(last) and last[-1][0] == "REQUEST_METHOD",
    )


def tx_names_written(rules: list[Rule]) -> tuple[set[str], set[str]] | None:
    """Lower-cased TX names the rules may write (setvar, capture): (exact names, prefixes of
    macro-built names such as ``paramcounter_%{matched_var_name}``); None: any name."""
    exact: set[str] = set()
    prefixes: set[str] = set()
    for r0 in rules:
        link: Rule | None = r0
        while link is not None:
            for sv in link.setvars:
                if sv.coll != "TX":
                    continue
                if isinstance(sv.name, Constant):
                    exact.add(sv.name.value.decode("latin-1").lower())
                    continue
                head = sv.name.parts[0] if sv.name.parts else b""
                if type(head) is not bytes or not head:
                    return None
                prefixes.add(head.decode("latin-1").lower())
            if link.capture:
                exact.update(str(i) for i in range(10))
            link = link.chain
    return exact, prefixes


def unreachable_rules(ruleset: Ruleset, fold: InitFold | None) -> list[Rule]:
    """Starters of phases 1 and 2 that no request reaches given the folded TX values, and every
    rule of phases 3-5 (the gateway runs phases 1 and 2 only)."""
    dead: list[Rule] = [r for ph in (3, 4, 5) for r in ruleset.program[ph]]
    if fold is None:
        return dead
    p1, p2 = ruleset.program[1], ruleset.program[2]
    later = p1[fold.resume :] + p2
    written = tx_names_written(later)
    if written is None:
        return dead
    exact, prefixes = written

    def stable(name: str) -> bool:
        return name not in exact and not any(name.startswith(p) for p in prefixes)

    known = fold.tx_vars
    for phase, start in ((1, fold.resume), (2, 0)):
        rules = ruleset.program[phase]
        seen = [False] * (len(rules) + 1)
        todo = [start]
        while todo:
            i = todo.pop()
            if i >= len(rules) or seen[i]:
                continue
            seen[i] = True
            r = rules[i]
            nxt = [i + 1]
            if r.skip_after:
                nxt.append(r.jump)
            elif r.skip:
                nxt.append(min(len(rules), i + 1 + r.skip))
            g = r.tx_compare
            if g is not None and not g[3] and r.dispatch in (2, 3) and stable(g[0]):
                v = known.get(g[0])
                hit = v is not None and g[1](atoi(v), g[2]) != r.op.negated
                if not hit:
                    nxt = [i + 1]  # never matches: no jump
                elif r.dispatch == 2:
                    nxt = [r.jump]  # a pure gate that always matches: always jumps
            todo.extend(nxt)
        skip_from = fold.resume if phase == 1 else 0
        dead.extend(r for i, r in enumerate(rules) if i >= skip_from and not seen[i])
    return dead


def pattern_ids(rules: list[Rule]) -> set[int]:
    out: set[int] = set()
    for r0 in rules:
        link: Rule | None = r0
        while link is not None:
            if link.pattern_id is not None:
                out.add(link.pattern_id)
            link = link.chain
    return out
