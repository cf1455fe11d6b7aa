"""Red team 3, F04: a multipart part naming its file only as RFC 2231 ``filename*`` was taken for a
file and its content never inspected; PHP and other parsers without RFC 2231 read that part as an
ordinary field. Such a part is now inspected as a value (and still listed in FILES)."""

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
