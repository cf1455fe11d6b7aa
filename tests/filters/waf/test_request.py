"""Request variables and body processors (filters/waf/request.py, bodies.py) as the rules see
them: the request line, URL-encoded, JSON, multipart and XML bodies, ctl:requestBodyProcessor."""

import json

from .conftest import run


def test_request_variables():
    _, tx = run("", method="GET", uri="/a%20b/c.php?x=1&y", protocol="HTTP/1.0")
    s = tx.scalars
    assert s["REQUEST_URI"] == b"/a%20b/c.php?x=1&y"
    assert s["REQUEST_FILENAME"] == b"/a b/c.php" and s["REQUEST_BASENAME"] == b"c.php"
    assert s["QUERY_STRING"] == b"x=1&y" and s["REQUEST_LINE"] == b"GET /a%20b/c.php?x=1&y HTTP/1.0"
    assert tx.collections["ARGS_GET"] == [("x", b"1"), ("y", b"")]


# ----- body processors


def test_urlencoded_body():
    rules = 'SecRule ARGS_POST:name "@streq a b" "id:1,phase:2,pass"\nSecRule REQUEST_BODY "@contains name=" "id:2,phase:2,pass"\n'
    out, tx = run(
        rules,
        method="POST",
        body=b"name=a+b&x=%41",
        headers=[("Host", "x"), ("Content-Type", "application/x-www-form-urlencoded")],
    )
    assert out.matched == [1, 2] and ("x", b"A") in tx.collections["ARGS"]


def test_json_body_flattened_like_modsecurity():
    body = json.dumps({"a": {"b": "deep"}, "list": [1, "two", {"k": True}], "n": None}).encode()
    _, tx = run("", method="POST", body=body, headers=[("Host", "x"), ("Content-Type", "application/json")])
    assert tx.collections["ARGS_POST"] == [
        ("json.a.b", b"deep"),
        ("json.list.array_0", b"1"),
        ("json.list.array_1", b"two"),
        ("json.list.array_2.k", b"true"),
        ("json.n", b""),
    ]
    assert tx.scalars["REQBODY_PROCESSOR"] == b"JSON" and "REQUEST_BODY" not in tx.scalars


def test_json_parse_error_sets_reqbody_error():
    _, tx = run(
        "", method="POST", body=b"{bad", headers=[("Host", "x"), ("Content-Type", "application/json")]
    )
    assert tx.scalars["REQBODY_ERROR"] == b"1" and b"JSON" in tx.scalars["REQBODY_ERROR_MSG"]


def test_multipart_body():
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="field"\r\n\r\nvalue one\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="up"; filename="..\\\\a.php"\r\n'
        b"Content-Type: application/x-php\r\n\r\n<?php echo 1; ?>\r\n--XyZ--\r\n"
    )
    rules = 'SecRule FILES "@rx \\.php$" "id:1,phase:2,pass"\nSecRule MULTIPART_PART_HEADERS "@rx ^content-type\\s*:" "id:2,phase:2,pass,t:lowercase"\n'
    out, tx = run(
        rules,
        method="POST",
        body=body,
        headers=[("Host", "x"), ("Content-Type", "multipart/form-data; boundary=XyZ")],
    )
    assert tx.collections["ARGS_POST"] == [("field", b"value one")]
    assert tx.collections["FILES"] == [("up", b"..\\a.php")] and tx.collections["FILES_NAMES"] == [
        ("up", b"up")
    ]
    assert tx.scalars["MULTIPART_STRICT_ERROR"] == b"0"
    assert out.matched == [1, 2]


def test_multipart_without_closing_boundary_is_strict_error():
    body = b'--B\r\nContent-Disposition: form-data; name="a"\r\n\r\nx\r\n'
    _, tx = run(
        "",
        method="POST",
        body=body,
        headers=[("Host", "x"), ("Content-Type", "multipart/form-data; boundary=B")],
    )
    assert tx.scalars["MULTIPART_UNMATCHED_BOUNDARY"] == b"1" and tx.scalars["MULTIPART_STRICT_ERROR"] == b"1"


def test_xml_body_text_and_attributes_no_external_entities(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    body = (
        f'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file://{secret}">]>'
        '<r a="attr1"><b c="attr2">hello</b>&x;<d>world</d></r>'
    ).encode()
    rules = 'SecRule XML:/* "@contains helloworld" "id:1,phase:2,pass"\nSecRule XML://@* "@streq attr2" "id:2,phase:2,pass"\n'
    out, tx = run(
        rules, method="POST", body=body, headers=[("Host", "x"), ("Content-Type", "application/xml")]
    )
    # an entity declaration is refused (defusedxml's stance): a parse error, nothing resolved
    assert out.matched == [] and tx.scalars["REQBODY_ERROR"] == b"1"
    assert b"TOPSECRET" not in b"".join(tx.xml_text) + b"".join(v for _, v in tx.collections["ARGS"])
    plain = b'<?xml version="1.0"?><r a="attr1"><b c="attr2">hello</b><d>world</d></r>'
    out, tx = run(
        rules, method="POST", body=plain, headers=[("Host", "x"), ("Content-Type", "application/xml")]
    )
    assert out.matched == [1, 2]


def test_ctl_request_body_processor():
    rules = (
        'SecRule REQUEST_HEADERS:Content-Type "@rx ^text/plain" "id:1,phase:1,pass,nolog,ctl:requestBodyProcessor=JSON"\n'
        'SecRule ARGS:json.k "@streq v" "id:2,phase:2,pass"\n'
    )
    out, _ = run(
        rules, method="POST", body=b'{"k":"v"}', headers=[("Host", "x"), ("Content-Type", "text/plain")]
    )
    assert out.matched == [2]


def test_json_value_count_matches_the_parsed_document():
    """The byte-counting pre-check (bodies.json_value_count) agrees with the parsed document."""
    import random

    from filters.waf.bodies import json_value_count

    def count(doc) -> int:
        n, stack = 0, [doc]
        while stack:
            v = stack.pop()
            n += 1
            stack.extend(v.values() if isinstance(v, dict) else v if isinstance(v, list) else ())
        return n

    rnd = random.Random(3)

    def gen(depth=0):
        r = rnd.random()
        if depth > 4 or r < 0.4:
            return rnd.choice([1, 'a,b[]{}\\"', None, True, 2.5, "", 'x"y'])
        if r < 0.7:
            return [gen(depth + 1) for _ in range(rnd.randint(0, 4))]
        return {f"k,{i}[": gen(depth + 1) for i in range(rnd.randint(0, 4))}

    for _ in range(500):
        doc = gen()
        for text in (json.dumps(doc), json.dumps(doc, indent=2)):
            assert json_value_count(text.encode()) == count(doc), text
