"""Engine semantics on small hand-written rule sets: chains, setvar/scoring, markers, ctl, bodies."""

import json

from filters.waf.engine import Ruleset, Transaction

DEFAULTS = 'SecDefaultAction "phase:1,log,auditlog,pass"\nSecDefaultAction "phase:2,log,auditlog,pass"\n'


def run(rules: str, *, method="GET", uri="/", headers=None, body=b"", detection_only=False, **kw):
    rs = Ruleset.from_text(DEFAULTS + rules)
    tx = Transaction(rs, method=method, uri=uri, headers=headers or [("Host", "x")], body=body,
                     detection_only=detection_only, **kw)
    out = tx.process_request()
    return out, tx


def test_rule_matches_args_and_logs():
    out, _ = run('SecRule ARGS "@rx evil" "id:1,phase:2,block"')
    assert out.matched == []
    out, tx = run('SecRule ARGS "@rx evil" "id:1,phase:2,block"', uri="/?a=good&b=evil")
    assert out.matched == [1] and not out.interrupted
    assert tx.s["MATCHED_VAR_NAME"] == b"ARGS:b"


def test_nolog_rule_matches_silently():
    out, tx = run('SecRule ARGS "@rx e" "id:1,phase:2,pass,nolog,setvar:tx.hit=1"', uri="/?a=e")
    assert out.matched == [] and tx.tx["hit"] == b"1"


def test_transformations_apply_in_order():
    out, _ = run('SecRule ARGS "@streq <script>" "id:1,phase:2,t:none,t:urlDecodeUni,t:lowercase"', uri="/?a=%253CSCRIPT%253E")
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
    assert out.matched == [2, 3, 5] and out.interrupted and tx.tx["score"] == b"8"
    out, tx = run(rules, uri="/?x=a&y=b&w=z")
    assert out.matched == [2, 3, 4] and not out.interrupted and "threshold" not in tx.tx


def test_setvar_runs_per_matching_value_like_libmodsecurity3():
    out, tx = run('SecRule ARGS "@rx a" "id:1,phase:2,pass,setvar:tx.n=+1"', uri="/?p=a&q=a&r=b")
    assert tx.tx["n"] == b"2"


def test_skip_after_marker_and_skip():
    rules = (
        'SecRule ARGS:go "@streq 1" "id:1,phase:2,pass,nolog,skipAfter:END"\n'
        'SecRule ARGS "@rx ." "id:2,phase:2,pass"\n'
        'SecMarker END\n'
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
    rules = 'SecAction "id:1,phase:1,pass,nolog,ctl:ruleEngine=Off"\nSecRule ARGS "@rx ." "id:2,phase:2,deny"\n'
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
    out, _ = run(rules, uri="/?a=1&b=2&c=3", headers=[("Host", "x"), ("Cookie", "_ga=evil; _gat_x=evil"), ("User-Agent", "mybot")])
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
    assert tx.tx["msg"] == b"TX:sum=1234"


def test_request_variables():
    _, tx = run("", method="GET", uri="/a%20b/c.php?x=1&y", protocol="HTTP/1.0")
    s = tx.s
    assert s["REQUEST_URI"] == b"/a%20b/c.php?x=1&y"
    assert s["REQUEST_FILENAME"] == b"/a b/c.php" and s["REQUEST_BASENAME"] == b"c.php"
    assert s["QUERY_STRING"] == b"x=1&y" and s["REQUEST_LINE"] == b"GET /a%20b/c.php?x=1&y HTTP/1.0"
    assert tx.c["ARGS_GET"] == [("x", b"1"), ("y", b"")]


# ----- body processors


def test_urlencoded_body():
    rules = 'SecRule ARGS_POST:name "@streq a b" "id:1,phase:2,pass"\nSecRule REQUEST_BODY "@contains name=" "id:2,phase:2,pass"\n'
    out, tx = run(rules, method="POST", body=b"name=a+b&x=%41",
                  headers=[("Host", "x"), ("Content-Type", "application/x-www-form-urlencoded")])
    assert out.matched == [1, 2] and ("x", b"A") in tx.c["ARGS"]


def test_json_body_flattened_like_modsecurity():
    body = json.dumps({"a": {"b": "deep"}, "list": [1, "two", {"k": True}], "n": None}).encode()
    _, tx = run("", method="POST", body=body, headers=[("Host", "x"), ("Content-Type", "application/json")])
    assert tx.c["ARGS_POST"] == [
        ("json.a.b", b"deep"), ("json.list.array_0", b"1"), ("json.list.array_1", b"two"),
        ("json.list.array_2.k", b"true"), ("json.n", b""),
    ]
    assert tx.s["REQBODY_PROCESSOR"] == b"JSON" and "REQUEST_BODY" not in tx.s


def test_json_parse_error_sets_reqbody_error():
    _, tx = run("", method="POST", body=b"{bad", headers=[("Host", "x"), ("Content-Type", "application/json")])
    assert tx.s["REQBODY_ERROR"] == b"1" and b"JSON" in tx.s["REQBODY_ERROR_MSG"]


def test_multipart_body():
    body = (
        b"--XyZ\r\nContent-Disposition: form-data; name=\"field\"\r\n\r\nvalue one\r\n"
        b"--XyZ\r\nContent-Disposition: form-data; name=\"up\"; filename=\"..\\\\a.php\"\r\n"
        b"Content-Type: application/x-php\r\n\r\n<?php echo 1; ?>\r\n--XyZ--\r\n"
    )
    rules = 'SecRule FILES "@rx \\.php$" "id:1,phase:2,pass"\nSecRule MULTIPART_PART_HEADERS "@rx ^content-type\\s*:" "id:2,phase:2,pass,t:lowercase"\n'
    out, tx = run(rules, method="POST", body=body, headers=[("Host", "x"), ("Content-Type", "multipart/form-data; boundary=XyZ")])
    assert tx.c["ARGS_POST"] == [("field", b"value one")]
    assert tx.c["FILES"] == [("up", b"..\\a.php")] and tx.c["FILES_NAMES"] == [("up", b"up")]
    assert tx.s["MULTIPART_STRICT_ERROR"] == b"0"
    assert out.matched == [1, 2]


def test_multipart_without_closing_boundary_is_strict_error():
    body = b"--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nx\r\n"
    _, tx = run("", method="POST", body=body, headers=[("Host", "x"), ("Content-Type", "multipart/form-data; boundary=B")])
    assert tx.s["MULTIPART_UNMATCHED_BOUNDARY"] == b"1" and tx.s["MULTIPART_STRICT_ERROR"] == b"1"


def test_xml_body_text_and_attributes_no_external_entities(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    body = (f'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file://{secret}">]>'
            '<r a="attr1"><b c="attr2">hello</b>&x;<d>world</d></r>').encode()
    rules = 'SecRule XML:/* "@contains helloworld" "id:1,phase:2,pass"\nSecRule XML://@* "@streq attr2" "id:2,phase:2,pass"\n'
    out, tx = run(rules, method="POST", body=body, headers=[("Host", "x"), ("Content-Type", "application/xml")])
    # an entity declaration is refused (defusedxml's stance): a parse error, nothing resolved
    assert out.matched == [] and tx.s["REQBODY_ERROR"] == b"1"
    assert b"TOPSECRET" not in b"".join(tx.xml_text) + b"".join(v for _, v in tx.c["ARGS"])
    plain = b'<?xml version="1.0"?><r a="attr1"><b c="attr2">hello</b><d>world</d></r>'
    out, tx = run(rules, method="POST", body=plain, headers=[("Host", "x"), ("Content-Type", "application/xml")])
    assert out.matched == [1, 2]


def test_ctl_request_body_processor():
    rules = ('SecRule REQUEST_HEADERS:Content-Type "@rx ^text/plain" "id:1,phase:1,pass,nolog,ctl:requestBodyProcessor=JSON"\n'
             'SecRule ARGS:json.k "@streq v" "id:2,phase:2,pass"\n')
    out, _ = run(rules, method="POST", body=b'{"k":"v"}', headers=[("Host", "x"), ("Content-Type", "text/plain")])
    assert out.matched == [2]


def test_prefilter_and_plain_re2_agree():
    rules = "".join(f'SecRule ARGS|REQUEST_HEADERS "@rx {p}" "id:{i},phase:2,pass,t:none,t:lowercase"\n'
                    for i, p in enumerate(["union\\s+select", "<script", "\\.\\./", "^abc$", "(?:x|y)z+"], 1))
    rules += 'SecRule ARGS "@pm passwd shadow" "id:9,phase:2,pass,t:lowercase"\n'
    a = Ruleset.from_text(rules, prefilter="on")
    b = Ruleset.from_text(rules, prefilter="off")
    assert a.prefilter and not b.prefilter
    for uri in ("/?q=UNION%20SELECT", "/?q=%3Cscript", "/?f=../x", "/?a=abc", "/?a=xzz&b=/etc/PASSWD", "/?ok=1"):
        ra = Transaction(a, method="GET", uri=uri, headers=[("Host", "x")]).process_request().matched
        rb = Transaction(b, method="GET", uri=uri, headers=[("Host", "x")]).process_request().matched
        assert ra == rb
