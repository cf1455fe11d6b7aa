"""Red team 3, F04: a multipart part naming its file only as RFC 2231 ``filename*`` was taken for a
file and its content never inspected; PHP and other parsers without RFC 2231 read that part as an
ordinary field. Such a part is now inspected as a value (and still listed in FILES).

F06: a JSON document sent as text/plain, octet-stream or without a type (Go's ``json.Decoder``,
Express with ``type: '*/*'`` and Flask's ``get_json(force=True)`` bind it all the same) was read
only as URL-encoded text: ``\u0027``-style escapes hid SQL injection from the built-in pack. Such a
body is now also read as JSON.

F10: the query's "best fit" reading (overlong UTF-8 decoded, then NFKC: fullwidth ``＜``) and the
joined reading of a repeated name were not made for form bodies: ``q=%EF%BC%9Cscript%EF%BC%9E...``
in a POST passed the built-in pack, in the query it did not."""

import json

import pytest

from filters.waf import bodies

from .test_redteam_bodies import _check

U = "1 UNION SELECT password FROM users--"
MP = "multipart/form-data; boundary=b"


def _part(headers: bytes, value: bytes) -> bytes:
    return b"--b\r\n" + headers + b"\r\n" + value + b"\r\n--b--\r\n"


@pytest.fixture(params=["builtin", "crs"])
def pack(request):
    if request.param == "crs":
        from .conftest import crs_dir

        return {"rules": "crs", "crs_path": crs_dir()}
    return {}


@pytest.mark.parametrize(
    "disposition",
    [
        b"form-data; name=\"q\"; filename*=UTF-8''a.txt",
        b"form-data; name=\"q\"; filename*=utf-8'no'%61.txt",
        b"form-data; name=\"q\"; FILENAME*=UTF-8''a.txt",
    ],
)
async def test_f04_part_with_only_rfc2231_filename_is_inspected(pack, disposition):
    body = _part(b"Content-Disposition: " + disposition + b"\r\n", U.encode())
    assert (await _check(pack, MP, body))[0] == "waf_blocked"


async def test_f04_a_plain_filename_stays_a_file(pack):
    # what browsers send for an upload: the content is the file's, not a value (as CRS reads it)
    for disposition in (
        b'form-data; name="f"; filename="a.txt"',
        b'form-data; name="f"; filename="a.txt"; filename*=UTF-8\'\'a.txt',
    ):
        body = _part(b"Content-Disposition: " + disposition + b"\r\n", U.encode())
        assert (await _check(pack, MP, body))[0] == "allowed", disposition


def test_f04_parser_values():
    res = bodies.multipart(
        _part(b"Content-Disposition: form-data; name=\"q\"; filename*=UTF-8''a.txt\r\n", b"v"), MP
    )
    assert res.error is None and res.args == [("q", b"v")] and res.files == [("q", b"UTF-8''a.txt")]


SQ = "1' OR '1'='1"


@pytest.mark.parametrize("ct", [None, "text/plain", "application/octet-stream", "text/plain; charset=utf-8"])
@pytest.mark.parametrize(
    "body",
    [
        json.dumps({"q": SQ}).encode(),
        b'{"q": "1\\u0027 OR \\u00271\\u0027=\\u00271"}',
        b'{"q": "1 \\u0055NION SELECT password FROM users--"}',
        b'  [{"a": {"q": "1 \\u0055NION SELECT password FROM users--"}}]',
        b'{"q": "1 \\u0055NION SELECT password FROM users--"} trailing bytes Go never reads',
        b'{"q": "1 \\u0055NION SELECT password FROM users--"}\x00',
    ],
)
async def test_f06_json_without_json_type_is_read_as_json(pack, ct, body):
    assert (await _check(pack, ct, body))[0] == "waf_blocked", body


@pytest.mark.parametrize(
    "body",
    [
        b'{"name": "Ola Nordmann", "note": "m\\u00f8te kl. 10 \\u2013 rom 2"}',
        b"[1, 2, 3]",
        b"{not json at all",
        b"{" * 5000,
    ],
)
async def test_f06_benign_or_broken_json_text_passes(body):
    assert (await _check({}, "text/plain", body))[0] == "allowed", body


def test_f06_json_reading():
    assert bodies.json_reading(b' {"a": "\\u0041"} rest') == [("json.a", b"A")]
    assert bodies.json_reading(b"{broken") == []
    assert bodies.json_reading(b"[" * 100 + b"]" * 100, max_depth=64) == []


FORM = "application/x-www-form-urlencoded"


@pytest.mark.parametrize(
    "body",
    [
        b"q=%C0%BCscript%C0%BEalert(1)%C0%BC/script%C0%BE",
        b"q=%EF%BC%9Cscript%EF%BC%9Ealert(1)%EF%BC%9C/script%EF%BC%9E",
        b"q=1%EF%BC%87 OR %EF%BC%871%EF%BC%87=%EF%BC%871",
    ],
)
async def test_f10_form_values_get_the_best_fit_reading(pack, body):
    assert (await _check({}, "application/x-www-form-urlencoded", b"x=1&" + body))[0] == "waf_blocked"
    assert (await _check(pack, FORM, body))[0] == "waf_blocked"


async def test_f10_multipart_values_get_the_best_fit_reading():
    body = _part(b'Content-Disposition: form-data; name="q"\r\n', "＜script＞alert(1)＜/script＞".encode())
    assert (await _check({}, MP, body))[0] == "waf_blocked"


async def test_f10_benign_fullwidth_form_text_passes():
    body = "navn=Ｏｌａ＆Ｋａｒｉ&tekst=møte kl. 10 – rom 2".encode()
    assert (await _check({}, FORM, body))[0] == "allowed"
