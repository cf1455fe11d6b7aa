"""Red team 3, F04: a multipart part naming its file only as RFC 2231 ``filename*`` was taken for a
file and its content never inspected; PHP and other parsers without RFC 2231 read that part as an
ordinary field. Such a part is now inspected as a value (and still listed in FILES).

F06: a JSON document sent as text/plain, octet-stream or without a type (Go's ``json.Decoder``,
Express with ``type: '*/*'`` and Flask's ``get_json(force=True)`` bind it all the same) was read
only as URL-encoded text: ``\u0027``-style escapes hid SQL injection from the built-in pack. Such a
body is now also read as JSON."""

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
