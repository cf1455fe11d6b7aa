"""CRS on the engine: ReDoS bodies, a regression-corpus sample, the benign set."""

import json
import os
import threading

import pytest

from bench.crs_conformance import CRS_TEST_TX, expectations, load_overrides, record_request
from filters.waf.stage import WafEngine, shared_dir

from .conftest import crs_dir


def corpus(name: str) -> list[dict]:
    crs_dir()
    with open(os.path.join(shared_dir(), "waf", name), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_redos_bodies_are_inspected(crs_engine):
    """The 64 KB bodies of CRS tests 920390/920400/920410: Python's re takes minutes on one of
    CRS's patterns; RE2 is linear. A generous bound only catches catastrophic backtracking."""
    eng = crs_engine(4, 4, True, CRS_TEST_TX)
    recs = [
        r
        for r in corpus("crs-regression.jsonl")
        if r["rule_id"] in (920390, 920400, 920410) and r["expect"] == "block"
    ]
    assert len(recs) >= 3
    for rec in recs:
        req = record_request(rec)
        assert len(req["body"]) > 60_000
        done: list = []
        t = threading.Thread(target=lambda done=done, req=req: done.append(eng.inspect(**req)), daemon=True)
        t.start()
        t.join(20)
        assert done, f"{rec['id']}: inspection did not finish"
        assert rec["rule_id"] in done[0].matched


def test_conformance_sample(crs_engine):
    """Every 50th request-phase record of the corpus (about 100), judged as CRS's runner does."""
    eng = crs_engine(4, 4, True, CRS_TEST_TX)
    overrides = load_overrides()
    sample = [r for r in corpus("crs-regression.jsonl") if r["direction"] == "request"][::50]
    failed = []
    judged = 0
    for rec in sample:
        exp, noexp = expectations(rec)
        if rec["id"] in overrides or (not exp and not noexp):
            continue
        judged += 1
        got = set(eng.inspect(**record_request(rec)).matched)
        if not (exp <= got) or (noexp & got):
            failed.append((rec["id"], sorted(exp), sorted(noexp), sorted(got)))
    assert judged >= 90
    assert failed == []


@pytest.mark.e2e
def test_benign_builtin_blocks_none():
    recs = corpus("benign.jsonl")
    eng = WafEngine.builtin(paranoia_level=1)
    blocked = [(r["id"], o.matched) for r in recs if (o := eng.inspect(**record_request(r))).interrupted]
    assert blocked == []


def test_crs_pl1_blocks_attacks_and_not_a_plain_request(crs_engine):
    eng = crs_engine(1)
    out = eng.inspect(
        "GET",
        "/?id=1%27%20or%20%271%27=%271",
        headers=[("Host", "x"), ("User-Agent", "Mozilla/5.0"), ("Accept", "*/*")],
    )
    assert out.interrupted and 949110 in out.matched and 942100 in out.matched
    out = eng.inspect(
        "GET", "/api/saker?side=2", headers=[("Host", "x"), ("User-Agent", "Mozilla/5.0"), ("Accept", "*/*")]
    )
    assert not out.interrupted and out.matched == []


def test_paranoia_levels_gate_rules(crs_engine):
    req = dict(
        method="GET",
        uri="/?a=" + "%21" * 10,
        headers=[("Host", "x"), ("User-Agent", "Mozilla/5.0"), ("Accept", "*/*")],
    )
    pl1 = crs_engine(1).inspect(**req).matched
    pl4 = crs_engine(4).inspect(**req).matched
    assert set(pl1) < set(pl4)
    assert all(rid in pl4 for rid in pl1)
