"""The per-request fast paths give the same results as the plain evaluation: the compiled phase
program (skipAfter/skip resolved at load, inline TX gates and prefilter rejection) and the
caches kept across requests (universe Set results per raw value, libinjection verdicts)."""

from filters.waf.engine import Ruleset, Transaction

DEFAULTS = 'SecDefaultAction "phase:1,log,auditlog,pass"\nSecDefaultAction "phase:2,log,auditlog,pass"\n'


def tx_for(rs: Ruleset, uri="/", headers=None, **kw) -> Transaction:
    return Transaction(rs, method="GET", uri=uri, headers=headers or [("Host", "x")], **kw)


GATED = (
    'SecAction "id:1,phase:1,pass,nolog,setvar:tx.pl=1"\n'
    'SecRule TX:PL "@lt 1" "id:10,phase:2,pass,nolog,skipAfter:END-A"\n'
    'SecRule ARGS "@rx one" "id:11,phase:2,pass"\n'
    'SecRule TX:PL "@lt 2" "id:12,phase:2,pass,nolog,skipAfter:END-A"\n'
    'SecRule ARGS "@rx two" "id:13,phase:2,pass"\n'
    'SecMarker "END-A"\n'
    'SecRule MATCHED_VAR_NAME "@streq TX:pl" "id:14,phase:2,pass"\n'
    'SecRule ARGS "@rx one" "id:15,phase:2,pass,skip:1"\n'
    'SecRule ARGS "@rx one" "id:16,phase:2,pass"\n'
    'SecRule ARGS "@rx one" "id:17,phase:2,pass"\n'
)


def test_compiled_program_gates_skip_after_and_skip():
    rs = Ruleset.from_text(DEFAULTS + GATED)
    kinds = {rid: rs.by_id[rid].dispatch for rid in (10, 11, 12)}
    assert kinds == {10: 2, 11: 1, 12: 2}  # inline gates and prefilter rejection are in use
    out = tx_for(rs, uri="/?a=one&b=two").process_request()
    # 10 does not skip (pl is 1), 12 skips 13 and sets MATCHED_VAR_NAME as a matching rule does;
    # 15 skips the next rule only
    assert out.matched == [11, 14, 15, 17]


def test_gate_with_pl_raised_runs_the_block():
    rs = Ruleset.from_text(DEFAULTS + GATED.replace("tx.pl=1", "tx.pl=2"))
    out = tx_for(rs, uri="/?a=one&b=two").process_request()
    assert out.matched == [11, 13, 15, 17]


def test_skip_after_a_marker_repeated_later_jumps_to_the_next_one():
    rules = (
        'SecMarker "M"\n'
        'SecRule ARGS "@rx x" "id:1,phase:2,pass,skipAfter:M"\n'
        'SecRule ARGS "@rx x" "id:2,phase:2,pass"\n'
        'SecMarker "M"\n'
        'SecRule ARGS "@rx x" "id:3,phase:2,pass"\n'
        'SecRule ARGS "@rx x" "id:4,phase:2,pass,skipAfter:NOWHERE"\n'
        'SecRule ARGS "@rx x" "id:5,phase:2,pass"\n'
    )
    rs = Ruleset.from_text(DEFAULTS + rules)
    assert tx_for(rs, uri="/?a=x").process_request().matched == [1, 3, 4]


def test_repeated_values_give_the_same_verdicts_from_the_caches():
    rules = (
        'SecRule REQUEST_HEADERS|ARGS "@rx evil" "id:1,phase:2,pass,t:lowercase"\n'
        'SecRule ARGS_NAMES "@rx ^bad" "id:2,phase:2,pass,t:urlDecodeUni"\n'
        'SecRule REQUEST_HEADERS:User-Agent "@rx (?i)sqlmap" "id:3,phase:1,pass"\n'
    )
    rs = Ruleset.from_text(DEFAULTS + rules)
    reqs = [
        ("/?q=fine", [("Host", "x"), ("User-Agent", "curl/8")], []),
        ("/?q=EVIL", [("Host", "x"), ("User-Agent", "curl/8")], [1]),
        ("/?bad%20name=1", [("Host", "x"), ("User-Agent", "sqlmap/1.0")], [3, 2]),
        ("/?q=fine", [("Host", "x"), ("X-T", "EviL")], [1]),
    ]
    for _ in range(3):  # first meeting, second (now cached), third (served from the cache)
        for uri, headers, want in reqs:
            assert tx_for(rs, uri=uri, headers=headers).process_request().matched == want, (uri, headers)


def test_multimatch_libinjection_cache_replays_the_capture():
    rules = 'SecRule ARGS "@detectSQLi" "id:1,phase:2,pass,capture,multiMatch,t:none,t:urlDecodeUni"\n'
    rs = Ruleset.from_text(DEFAULTS + rules)
    fps = []
    for _ in range(2):
        tx = tx_for(rs, uri="/?a=fine&b=1%27%20OR%20%271%27%3D%271")
        tx.tx_vars.pop("0", None)
        assert tx.process_request().matched == [1]
        fps.append(tx.tx_vars.get("0"))
    assert fps[0] and fps[0] == fps[1]
    assert tx_for(rs, uri="/?a=fine").process_request().matched == []


def test_values_scanned_in_phase_1_are_scanned_again_after_the_body():
    # the body processor clears the per-request caches: phase 2's universe pass must still
    # see the header value phase 1's pass met (same request, an earlier pass)
    rules = (
        'SecRule REQUEST_HEADERS "@rx nothing-here" "id:1,phase:1,pass"\n'
        'SecRule REQUEST_HEADERS|ARGS "@rx evil" "id:2,phase:2,pass"\n'
    )
    rs = Ruleset.from_text(DEFAULTS + rules)
    for _ in range(3):
        tx = Transaction(
            rs,
            method="POST",
            uri="/",
            body=b"a=fine",
            headers=[("Host", "x"), ("X-T", "evil"), ("Content-Type", "application/x-www-form-urlencoded")],
        )
        assert tx.process_request().matched == [2]


def test_a_pipelines_patterns_are_split_into_small_sets_that_judge_alike():
    """A pipeline's patterns go into RE2 Sets of at most GROUP_SIZE (a Set of many patterns
    builds new lazy-DFA states on every never-seen value); the scan answers the pattern ids
    of every group, the same as one pattern at a time."""
    import re2

    from filters.waf import prefilter

    n = prefilter.GROUP_SIZE * 3 + 2
    many = [(0, i, [b"k%03dw" % i], False) for i in range(n)]
    few = [(1, 1000 + i, [b"k%03dw" % i], False) for i in range(3)]
    caseless = [(2, 2000, [b"union", b"select"], True)]
    unsafe, sets = prefilter.build(many + few + caseless)
    assert not unsafe
    assert [len(pids) for _, pids in sets[0].groups] == [prefilter.GROUP_SIZE] * 3 + [2]
    assert sorted(sets[0].pids) == list(range(n))
    text = b"x k002w y k%03dw z k%03dw" % (prefilter.GROUP_SIZE + 1, n - 1)
    assert sets[0].scan(text) == {2, prefilter.GROUP_SIZE + 1, n - 1}
    assert sets[0].scan(text) == {i for i in range(n) if re2.search(b"k%03dw" % i, text)}
    assert sets[1].scan(b"x k002w y") == {1002}
    assert sets[0].scan(b"nothing here") == set()
    assert sets[2].scan(b"1 SeLeCt 2") == {2000}
    assert sets[0].scan(b"k001w" * (prefilter.MAX_VALUE_SCAN // 5 + 1)) is prefilter.ALL
