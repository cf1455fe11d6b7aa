"""What the rule set decides alike for every request, worked out at load (folding.py): the
initialisation prefix of phase 1 run once, and the rules no request reaches kept out of the
prefilter Sets, yet still evaluated exactly when something makes them reachable."""

from __future__ import annotations

import json
import os
import random

import pytest

from filters.waf.engine import Ruleset, Transaction
from tests.filters.waf.conftest import DEFAULTS, crs_dir

GATED = (
    'SecAction "id:1,phase:1,pass,nolog,setvar:tx.pl=1,setvar:tx.score=0"\n'
    'SecRule &TX:limit "@eq 0" "id:2,phase:1,pass,nolog,setvar:tx.limit=%{tx.pl}0"\n'
    'SecRule REQUEST_HEADERS:X-Open "@streq yes" "id:5,phase:1,pass,nolog,ctl:ruleRemoveById=10"\n'
    'SecRule TX:PL "@lt 2" "id:10,phase:2,pass,nolog,skipAfter:END-PL2"\n'
    'SecRule ARGS "@rx evil" "id:11,phase:2,deny,status:403"\n'
    'SecMarker "END-PL2"\n'
    'SecRule ARGS "@rx bad" "id:12,phase:2,deny,status:403"\n'
    'SecRule RESPONSE_BODY "@rx leak" "id:13,phase:4,deny,status:403"\n'
)


def tx_for(rs: Ruleset, uri: str, headers=(), **kw) -> Transaction:
    return Transaction(rs, method="GET", uri=uri, headers=[("Host", "x"), *headers], **kw)


def set_pids(rs: Ruleset) -> set[int]:
    return {pid for ps in rs.prefilter.values() for pid in ps.pids}


def test_the_initialisation_prefix_runs_once_at_load():
    rs = Ruleset.from_text(DEFAULTS + GATED)
    fold = rs.init_fold
    assert fold is not None
    assert fold.resume == 2 and fold.rule_ids == {1, 2}
    assert fold.tx_vars == {"pl": b"1", "score": b"0", "limit": b"10"}
    tx = tx_for(rs, "/?a=ok")
    assert not tx.process_request().interrupted
    assert tx.tx_vars["limit"] == b"10"


def test_unreachable_rules_are_out_of_the_sets_and_still_exact_when_reached():
    rs = Ruleset.from_text(DEFAULTS + GATED)
    p11, p12, p13 = (rs.by_id[i].pattern_id for i in (11, 12, 13))
    assert {p11, p13} <= rs.unreachable_patterns  # behind the PL gate; a response phase
    assert p12 not in rs.unreachable_patterns
    assert p11 not in set_pids(rs) and p12 in set_pids(rs)
    assert not tx_for(rs, "/?a=evil").process_request().interrupted
    assert tx_for(rs, "/?a=bad").process_request().rule_id == 12
    # reached after all: the gate removed by a route, or at run time by a ctl
    assert tx_for(rs, "/?a=evil", removed_ids=frozenset({10})).process_request().rule_id == 11
    assert tx_for(rs, "/?a=evil", headers=[("X-Open", "yes")]).process_request().rule_id == 11
    # a route removing a prefix rule runs the prefix as written
    tx = tx_for(rs, "/?a=ok", removed_ids=frozenset({2}))
    tx.process_request()
    assert "limit" not in tx.tx_vars


@pytest.mark.parametrize(
    "writer",
    [
        'SecRule ARGS "@rx up" "id:20,phase:2,pass,nolog,setvar:tx.pl=2"\n',
        'SecRule ARGS "@rx up" "id:20,phase:2,pass,nolog,setvar:tx.p%{MATCHED_VAR_NAME}=2"\n',
        'SecRule ARGS "@rx up" "id:20,phase:2,pass,nolog,setvar:tx.%{MATCHED_VAR}=2"\n',
    ],
)
def test_a_gate_on_a_tx_name_a_later_rule_may_write_is_not_decided_at_load(writer):
    rs = Ruleset.from_text(DEFAULTS + writer.replace("phase:2", "phase:1") + GATED)
    assert rs.by_id[11].pattern_id not in rs.unreachable_patterns
    assert rs.by_id[11].pattern_id in set_pids(rs)


def test_every_pipeline_the_universe_pass_reads_has_a_set(crs_engine):
    for rs in (crs_engine().ruleset, crs_engine(pl=4).ruleset, Ruleset.load([])):
        assert all(p in rs.prefilter for p in rs.universe_pipelines)


def test_crs_prefix_folded_and_higher_paranoia_rules_left_out_of_the_sets(crs_engine):
    pl1, pl4 = crs_engine().ruleset, crs_engine(pl=4).ruleset
    assert pl1.init_fold is not None and pl1.init_fold.tx_vars["detection_paranoia_level"] == b"1"
    assert pl4.init_fold is not None and pl4.init_fold.tx_vars["detection_paranoia_level"] == b"4"
    assert len(set_pids(pl1)) < len(set_pids(pl4))
    for rid in (920120, 921110, 932231, 931130):  # PL1, PL1, PL2, PL2
        assert rid in pl1.by_id and rid in pl4.by_id
    assert pl1.by_id[920120].pattern_id in set_pids(pl1)
    assert pl1.by_id[921110].pattern_id in set_pids(pl1)
    assert pl1.by_id[932231].pattern_id in pl1.unreachable_patterns
    assert pl1.by_id[931130].pattern_id in pl1.unreachable_patterns
    assert pl4.by_id[932231].pattern_id in set_pids(pl4)


def test_crs_verdicts_with_and_without_the_fold_agree(crs_engine, monkeypatch):
    """The regression corpus, a sample: the same matches, score and TX values whether phase 1
    starts from the folded prefix or runs it as written."""
    path = os.path.join(os.path.dirname(crs_dir()), "crs-regression.jsonl")
    from bench.crs_conformance import record_request

    with open(path, encoding="utf-8") as fh:
        recs = [json.loads(line) for line in fh]
    recs = [r for r in recs if r.get("direction", "request") == "request"]
    sample = random.Random(13).sample(recs, 150)
    engine = crs_engine()
    fold = engine.ruleset.init_fold
    assert fold is not None
    for rec in sample:
        req = record_request(rec)
        with_fold = engine.transaction(**req)
        a = with_fold.process_request()
        monkeypatch.setattr(engine.ruleset, "init_fold", None)
        try:
            as_written = engine.transaction(**req)
            b = as_written.process_request()
        finally:
            monkeypatch.setattr(engine.ruleset, "init_fold", fold)
        assert (a.matched, a.score, a.interrupted, a.rule_id) == (
            b.matched,
            b.score,
            b.interrupted,
            b.rule_id,
        )
        assert with_fold.tx_vars == as_written.tx_vars, rec.get("id")
