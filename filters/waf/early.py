"""Anomaly mode's early decision (enforce only): once the inbound score is enough for the
blocking evaluation to deny, the rules left before it are not run.

In anomaly scoring mode (CRS) the attack rules only add to TX scores; the blocking evaluation
(CRS REQUEST-949: the per-paranoia-level sums and 949110 ``TX:BLOCKING_INBOUND_ANOMALY_SCORE
@ge threshold``, deny) decides at the end of phase 2. After a rule that raised a score, the
transaction may run that evaluation *now*, on a copy of its state: if it denies, the rules
between could only have raised the scores further (checked at load, below), so the full run
would have denied with the same rule and status: the request is denied now. If it does not
deny, the state is put back and evaluation goes on. The verdict is identical; the matched
rules are fewer (the audit record says ``stopped_early``). Detection mode runs everything.

``plan(program)`` decides, once per compiled rule set, from the phase-2 program:

- ``blocking``: the last deny/drop rule without a chain whose operator is ``@ge``/``@gt`` (not
  negated) on one TX variable (monotone: more score never turns its deny off);
- ``section``: the first index of the run of rules before it that only compare TX values or
  always match, add or assign TX values (a constant or one ``%{tx.x}``), and have no chain,
  ctl or disruptive action; the speculative run starts there;
- ``watch``: the TX names whose growth can only grow the blocking variable (the blocking
  variable, and what the section adds to or copies into a watched name);
- ``first``: the earliest index from which every rule up to the section may be skipped: no
  ctl, no deny/drop/allow/redirect, no jump past the section's start, and every TX name the
  section reads is written only as ``+`` onto a watched name by a constant >= 0 or by one
  ``%{tx.y}`` (``nonneg``: y is checked to hold a number >= 0 at decision time, and no
  skippable rule writes it); a name built by a macro must not be able to spell a name the
  section reads.

Any rule set that does not fit (the built-in pack, CRS in self-contained mode, custom rules
with ctl in the way) gets no plan, or a ``first`` close to the section, and runs as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from filters.waf.macros import Constant, Macro
from filters.waf.operators import Ge, Gt, NumericCompare, UnconditionalMatch
from filters.waf.request import seclang_int

if TYPE_CHECKING:  # pragma: no cover
    from filters.waf.rules import Rule

PASSIVE = (None, "pass", "block")  # disruptive actions that do not end evaluation


@dataclass(frozen=True)
class EarlyPlan:
    first: int
    section: int
    blocking: int
    watch: frozenset[str]
    raises: frozenset[int]  # ids of skippable starters that add to a watched name
    nonneg: tuple[str, ...]


def _links(r: Rule) -> list[Rule]:
    out = []
    link: Rule | None = r
    while link is not None:
        out.append(link)
        link = link.chain
    return out


def _macro_tx_refs(m: Any) -> set[str] | None:
    """TX names a value reads; None when it reads anything but TX (or cannot be told)."""
    if isinstance(m, Constant) or m is None:
        return set()
    if not isinstance(m, Macro):
        return None
    out = set()
    for part in m.parts:
        if isinstance(part, bytes):
            continue
        coll, key = part
        if coll != "TX" or key is None:
            return None
        out.add(key.lower())
    return out


def _single_tx_ref(m: Any) -> str | None:
    if isinstance(m, Macro) and len(m.parts) == 1 and not isinstance(m.parts[0], bytes):
        coll, key = m.parts[0]
        if coll == "TX" and key is not None:
            return key.lower()
    return None


def _nonneg_constant(m: Any) -> bool:
    if not isinstance(m, Constant):
        return False
    try:
        return int(m.value) >= 0
    except ValueError:
        return False


def _section_rule(r: Rule, reads: set[str]) -> bool:
    """A rule the speculative run may contain: TX in, TX out, no chain/ctl/disruptive action.
    Adds the TX names it reads to ``reads``."""
    if r.chain is not None or r.ctls or r.disruptive not in PASSIVE or r.allow:
        return False
    if not isinstance(r.op, (NumericCompare, UnconditionalMatch)):
        return False
    for t in r.targets if not isinstance(r.op, UnconditionalMatch) else ():  # SecAction: no input
        if t.coll != "TX" or t.key is None:
            return False
        reads.add(t.key)
    arg = _macro_tx_refs(getattr(r.op, "macro", None))
    if arg is None:
        return False
    reads |= arg
    for sv in r.setvars:
        if sv.coll != "TX" or not isinstance(sv.name, Constant):
            return False
        if sv.op == "=":
            if not isinstance(sv.value, Constant) and _single_tx_ref(sv.value) is None:
                return False
            reads |= _macro_tx_refs(sv.value) or set()
        elif sv.op == "+":
            refs = _macro_tx_refs(sv.value)
            if refs is None:
                return False
            reads |= refs
        else:
            return False
    return True


def plan(prog: list[Rule]) -> EarlyPlan | None:
    b = None
    for idx in range(len(prog) - 1, -1, -1):
        r = prog[idx]
        if r.disruptive in ("deny", "drop"):
            b = idx
            break
    if b is None:
        return None
    br = prog[b]
    if (
        br.chain is not None
        or type(br.op) not in (Ge, Gt)
        or br.op.negated
        or br.ctls
        or br.setvars
        or len(br.targets) != 1
        or br.excludes
        or br.pipeline.fn is not None
    ):
        return None
    t = br.targets[0]
    if t.coll != "TX" or t.key is None or t.count:
        return None
    reads = {t.key}
    arg = _macro_tx_refs(getattr(br.op, "macro", None))
    if arg is None:
        return None
    reads |= arg
    j = b
    while j > 0 and _section_rule(prog[j - 1], reads):
        j -= 1
    for idx in range(j, b):  # jumps inside the section stay inside it (forward, before the end)
        r = prog[idx]
        if (r.skip_after and r.jump < j) or r.skip < 0:
            return None
    # the names whose growth only grows the blocking variable
    watch = {t.key}
    for idx in range(b - 1, j - 1, -1):
        for sv in prog[idx].setvars:
            name = sv.name.value.decode("latin-1").lower()  # type: ignore[union-attr]  # Constant (above)
            if name in watch:
                y = _single_tx_ref(sv.value)
                if y is not None:
                    watch.add(y)  # x = y, x += y: y's growth grows x
                elif not isinstance(sv.value, Constant):
                    return None  # a watched name computed some other way
    # skippable rules, backwards from the section
    first = j
    nonneg: set[str] = set()
    written: set[str] = set()
    prefixes: list[str] = []
    raises: set[int] = set()
    for idx in range(j - 1, -1, -1):
        r = prog[idx]
        ok = r.disruptive in PASSIVE and not r.allow
        if r.skip_after and r.jump > j:
            ok = False
        if r.skip and idx + 1 + r.skip > j:
            ok = False
        adds = False
        new_nonneg: set[str] = set()
        new_written: set[str] = set()
        new_prefixes: list[str] = []
        for link in _links(r) if ok else ():
            if link.ctls:
                ok = False
                break
            for sv in link.setvars:
                if sv.coll != "TX":
                    continue  # persistent collections are not kept (evaluation.run_setvars)
                if isinstance(sv.name, Constant):
                    name = sv.name.value.decode("latin-1").lower()
                    new_written.add(name)
                    if name not in reads:
                        continue
                    if sv.op != "+" or name not in watch:
                        ok = False
                        break
                    if _nonneg_constant(sv.value):
                        adds = True
                        continue
                    y = _single_tx_ref(sv.value)
                    if y is None:
                        ok = False
                        break
                    new_nonneg.add(y)
                    adds = True
                else:
                    head = sv.name.parts[0] if sv.name.parts else b""
                    if not isinstance(head, bytes) or not head:
                        ok = False  # a name that starts with a macro can be any name
                        break
                    pre = head.decode("latin-1").lower()
                    if any(n.startswith(pre) for n in reads):
                        ok = False
                        break
                    new_prefixes.append(pre)
            if not ok:
                break
        if not ok:
            break
        nn, wr, pf = nonneg | new_nonneg, written | new_written, prefixes + new_prefixes
        if nn & wr or any(y.startswith(p) for y in nn for p in pf):
            break  # an added value a skippable rule may change: stop before this rule
        nonneg, written, prefixes = nn, wr, pf
        first = idx
        if adds:
            raises.add(r.id)
    if first >= j or not raises:
        return None
    return EarlyPlan(first, j, b, frozenset(watch), frozenset(raises), tuple(sorted(nonneg)))


def decide(tx: Any, p: EarlyPlan) -> bool:
    """Run the blocking evaluation now on the transaction's state (phase 2, enforce mode);
    True when it denied (the transaction is then interrupted), else the state is put back."""
    if tx.engine_mode != "On":
        return False
    t = tx.tx_vars
    for y in p.nonneg:
        v = t.get(y)
        if v is not None and seclang_int(v) < 0:
            return False
    saved = dict(t)
    n_logged = len(tx.logged)
    s = tx.scalars
    mv, mvn = s.get("MATCHED_VAR"), s.get("MATCHED_VAR_NAME")
    matched_vars, rule, would = tx.matched_vars, tx.current_rule, tx.would_interrupt
    tx.run_phase(2, p.section, p.blocking + 1)
    if tx.interrupted:
        tx.stopped_early = True
        return True
    t.clear()
    t.update(saved)
    del tx.logged[n_logged:]
    for k, v in (("MATCHED_VAR", mv), ("MATCHED_VAR_NAME", mvn)):
        if v is None:
            s.pop(k, None)
        else:
            s[k] = v
    tx.matched_vars, tx.current_rule, tx.would_interrupt = matched_vars, rule, would
    return False
