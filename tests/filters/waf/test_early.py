"""Anomaly mode's early decision (early.py): in enforce mode, once the blocking evaluation
denies on the current scores, the rules left before it are not run. The verdict (denied or
not, the denying rule, its status) must be that of the full run; the plan is refused where a
skipped rule could lower a score, switch the engine, allow or deny on its own."""

from __future__ import annotations

import json
import os
import random

import pytest

from filters.waf import early
from filters.waf.engine import Ruleset, Transaction
from filters.waf.stage import WafEngine
from tests.filters.waf.conftest import crs_dir
from tests.filters.waf.test_stage import ctx, filt

SETUP = (
    'SecDefaultAction "phase:1,log,auditlog,pass"\nSecDefaultAction "phase:2,log,auditlog,pass"\n'
    'SecAction "id:1,phase:1,pass,nolog,setvar:tx.critical=5,setvar:tx.threshold=5,setvar:tx.score=0"\n'
)
ATTACKS = (
    'SecRule ARGS "@rx evil" "id:10,phase:2,block,setvar:tx.score=+%{tx.critical}"\n'
    'SecRule ARGS "@rx worse" "id:11,phase:2,block,setvar:tx.score=+%{tx.critical}"\n'
)
BLOCKING = (
    'SecAction "id:90,phase:2,pass,nolog,setvar:tx.total=%{tx.score}"\n'
    'SecRule TX:TOTAL "@ge %{tx.threshold}" "id:99,phase:2,deny,status:403"\n'
)


def ruleset(middle: str = "") -> Ruleset:
    return Ruleset.from_text(SETUP + ATTACKS + middle + BLOCKING)


def run(rs: Ruleset, q: str, plan: bool = True, **kw) -> Transaction:
    tx = Transaction(rs, method="GET", uri="/?" + q, headers=[("Host", "x")], **kw)
    if not plan:
        tx.caches._early = None
    tx.process_request()
    return tx


def test_a_plain_anomaly_rule_set_stops_at_the_first_denying_score():
    rs = ruleset('SecRule ARGS "@rx evil" "id:12,phase:2,block,setvar:tx.score=+%{tx.critical}"\n')
    p = run(rs, "a=1").caches.early_plan
    assert p is not None and [rs.program[2][p.blocking].id] == [99]
    tx = run(rs, "a=evil+worse")
    assert tx.interrupted and tx.stopped_early and tx.logged == [10, 99]
    full = run(rs, "a=evil+worse", plan=False)
    assert full.interrupted and not full.stopped_early and full.logged == [10, 11, 12, 99]
    out = tx.outcome()
    assert (out.interrupted, out.status, out.rule_id, out.stopped_early) == (True, 403, 99, True)


def test_below_the_threshold_the_state_is_put_back():
    rs = Ruleset.from_text(SETUP.replace("threshold=5", "threshold=10") + ATTACKS + BLOCKING)
    tx = run(rs, "a=evil")
    full = run(rs, "a=evil", plan=False)
    assert not tx.interrupted and not tx.stopped_early
    assert tx.logged == full.logged == [10] and tx.tx_vars == full.tx_vars
    tx = run(rs, "a=evil+worse")
    assert tx.interrupted and tx.logged == [10, 11, 99] and not tx.stopped_early  # nothing left to skip


@pytest.mark.parametrize(
    "middle",
    [
        'SecRule ARGS "@rx x" "id:20,phase:2,pass,setvar:tx.score=-10"\n',  # lowers the score
        'SecRule ARGS "@rx x" "id:20,phase:2,pass,setvar:tx.score=0"\n',  # resets it
        'SecRule ARGS "@rx x" "id:20,phase:2,pass,setvar:!tx.score"\n',
        'SecRule ARGS "@rx x" "id:20,phase:2,pass,ctl:ruleEngine=DetectionOnly"\n',
        'SecRule ARGS "@rx x" "id:20,phase:2,pass,ctl:ruleRemoveById=99"\n',
        'SecRule ARGS "@rx x" "id:20,phase:2,allow"\n',
        'SecRule ARGS "@rx x" "id:20,phase:2,deny,status:406"\n',  # its own status first
        'SecRule ARGS "@rx x" "id:20,phase:2,pass,setvar:tx.threshold=+100"\n',
        'SecRule ARGS "@rx x" "id:20,phase:2,pass,setvar:tx.critical=-50"\n',  # what later rules add
        'SecRule ARGS "@rx x" "id:20,phase:2,pass,setvar:tx.%{MATCHED_VAR}=0"\n',  # any name
        'SecRule ARGS "@rx x" "id:20,phase:2,pass,setvar:tx.sco%{MATCHED_VAR}=0"\n',  # may spell score
        'SecRule ARGS "@rx x" "id:20,phase:2,pass,chain"\nSecRule ARGS "@rx x" "ctl:ruleEngine=Off"\n',
    ],
)
def test_a_rule_that_could_change_the_verdict_is_never_skipped(middle):
    """The rule (id 20) sits after 10 and 11: no decision may skip it. Rule 10 matching alone
    reaches the threshold; with a decision after 10 the full run's verdict could differ."""
    rs = ruleset(middle)
    p = run(rs, "a=1").caches.early_plan
    prog = rs.program[2]
    pos20 = next(i for i, r in enumerate(prog) if r.id == 20)
    assert p is None or p.first > pos20
    for q in ("a=evil+x", "a=evil", "a=evil+worse+x"):
        tx, full = run(rs, q), run(rs, q, plan=False)
        assert (tx.interrupted, tx.would_interrupt) == (full.interrupted, full.would_interrupt), q
        assert tx.logged == full.logged, q


def test_a_jump_into_the_blocking_evaluation_is_never_skipped():
    rs = Ruleset.from_text(
        SETUP
        + ATTACKS
        + 'SecRule ARGS "@rx x" "id:20,phase:2,pass,skipAfter:END"\n'
        + 'SecAction "id:90,phase:2,pass,nolog,setvar:tx.total=%{tx.score}"\n'
        + "SecMarker END\n"
        + 'SecRule TX:TOTAL "@ge %{tx.threshold}" "id:99,phase:2,deny,status:403"\n'
    )
    p = run(rs, "a=1").caches.early_plan
    assert p is None or p.first > 2
    tx = run(rs, "a=evil+x")
    assert not tx.interrupted and tx.logged == [10, 20]  # 20 skips the sum: total stays unset


def test_a_negative_amount_added_later_switches_the_decision_off():
    """The amounts the skipped rules add are TX values: checked to be >= 0 when deciding."""
    rs = Ruleset.from_text(
        SETUP
        + 'SecRule ARGS:neg "@rx ." "id:5,phase:1,pass,nolog,setvar:tx.critical=-20"\n'
        + 'SecRule ARGS "@rx evil" "id:10,phase:2,block,setvar:tx.score=+10"\n'
        + 'SecRule ARGS "@rx worse" "id:11,phase:2,block,setvar:tx.score=+%{tx.critical}"\n'
        + BLOCKING
    )
    assert run(rs, "a=1").caches.early_plan.nonneg == ("critical",)
    tx, full = run(rs, "a=evil+worse&neg=1"), run(rs, "a=evil+worse&neg=1", plan=False)
    assert not full.interrupted and not tx.interrupted and not tx.stopped_early
    assert tx.logged == full.logged == [10, 11]
    tx = run(rs, "a=evil+worse")
    assert tx.interrupted and tx.stopped_early and tx.logged == [10, 99]


def test_detection_mode_runs_every_rule():
    rs = ruleset('SecRule ARGS "@rx evil" "id:12,phase:2,block,setvar:tx.score=+%{tx.critical}"\n')
    tx = run(rs, "a=evil+worse", detection_only=True)
    assert not tx.stopped_early and tx.logged == [10, 11, 12, 99]


def test_plans_for_crs_and_the_builtin_pack(crs_engine):
    for eng, blocking, section in ((crs_engine(1), 949110, 949059), (WafEngine.builtin(), 9109100, 9109000)):
        p = eng.caches.early_plan
        prog = eng.ruleset.program[2]
        assert p is not None
        assert prog[p.blocking].id == blocking and prog[p.section].id == section
        assert p.first < p.section and "blocking_inbound_anomaly_score" in p.watch
    assert early.plan([]) is None


def test_crs_enforce_verdicts_with_and_without_the_early_decision(crs_engine):
    """A sample of the regression corpus in enforce mode at PL1 and PL2: the same verdict,
    rule and status whether or not evaluation stops early; some do stop early."""
    from bench.crs_conformance import record_request

    path = os.path.join(os.path.dirname(crs_dir()), "crs-regression.jsonl")
    with open(path, encoding="utf-8") as fh:
        recs = [json.loads(line) for line in fh]
    recs = [r for r in recs if r.get("direction", "request") == "request"]
    sample = random.Random(29).sample(recs, 300)
    stopped = 0
    for pl in (1, 2):
        engine = crs_engine(pl)
        for rec in sample:
            req = record_request(rec)
            a = engine.transaction(**req)
            oa = a.process_request()
            b = engine.transaction(**req)
            # the same shared caches: the plan is switched off for this transaction only
            saved = b.caches._early
            b.caches._early = None
            try:
                ob = b.process_request()
            finally:
                b.caches._early = saved
            assert (oa.interrupted, oa.status, oa.rule_id) == (ob.interrupted, ob.status, ob.rule_id), (
                rec.get("id")
            )
            assert set(oa.matched) <= set(ob.matched)
            stopped += oa.stopped_early
    assert stopped > 20


async def test_the_audit_record_says_evaluation_stopped_early():
    f = filt()
    c = ctx("/search?q=1%27%20or%20%271%27=%271&x=%3Cscript%3Ealert(1)%3C/script%3E&y=../../etc/passwd")
    d = await f.check(c)
    assert d.problem.reason == "waf_blocked"
    assert c.audit["waf"].get("stopped_early") is True
