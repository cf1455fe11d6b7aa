"""Red team 2 (notes/redteam2 F01, F02, F03, F13): the reproduction scripts' requests, sent through
the WAF stage with both rule packs. Each shape that passed uninspected is now inspected (403
waf_blocked) or refused (400 waf_body_unparsable); the controls stay as they were."""

import json

import pytest

from filters.waf import bodies

from .test_redteam_bodies import _check

U = "1 UNION SELECT password FROM users--"


@pytest.fixture(params=["builtin", "crs"])
def pack(request):
    if request.param == "crs":
        from .conftest import crs_dir

        return {"rules": "crs", "crs_path": crs_dir()}
    return {}


# F01: one NUL byte made a text body "binary" and the WAF read none of it.
@pytest.mark.parametrize("ct", [None, "text/plain", "application/octet-stream"])
@pytest.mark.parametrize(
    "body",
    [
        json.dumps({"q": U}).encode() + b"\x00",  # the red team's: a trailing NUL
        b"\x00" + json.dumps({"q": U}).encode(),
        json.dumps({"q": U}).encode().replace(b"UNION ", b"UNION \x00"),
        json.dumps({"q": U}).encode() + b"\x00\xff\xfe binary tail",  # Go's Decoder stops at the value
        json.dumps({"q": U}).encode("utf-16") + "\x00".encode("utf-16-le"),
    ],
)
async def test_f01_nul_byte_does_not_switch_inspection_off(pack, ct, body):
    assert (await _check(pack, ct, body))[0] == "waf_blocked"


def test_f01_raw_text_keeps_text_and_drops_only_a_binary_tail():
    assert bodies.raw_text(b"a=1\x00&b=2", None) == b"a=1&b=2"
    assert bodies.raw_text(b"q=abc\x00\xff\xd8rest", None) == b"q=abc"
    assert bodies.raw_text(b"\xff\xd8\xff\xe0\x00\x10JFIF", None) == b""


@pytest.mark.parametrize(
    "body",
    [
        bytes(range(256)) * 4,
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00" + bytes(range(128, 256)),
        b"plain text with a NUL\x00 in it",
    ],
)
async def test_f01_benign_binary_and_nul_text_pass(body):
    assert (await _check({}, "application/octet-stream", body))[0] == "allowed"


# F02: multipart parts the WAF did not read.
MP = "multipart/form-data; boundary=b"


def _part(headers: bytes, content: bytes) -> bytes:
    return b"--b\r\n" + headers + b"\r\n" + content + b"\r\n--b--\r\n"


F02_REFUSED = {
    "quoted-printable part": _part(
        b'Content-Disposition: form-data; name="q"\r\nContent-Transfer-Encoding: quoted-printable\r\n',
        b"1 UNION=20SELECT password FROM users--",
    ),
    "base64 part": _part(
        b'Content-Disposition: form-data; name="q"\r\nContent-Transfer-Encoding: base64\r\n',
        b"MSBVTklPTiBTRUxFQ1QgcGFzc3dvcmQgRlJPTSB1c2Vycy0t",
    ),
    "benign quoted-printable part": _part(
        b'Content-Disposition: form-data; name="q"\r\nContent-Transfer-Encoding: quoted-printable\r\n',
        b"Bod=C3=B8",
    ),
    "two Content-Disposition": _part(
        b'Content-Disposition: form-data; name="q"; filename="a"\r\nContent-Disposition: form-data; name="q"\r\n',
        U.encode(),
    ),
    "two Content-Type": _part(
        b'Content-Disposition: form-data; name="q"\r\nContent-Type: text/plain\r\nContent-Type: text/html\r\n',
        b"x",
    ),
    "name twice": _part(b'Content-Disposition: form-data; name="a"; name="q"\r\n', b"x"),
    "filename twice": _part(b'Content-Disposition: form-data; name="q"; filename="a"; filename=""\r\n', b"x"),
    "unknown part charset": _part(
        b'Content-Disposition: form-data; name="q"\r\nContent-Type: text/plain; charset=ibm01047\r\n', b"x"
    ),
    "part charset twice": _part(
        b'Content-Disposition: form-data; name="q"\r\nContent-Type: text/plain; charset=utf-8; charset=ibm037\r\n',
        b"x",
    ),
}


@pytest.mark.parametrize("case", sorted(F02_REFUSED))
async def test_f02_ambiguous_or_encoded_parts_refused(pack, case):
    assert (await _check(pack, MP, F02_REFUSED[case]))[0] == "waf_body_unparsable"


@pytest.mark.parametrize(
    "body",
    [
        _part(b'Content-Disposition: form-data; name="q"\r\n', U.encode()),  # control
        _part(b'Content-Disposition: form-data; name="q"; filename=""\r\n', U.encode()),
        _part(b"Content-Disposition: form-data; name=\"q\"; filename*=UTF-8''\r\n", U.encode()),
        _part(
            b'Content-Disposition: form-data; name="q"; filename="a.txt"; filename*=UTF-8\'\'\r\n', U.encode()
        ),
        _part(
            b'Content-Disposition: form-data; name="q"\r\nContent-Type: text/plain; charset=ibm037\r\n',
            U.encode("cp037"),
        ),
        _part(
            b'Content-Disposition: form-data; name="q"\r\nContent-Type: text/plain; charset=utf-16\r\n',
            U.encode("utf-16"),
        ),
    ],
)
async def test_f02_field_parts_inspected(pack, body):
    reason, c = await _check(pack, MP, body)
    assert reason == "waf_blocked"
    if not pack:
        assert {9105100, 9105110} & set(c.waf.matched_rule_ids)


def test_f02_parser_values():
    res = bodies.multipart(F02_REFUSED["quoted-printable part"], MP)
    assert res.error and res.args == [("q", U.encode())]  # decoded (seen under inspect_raw)
    res = bodies.multipart(_part(b'Content-Disposition: form-data; name="q"; filename=""\r\n', b"v"), MP)
    assert res.error is None and res.args == [("q", b"v")] and res.files == []
    res = bodies.multipart(_part(b'Content-Disposition: form-data; name="f"; filename="a.txt"\r\n', b"v"), MP)
    assert res.error is None and res.files == [("f", b"a.txt")] and res.args == []
    for cte in (b"7bit", b"8bit", b"binary", b"BINARY"):
        h = b'Content-Disposition: form-data; name="q"\r\nContent-Transfer-Encoding: ' + cte + b"\r\n"
        res = bodies.multipart(_part(h, b"v"), MP)
        assert res.error is None and res.args == [("q", b"v")], cte


async def test_f02_benign_multipart_passes():
    body = (
        b'--b\r\nContent-Disposition: form-data; name="navn"\r\n\r\nKari Nordmann\r\n'
        b'--b\r\nContent-Disposition: form-data; name="vedlegg"; filename="soknad.pdf"\r\n'
        b"Content-Type: application/pdf\r\n\r\n%PDF-1.7 ...\r\n"
        b'--b\r\nContent-Disposition: form-data; name="tekst"\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n'
        b"Bod\xc3\xb8\r\n--b--\r\n"
    )
    assert (await _check({}, MP, body))[0] == "allowed"


# F03: Content-Type parameters read as RFC 9110 says; a repeated one refused; XML attributes read.
FORM = "application/x-www-form-urlencoded"
EBCDIC = ("q=" + U).encode("cp037")


async def test_f03_repeated_charset_refused(pack):
    assert (await _check(pack, FORM + "; charset=ibm037", EBCDIC))[0] == "waf_blocked"  # control
    for ct in (FORM + "; charset=utf-8; charset=ibm037", FORM + "; CHARSET=ibm037; charset=utf-8"):
        assert (await _check(pack, ct, EBCDIC))[0] == "waf_body_unparsable", ct
    assert (await _check(pack, MP + "; boundary=c", b"--c--\r\n"))[0] == "waf_body_unparsable"


async def test_f03_quoted_string_parameters(pack):
    # a=";charset=utf-8" is one parameter's quoted value: the charset is ibm037
    assert (await _check(pack, FORM + '; a="x;charset=utf-8"; charset=ibm037', EBCDIC))[0] == "waf_blocked"
    assert (await _check(pack, FORM + '; charset="ibm037"', EBCDIC))[0] == "waf_blocked"
    assert (await _check(pack, FORM + '; charset="ib\\m037"', EBCDIC))[0] == "waf_blocked"


def test_f03_content_type_params():
    p = bodies.content_type_params
    assert p('a/b; x="1;charset=y"; charset=z') == {"x": "1;charset=y", "charset": "z"}
    assert p("a/b ; Charset = UTF-8 ;") == {"charset": "UTF-8"}
    assert p('multipart/form-data; boundary="a b;c"') == {"boundary": "a b;c"}
    for bad in ("a/b; charset=a; charset=b", "a/b; charset", 'a/b; charset="x', "a/b; charset="):
        with pytest.raises(bodies.ContentTypeError):
            p(bad)
    assert bodies.multipart_boundary('multipart/form-data; x="boundary=evil"; boundary=good') == "good"


@pytest.mark.parametrize(
    "ct,doc",
    [
        ("application/xml", f'<q v="{U}"/>'.encode()),
        ("text/xml", b"<Envelope><Body><search q=\"1' OR '1'='1\"/></Body></Envelope>"),
        ("application/xml", b'<q v="&lt;script&gt;alert(1)&lt;/script&gt;"/>'),
    ],
)
async def test_f03_xml_attribute_values_inspected(pack, ct, doc):
    assert (await _check(pack, ct, doc))[0] == "waf_blocked"


# F13: XInclude in either namespace, xsi schema locations and xml-stylesheet are refused.
@pytest.mark.parametrize(
    "doc",
    [
        b'<a xmlns:xi="http://www.w3.org/2003/XInclude"><xi:include href="/etc/hostname" parse="text"/></a>',
        b'<a xmlns:xi="http://www.w3.org/2001/XInclude"><xi:include href="/etc/hostname" parse="text"/></a>',
        b'<a><include xmlns="http://www.w3.org/2003/XInclude" href="/etc/passwd" parse="text"/></a>',
        b'<a xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:schemaLocation="urn:x http://127.0.0.1:9/x.xsd"/>',
        b'<a xmlns:q="http://www.w3.org/2001/XMLSchema-instance"><b q:noNamespaceSchemaLocation="http://127.0.0.1:9/"/></a>',
        b'<?xml version="1.0"?><?xml-stylesheet type="text/xsl" href="http://127.0.0.1:9/x.xsl"?><a/>',
        b"<a><?xml-stylesheet href='http://127.0.0.1:9/x.xsl'?></a>",
    ],
)
async def test_f13_fetching_constructs_refused(pack, doc):
    assert (await _check(pack, "application/xml", doc))[0] == "waf_body_unparsable"


@pytest.mark.parametrize(
    "doc",
    [
        # xsi:type / xsi:nil (common in SOAP) are fine; schemaLocation out of the xsi namespace too
        b'<a xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><b xsi:type="x" xsi:nil="true"/></a>',
        b'<a xmlns:s="urn:other"><b s:schemaLocation="urn:x y"/></a>',
        b'<?xml version="1.0"?><?other-pi x?><a>byggesak</a>',
    ],
)
async def test_f13_benign_xml_passes(doc):
    assert (await _check({}, "application/xml", doc))[0] == "allowed"


# F09 (query): best-fit encodings and repeated-parameter splits are read as a backend may read them.
# (The red team's split q=1'&q= OR '1'='1 joins to "1', OR '1'='1", which is no SQL: the join is
# shown on the values in test_f09_query_readings; each fragment of a real split that libinjection
# would miss was already refused on its own in every split tried.)
@pytest.mark.parametrize(
    "query",
    [
        "q=1%EF%BC%87%20OR%20%EF%BC%871%EF%BC%87%3D%EF%BC%871",  # fullwidth apostrophe
        "q=1%C0%A7%20OR%20%C0%A71%C0%A7%3D%C0%A71",  # overlong apostrophe
        "q=1%20UNION%C2%A0SELECT%20password%20FROM%20users--",  # NBSP
        "q=%EF%BC%9Cscript%EF%BC%9Ealert(1)%EF%BC%9C/script%EF%BC%9E",  # fullwidth <script>
    ],
)
async def test_f09_query_readings_inspected(query):
    from gateway.chain import Deny

    from .test_stage import ctx, filt

    c = ctx("/api/search?" + query, "GET", {"Host": "x", "User-Agent": "Mozilla/5.0", "Accept": "*/*"})
    d = await filt().check(c)
    assert type(d) is Deny and d.problem.reason == "waf_blocked"


def test_f09_query_readings():
    from filters.waf.request import normalised_value, query_readings

    assert normalised_value("Bodø".encode()) == "Bodø".encode()
    assert normalised_value(b"a\xc2\xa0b\xc0\xa7") == b"a b'"
    assert query_readings([("a", b"1"), ("b", "Bodø".encode())]) == []
    assert query_readings([("q", b"1'"), ("x", b"y"), ("q", b" OR 1")]) == [("q", b"1', OR 1")]


async def test_f09_benign_norwegian_query_passes():
    from gateway.chain import Deny

    from .test_stage import ctx, filt

    c = ctx(
        "/api/search?by=Bod%C3%B8&navn=%EF%BC%A1rlig%C2%A0%C3%85se&tag=a&tag=b",
        "GET",
        {"Host": "x", "User-Agent": "Mozilla/5.0", "Accept": "*/*"},
    )
    assert type(await filt().check(c)) is not Deny


def test_normalised_value_decodes_overlong_forms_as_the_regex_callback_does():
    """normalised_value's overlong decoding (a split and a table lookup per form) gives what
    ``_OVERLONG3.sub(_overlong, _OVERLONG2.sub(_overlong, v))`` gives, on every form the two
    patterns can match and on random mixes of lead, continuation and other bytes."""
    import random
    import unicodedata

    from filters.waf import request as R

    def reference(v: bytes) -> bytes:
        if v.isascii():
            return v
        v = R._OVERLONG3.sub(R._overlong, R._OVERLONG2.sub(R._overlong, v))
        return unicodedata.normalize("NFKC", v.decode("utf-8", "surrogateescape")).encode(
            "utf-8", "surrogateescape"
        )

    assert len(R._OVERLONG_OF) == 2 * 64 + 32 * 64
    for m in R._OVERLONG_OF:
        for v in (m, b"x" + m + m + b"\xc0" + m, m[:-1], m + m[:1]):
            assert R.normalised_value(v) == reference(v), v
    rnd = random.Random(5)
    pieces = [b"\xc0", b"\xc1", b"\xe0", b"\x80", b"\x9f", b"\xa0", b"\xbf", b"\xc0\xae", b"\xe0\x80\xaf"]
    pieces += [b"a", b"\xef\xbc\x87", b"\xc2\xa0", b"%", b"\xff"]
    for _ in range(30000):
        v = b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 30)))
        assert R.normalised_value(v) == reference(v), v
