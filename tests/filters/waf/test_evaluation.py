"""Rule evaluation (filters/waf/evaluation.py) on small hand-written rule sets: chains,
setvar/scoring, markers, ctl, exclusions, captures and macros, the prefilter."""

from filters.waf.engine import Ruleset, Transaction, ValueCaches

from .conftest import DEFAULTS, run


def test_rule_matches_args_and_logs():
    out, _ = run('SecRule ARGS "@rx evil" "id:1,phase:2,block"')
    assert out.matched == []
    out, tx = run('SecRule ARGS "@rx evil" "id:1,phase:2,block"', uri="/?a=good&b=evil")
    assert out.matched == [1] and not out.interrupted
    assert tx.scalars["MATCHED_VAR_NAME"] == b"ARGS:b"


def test_nolog_rule_matches_silently():
    out, tx = run('SecRule ARGS "@rx e" "id:1,phase:2,pass,nolog,setvar:tx.hit=1"', uri="/?a=e")
    assert out.matched == [] and tx.tx_vars["hit"] == b"1"


def test_transformations_apply_in_order():
    out, _ = run(
        'SecRule ARGS "@streq <script>" "id:1,phase:2,t:none,t:urlDecodeUni,t:lowercase"',
        uri="/?a=%253CSCRIPT%253E",
    )
    assert out.matched == [1]


def test_chain_needs_every_link_and_sees_matched_var():
    rules = (
        'SecRule REQUEST_METHOD "@streq POST" "id:1,phase:2,deny,chain"\n'
        '    SecRule ARGS:user "@rx ^admin$" "chain"\n'
        '        SecRule MATCHED_VAR "@rx min"\n'
    )
    out, _ = run(rules, uri="/?user=admin")
    assert out.matched == []
    out, _ = run(rules, method="POST", uri="/?user=admin")
    assert out.matched == [1] and out.interrupted and out.rule_id == 1


def test_setvar_scoring_and_threshold_deny():
    rules = (
        'SecAction "id:1,phase:1,pass,nolog,setvar:tx.score=0,setvar:tx.threshold=5"\n'
        'SecRule ARGS "@rx a" "id:2,phase:2,pass,setvar:tx.score=+3"\n'
        'SecRule ARGS "@rx b" "id:3,phase:2,pass,setvar:tx.score=+%{tx.threshold}"\n'
        'SecRule ARGS "@rx z" "id:4,phase:2,pass,setvar:tx.score=-1,setvar:!tx.threshold"\n'
        'SecRule TX:score "@ge 8" "id:5,phase:2,deny,status:403"\n'
    )
    out, tx = run(rules, uri="/?x=a&y=b")
    assert out.matched == [2, 3, 5] and out.interrupted and tx.tx_vars["score"] == b"8"
    out, tx = run(rules, uri="/?x=a&y=b&w=z")
    assert out.matched == [2, 3, 4] and not out.interrupted and "threshold" not in tx.tx_vars


def test_setvar_runs_per_matching_value_like_libmodsecurity3():
    out, tx = run('SecRule ARGS "@rx a" "id:1,phase:2,pass,setvar:tx.n=+1"', uri="/?p=a&q=a&r=b")
    assert tx.tx_vars["n"] == b"2"


def test_skip_after_marker_and_skip():
    rules = (
        'SecRule ARGS:go "@streq 1" "id:1,phase:2,pass,nolog,skipAfter:END"\n'
        'SecRule ARGS "@rx ." "id:2,phase:2,pass"\n'
        "SecMarker END\n"
        'SecRule ARGS "@rx ." "id:3,phase:2,pass,skip:1"\n'
        'SecRule ARGS "@rx ." "id:4,phase:2,pass"\n'
        'SecRule ARGS "@rx ." "id:5,phase:2,pass"\n'
    )
    out, _ = run(rules, uri="/?go=1")
    assert out.matched == [3, 5]
    out, _ = run(rules, uri="/?go=0")
    assert out.matched == [2, 3, 5]


def test_detection_only_records_would_be_deny_and_runs_on():
    rules = 'SecRule ARGS "@rx a" "id:1,phase:2,deny"\nSecRule ARGS "@rx a" "id:2,phase:2,pass"\n'
    out, _ = run(rules, uri="/?x=a")
    assert out.matched == [1] and out.interrupted
    out, _ = run(rules, uri="/?x=a", detection_only=True)
    assert out.matched == [1, 2] and out.interrupted and out.rule_id == 1


def test_ctl_rule_remove_by_id_tag_and_target():
    rules = (
        'SecRule REQUEST_URI "@beginsWith /api" "id:1,phase:1,pass,nolog,ctl:ruleRemoveById=10,'
        'ctl:ruleRemoveByTag=noisy,ctl:ruleRemoveTargetById=30;ARGS:comment"\n'
        'SecRule ARGS "@rx x" "id:10,phase:2,pass"\n'
        'SecRule ARGS "@rx x" "id:20,phase:2,pass,tag:noisy"\n'
        'SecRule ARGS "@rx x" "id:30,phase:2,pass"\n'
    )
    out, _ = run(rules, uri="/api?comment=x")
    assert out.matched == []
    out, _ = run(rules, uri="/api?other=x")
    assert out.matched == [30]
    out, _ = run(rules, uri="/web?comment=x")
    assert out.matched == [10, 20, 30]


def test_ctl_rule_engine_off_stops_evaluation():
    rules = (
        'SecAction "id:1,phase:1,pass,nolog,ctl:ruleEngine=Off"\nSecRule ARGS "@rx ." "id:2,phase:2,deny"\n'
    )
    out, _ = run(rules, uri="/?a=b")
    assert out.matched == [] and not out.interrupted


def test_target_exclusions_counts_and_regex_selectors():
    rules = (
        'SecRule REQUEST_COOKIES|!REQUEST_COOKIES:/^_ga/ "@rx evil" "id:1,phase:1,pass"\n'
        'SecRule &ARGS "@eq 3" "id:2,phase:1,pass"\n'
        'SecRule &REQUEST_HEADERS:X-Missing "@eq 0" "id:3,phase:1,pass"\n'
        'SecRule ARGS_NAMES "@rx ^b$" "id:4,phase:1,pass"\n'
        'SecRule REQUEST_HEADERS:user-agent "@contains bot" "id:5,phase:1,pass"\n'
    )
    out, _ = run(
        rules,
        uri="/?a=1&b=2&c=3",
        headers=[("Host", "x"), ("Cookie", "_ga=evil; _gat_x=evil"), ("User-Agent", "mybot")],
    )
    assert out.matched == [2, 3, 4, 5]
    out, _ = run(rules, uri="/", headers=[("Host", "x"), ("Cookie", "_ga=1; sess=evil")])
    assert out.matched == [1, 3]


def test_capture_and_macro_expansion():
    rules = (
        'SecRule ARGS:q "@rx (\\d+)-(\\d+)" "id:1,phase:2,pass,capture,setvar:tx.sum=%{TX.1}%{tx.2}"\n'
        'SecRule TX:sum "@streq 1234" "id:2,phase:2,pass,setvar:\'tx.msg=%{MATCHED_VAR_NAME}=%{MATCHED_VAR}\'"\n'
        'SecRule REQUEST_HEADERS:Host "@streq %{request_headers.host}" "id:3,phase:2,pass"\n'
    )
    out, tx = run(rules, uri="/?q=12-34")
    assert out.matched == [1, 2, 3]
    assert tx.tx_vars["msg"] == b"TX:sum=1234"


def test_prefilter_and_plain_re2_agree():
    rules = "".join(
        f'SecRule ARGS|REQUEST_HEADERS "@rx {p}" "id:{i},phase:2,pass,t:none,t:lowercase"\n'
        for i, p in enumerate(["union\\s+select", "<script", "\\.\\./", "^abc$", "(?:x|y)z+"], 1)
    )
    rules += 'SecRule ARGS "@pm passwd shadow" "id:9,phase:2,pass,t:lowercase"\n'
    a = Ruleset.from_text(rules, prefilter="on")
    b = Ruleset.from_text(rules, prefilter="off")
    assert a.prefilter and not b.prefilter
    for uri in (
        "/?q=UNION%20SELECT",
        "/?q=%3Cscript",
        "/?f=../x",
        "/?a=abc",
        "/?a=xzz&b=/etc/PASSWD",
        "/?ok=1",
    ):
        ra = Transaction(a, method="GET", uri=uri, headers=[("Host", "x")]).process_request().matched
        rb = Transaction(b, method="GET", uri=uri, headers=[("Host", "x")]).process_request().matched
        assert ra == rb


def _fingerprint(rs: Ruleset) -> dict:
    out = {}
    for name, value in vars(rs).items():
        out[name] = len(value) if hasattr(value, "__len__") else value
    return out


def test_the_compiled_ruleset_does_not_change_while_requests_run():
    """Per-request state lives in the transaction, values met across requests in ValueCaches."""
    rs = Ruleset.from_text(
        DEFAULTS + 'SecRule ARGS|REQUEST_HEADERS "@rx (?i)union\\s+select" "id:1,phase:2,t:lowercase,'
        'setvar:tx.score=+5,ctl:ruleRemoveTargetById=2;ARGS:q"\n'
        'SecRule ARGS "@rx evil" "id:2,phase:2,t:urlDecodeUni"\n'
    )
    before = _fingerprint(rs)
    caches = ValueCaches(rs)
    for uri in ("/?q=1+union+select+2", "/?a=evil&q=evil", "/?x=%u0065vil"):
        Transaction(rs, method="GET", uri=uri, headers=[("Host", "x")], caches=caches).process_request()
    assert _fingerprint(rs) == before
    assert caches.transformed  # what the requests learnt went to the caches


def test_value_caches_belong_to_one_ruleset():
    import pytest

    a, b = Ruleset.from_text(DEFAULTS), Ruleset.from_text(DEFAULTS)
    with pytest.raises(ValueError):
        Transaction(a, method="GET", uri="/", caches=ValueCaches(b))
