"""The phase loop's jumps over runs of prefilter-rejectable rules (Rule.run_end, evaluation.py):
a rule the universe scan did not see sends the loop straight to the next rule of its run the
scan did see, or past the run. Also the general-rule fast path and the operators' constants."""

from __future__ import annotations

import json
import os
import random

from filters.waf.engine import Ruleset, Transaction
from filters.waf.operators import IP_VERDICTS, IpMatch, parse_operator
from tests.filters.waf.conftest import DEFAULTS, crs_dir


def _rules(n: int) -> str:
    return "".join(f'SecRule ARGS "@rx word{i}x" "id:{i},phase:2,pass,t:none"\n' for i in range(1, n + 1))


def test_a_run_of_rejectable_rules_still_reaches_each_candidate():
    rs = Ruleset.from_text(DEFAULTS + _rules(12))
    prog = rs.program[2]
    assert all(r.dispatch == 1 for r in prog)
    assert {r.run_end for r in prog} == {len(prog)}  # one run
    for args, want in (
        ("a=word3x&b=word7x", [3, 7]),
        ("a=word1x", [1]),
        ("a=word12x", [12]),
        ("a=word5x&b=word6x&c=word11x", [5, 6, 11]),
        ("a=nothing", []),
    ):
        out = Transaction(rs, method="GET", uri="/?" + args, headers=[("Host", "x")]).process_request()
        assert out.matched == want, args


def test_runs_end_at_a_rule_that_is_not_rejectable():
    rules = (
        _rules(3)
        + 'SecAction "id:50,phase:2,pass,setvar:tx.seen=1"\n'
        + (
            'SecRule ARGS "@rx late1x" "id:60,phase:2,pass,t:none"\n'
            'SecRule ARGS "@rx late2x" "id:61,phase:2,pass,t:none"\n'
        )
    )
    rs = Ruleset.from_text(DEFAULTS + rules)
    prog = rs.program[2]
    ends = {r.id: r.run_end for r in prog if r.dispatch == 1}
    action_at = [i for i, r in enumerate(prog) if r.id == 50][0]
    assert ends[1] == ends[3] == action_at
    assert ends[60] == ends[61] == len(prog)
    tx = Transaction(rs, method="GET", uri="/?a=late2x", headers=[("Host", "x")])
    out = tx.process_request()
    assert out.matched == [50, 61]
    assert tx.tx_vars["seen"] == b"1"


def test_a_candidate_that_removes_a_later_rule_of_its_run_is_obeyed():
    rules = (
        'SecRule ARGS "@rx first" "id:1,phase:2,pass,t:none,ctl:ruleRemoveById=3"\n'
        'SecRule ARGS "@rx second" "id:2,phase:2,pass,t:none"\n'
        'SecRule ARGS "@rx third" "id:3,phase:2,pass,t:none"\n'
        'SecRule ARGS "@rx fourth" "id:4,phase:2,pass,t:none"\n'
    )
    rs = Ruleset.from_text(DEFAULTS + rules)
    out = Transaction(
        rs, method="GET", uri="/?a=first+third+fourth", headers=[("Host", "x")]
    ).process_request()
    assert out.matched == [1, 4]


def _no_jumps(rs: Ruleset) -> dict[int, int]:
    saved = {}
    for prog in rs.program.values():
        for r in prog:
            saved[id(r)] = r.run_end
            r.run_end = 0  # never more than the current index: run_phase then visits every rule
    return saved


def _restore(rs: Ruleset, saved: dict[int, int]) -> None:
    for prog in rs.program.values():
        for r in prog:
            r.run_end = saved[id(r)]


def test_crs_verdicts_with_and_without_the_jumps_agree(crs_engine):
    """CRS regression and keyword-dense records, a sample: the same matches, score, interrupt
    and TX values whether the loop jumps over runs or visits every rule."""
    from bench.crs_conformance import record_request

    recs = []
    for path in (
        os.path.join(os.path.dirname(crs_dir()), "crs-regression.jsonl"),
        os.path.join(os.path.dirname(__file__), "..", "..", "..", "bench", "data", "waf-dense.jsonl"),
    ):
        with open(path, encoding="utf-8") as fh:
            lines = [json.loads(line) for line in fh if line.strip()]
        recs += random.Random(17).sample(
            [r for r in lines if r.get("direction", "request") == "request"], 100
        )
    engine = crs_engine()
    rs = engine.ruleset
    assert any(
        r.run_end > i + 1 for prog in rs.program.values() for i, r in enumerate(prog) if r.dispatch == 1
    )
    for rec in recs:
        req = record_request(rec)
        jumping = engine.transaction(**req)
        a = jumping.process_request()
        saved = _no_jumps(rs)
        try:
            visiting = engine.transaction(**req)
            b = visiting.process_request()
        finally:
            _restore(rs, saved)
        assert (a.matched, a.score, a.interrupted, a.rule_id) == (
            b.matched,
            b.score,
            b.interrupted,
            b.rule_id,
        )
        assert jumping.tx_vars == visiting.tx_vars, rec.get("id")


def test_negated_rule_with_a_prefilter_set_matches_values_the_set_rules_out():
    # the general path's prefilter shortcut must not turn "cannot match" into "no match" for !@rx
    rules = (
        'SecRule ARGS "@rx ^[a-z]+$" "id:1,phase:2,pass,t:none"\n'
        'SecRule ARGS "!@rx ^[a-z]+$" "id:2,phase:2,pass,t:none,setvar:tx.neg=%{MATCHED_VAR}"\n'
    )
    rs = Ruleset.from_text(DEFAULTS + rules)
    assert rs.by_id[2].general_prefilter or rs.by_id[2].pattern_id is None
    tx = Transaction(rs, method="GET", uri="/?a=ABC1", headers=[("Host", "x")])
    assert tx.process_request().matched == [2]
    assert tx.tx_vars["neg"] == b"ABC1"
    tx = Transaction(rs, method="GET", uri="/?a=abc", headers=[("Host", "x")])
    assert tx.process_request().matched == [1]


def test_numeric_compare_constant_and_macro():
    rules = (
        'SecAction "id:1,phase:1,pass,nolog,setvar:tx.limit=10"\n'
        'SecRule ARGS:n "@gt 5" "id:2,phase:2,pass"\n'
        'SecRule ARGS:n "@lt %{tx.limit}" "id:3,phase:2,pass"\n'
        'SecRule ARGS:n "@eq 007" "id:4,phase:2,pass"\n'
    )
    rs = Ruleset.from_text(DEFAULTS + rules)
    for n, want in (("7", [2, 3, 4]), ("12", [2]), ("3", [3]), ("x", [3])):
        out = Transaction(rs, method="GET", uri=f"/?n={n}", headers=[("Host", "x")]).process_request()
        assert out.matched == want, n


def test_ip_match_verdicts_are_kept_per_address_and_bounded():
    op = parse_operator("@ipMatch 10.0.0.0/8,::1", {"dir": "."})
    assert isinstance(op, IpMatch)
    for _ in range(2):  # the second round answers from the kept verdicts
        assert op.match(None, b"10.1.2.3", False)
        assert op.match(None, b"::1", False)
        assert not op.match(None, b"11.0.0.1", False)
        assert not op.match(None, b"not an address", False)
    for i in range(IP_VERDICTS + 10):
        op.match(None, f"192.168.{i // 256 % 256}.{i % 256}".encode(), False)
    assert len(op._verdicts) <= IP_VERDICTS
    assert op.match(None, b"10.9.9.9", False)


def test_match_all_rx_captures_the_whole_value_as_re2_does():
    op = parse_operator("@rx ^.*$", {"dir": "."})
    assert op.match_all

    class Captures:
        def set_captures(self, groups):
            self.groups = groups

    for v in (b"", b"a", b"x-forwarded-for", b"a\nb", b"\xff\n", b"\n\n"):
        c = Captures()
        assert op.match(c, v, True)
        m = op.regex.search(v)
        assert m is not None and c.groups == [m.group(0)] == [v]
    assert not parse_operator("@rx ^.*$x", {"dir": "."}).match_all
