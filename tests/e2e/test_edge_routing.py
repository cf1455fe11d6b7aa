"""One canonical request, proven against a real nginx upstream that normalises paths.

The config is the demo's shape: a public catch-all route ``/`` and a protected ``/innsyn/`` route
with an access policy, both to the same nginx, which serves ``protected <$uri>`` under
``/innsyn/``. Every spelling an attacker might try either reaches the route it canonically names,
with that route's policy (401 for an anonymous caller), or is refused with 400; nginx never
answers ``protected`` to an anonymous caller, and what nginx receives is the canonical form.
Requests go over raw TLS sockets so the bytes are exactly the attacker's.
"""

from __future__ import annotations

import asyncio
import glob
import json
import re
from pathlib import Path

import pytest

from tests.e2e.helpers_identity import GRANTING_ORG, bearer, creds, identity_config, innsyn_route

ORG_PATH = f"/innsyn/api/v1/orgs/{GRANTING_ORG}/saker"
TAIL = f"api/v1/orgs/{GRANTING_ORG}/saker"
KEY = "edge-routing-audit-key-0123456789"


def demo_like(upstream_url: str, issuer, tmp_path: Path, **innsyn_match) -> dict:
    protected = innsyn_route()
    protected["match"].update(innsyn_match)
    cfg = identity_config(upstream_url, issuer)
    cfg["routes"] = [protected, {"name": "public", "match": {"path_prefix": "/"}, "upstream": "demo"}]
    cfg["audit"] = {"path": str(tmp_path / "audit" / "audit.jsonl"), "key": KEY}
    return cfg


async def raw_request(
    gw, pki, target: bytes, host: bytes = b"localhost", extra: bytes = b""
) -> tuple[int, bytes, bytes]:
    """One request with ``target`` sent byte for byte; (status, head, body)."""
    r, w = await asyncio.open_connection(
        "127.0.0.1", gw.port, ssl=pki.client_ssl(), server_hostname="localhost"
    )
    try:
        w.write(
            b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + extra + b"Connection: close\r\n\r\n"
        )
        await w.drain()
        data = b""
        async with asyncio.timeout(20):
            while chunk := await r.read(65536):
                data += chunk
    finally:
        w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    m = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return (int(m.group(1)) if m else 0), head, body


# (target as sent, what it canonically names: "innsyn" -> the protected route's policy (401),
# a path -> the public route (nginx's $uri), 400 -> refused).
VARIANTS: list[tuple[bytes, str | int]] = [
    (ORG_PATH.encode(), "innsyn"),
    (b"/./innsyn/" + TAIL.encode(), "innsyn"),
    (b"/%2e/innsyn/" + TAIL.encode(), "innsyn"),
    (b"/%2E/innsyn/" + TAIL.encode(), "innsyn"),
    (b"//innsyn/" + TAIL.encode(), "innsyn"),
    (b"///innsyn//" + TAIL.encode(), "innsyn"),
    (b"/public/../innsyn/" + TAIL.encode(), "innsyn"),
    (b"/public/%2e%2e/innsyn/" + TAIL.encode(), "innsyn"),
    (b"/public/%2E%2e/innsyn/" + TAIL.encode(), "innsyn"),
    (b"/public/.%2E/innsyn/" + TAIL.encode(), "innsyn"),
    (b"/public/%2e./innsyn/" + TAIL.encode(), "innsyn"),
    (b"/a/b/../../innsyn/" + TAIL.encode(), "innsyn"),
    (b"/../innsyn/" + TAIL.encode(), "innsyn"),
    (b"/%69nnsyn/" + TAIL.encode(), "innsyn"),
    (b"/%69%6E%6e%73%79%6e/" + TAIL.encode(), "innsyn"),
    (b"/innsyn/./" + TAIL.encode(), "innsyn"),
    (b"/innsyn/x/../" + TAIL.encode(), "innsyn"),
    (b"/innsyn/", "innsyn"),
    (b"/innsyn/.", "innsyn"),
    (b"/innsyn%2f" + TAIL.encode(), 400),
    (b"/innsyn%2F" + TAIL.encode(), 400),
    (b"/public%2F..%2Finnsyn/" + TAIL.encode(), 400),
    (b"/public%2f..%2finnsyn/" + TAIL.encode(), 400),
    (b"/public/..%2finnsyn/" + TAIL.encode(), 400),
    (b"/public/%2e%2e%2finnsyn/" + TAIL.encode(), 400),
    (b"/public%5C..%5Cinnsyn/" + TAIL.encode(), 400),
    (b"/public%5c..%5cinnsyn/" + TAIL.encode(), 400),
    (b"/public\\..\\innsyn/" + TAIL.encode(), 400),
    (b"/innsyn\\" + TAIL.encode(), 400),
    (b"/innsyn;/" + TAIL.encode(), 400),
    (b"/innsyn;x=1/" + TAIL.encode(), 400),
    (b"/public/..;/innsyn/" + TAIL.encode(), 400),
    (b"/%c0%ae%c0%ae/innsyn/" + TAIL.encode(), 400),
    (b"/public/%c0%ae%c0%ae/innsyn/" + TAIL.encode(), 400),
    (b"/public/%C0%AE%C0%AE%C0%AFinnsyn/" + TAIL.encode(), 400),
    (b"/public/%e0%80%ae%e0%80%ae/innsyn/" + TAIL.encode(), 400),
    (b"/public/%252e%252e/innsyn/" + TAIL.encode(), 400),
    (b"/%252e/innsyn/" + TAIL.encode(), 400),
    (b"/public/%25%32%65%25%32%65/innsyn/" + TAIL.encode(), 400),
    (b"/public/%%32%65%%32%65/innsyn/" + TAIL.encode(), 400),
    (b"/public/%u002e%u002e/innsyn/" + TAIL.encode(), 400),
    (b"/innsyn%00/" + TAIL.encode(), 400),
    (b"/public/%00/../innsyn/" + TAIL.encode(), 400),
    (b"/%ef%bc%8e%ef%bc%8e/innsyn/" + TAIL.encode(), 400),
    (b"/public/%ef%bc%8finnsyn/" + TAIL.encode(), 400),
    (b"/innsyn/" + TAIL.encode() + b"#frag", 400),
    (b"/innsyn/..", "/"),
    (b"/innsyn/%2e%2e/x", "/x"),
    (b"/innsyn", "/innsyn"),  # no trailing slash: neither the route prefix nor nginx's location
    (b"/public/%c3%b8l", "/public/øl"),
    (b"/innsyn%3B/" + TAIL.encode(), 400),
    # red team F05: case variants and trailing dots/spaces fell through to the public catch-all,
    # which a case-insensitive IIS/ASP.NET upstream serves as /innsyn/... (http.case_sensitive_upstream)
    (b"/INNSYN/x", 400),
    (b"/INNSYN/" + TAIL.encode(), 400),
    (b"/Innsyn/" + TAIL.encode(), 400),
    (b"/%49nnsyn/" + TAIL.encode(), 400),  # %49 is 'I'
    (b"/innsyN/", 400),
    (b"/innsyN", "/innsyN"),  # like "/innsyn": not under the prefix "/innsyn/" in any case
    (b"/innsyn./" + TAIL.encode(), 400),
    (b"/innsyn%2e/" + TAIL.encode(), 400),
    (b"/innsyn%20/" + TAIL.encode(), 400),
    (b"/innsyn.%20./" + TAIL.encode(), 400),
    (b"/public/x./../../innsyn/" + TAIL.encode(), 400),
    (b"/innsynx/Y", "/innsynx/Y"),  # upper case elsewhere is fine
    (b"/public/ABC", "/public/ABC"),
    # red team F10: encoded ';', '?', '#' are refused like the raw ones
    (b"/public/..%3B/innsyn/" + TAIL.encode(), 400),
    (b"/public/..%3b/innsyn/" + TAIL.encode(), 400),
    (b"/innsyn%3F/" + TAIL.encode(), 400),
    (b"/innsyn%23/" + TAIL.encode(), 400),
    (b"/public/a%3Fb", 400),
    (b"/innsyn\xc3\xa9/x", 400),  # raw non-ASCII
    (b"/innsyn/\x01/../x", 400),
]


@pytest.mark.parametrize("parser", ["c", "python"])
async def test_every_spelling_reaches_the_route_it_names_or_is_refused(
    start_gateway, nginx, issuer, pki, tmp_path, parser
):
    # Both of aiohttp's HTTP parsers: the pure-Python one (AIOHTTP_NO_EXTENSIONS=1) lets more through.
    env = {"AIOHTTP_NO_EXTENSIONS": "1"} if parser == "python" else None
    gw = await start_gateway(demo_like(nginx.url, issuer, tmp_path), env=env)
    failures = []
    for target, want in VARIANTS:
        served_before = len(nginx.access_lines())
        status, head, body = await raw_request(gw, pki, target)
        served = nginx.access_lines()[served_before:]
        if b"protected" in body:
            failures.append(f"{target!r}: nginx served the protected handler anonymously: {body!r}")
        if want == "innsyn":
            doc = json.loads(body) if status == 401 else {}
            if status != 401 or doc.get("reason") != "authentication_required":
                failures.append(f"{target!r}: {status} {body[:100]!r}, expected the innsyn policy (401)")
        elif want == 400:
            doc = json.loads(body) if b"problem+json" in head else {}
            if status != 400 or doc.get("reason") != "path_not_canonical":
                failures.append(f"{target!r}: {status} {body[:100]!r}, expected 400 path_not_canonical")
        elif status != 200 or body.decode() != f"public {want}\n":
            failures.append(f"{target!r}: {status} {body[:100]!r}, expected public {want}")
        if want in ("innsyn", 400) and served:
            failures.append(f"{target!r}: reached nginx: {served}")
    assert not failures, "\n".join(failures)
    # Every one of them in the access log, with the route it canonically named.
    await asyncio.sleep(0.3)
    lines = gw.access_log()
    assert len(lines) >= len(VARIANTS)
    assert sum(1 for e in lines if e["route"] == "innsyn" and e["status"] == 401) == sum(
        1 for _, w in VARIANTS if w == "innsyn"
    )
    assert sum(1 for e in lines if e["reason"] == "path_not_canonical" or e["status"] == 400) >= sum(
        1 for _, w in VARIANTS if w == 400
    )


async def test_an_authorised_call_in_any_spelling_reaches_nginx_in_canonical_form(
    start_gateway, nginx, issuer, pki, tmp_path
):
    gw = await start_gateway(demo_like(nginx.url, issuer, tmp_path))
    auth = "".join(
        f"{k}: {v}\r\n" for k, v in {**bearer(issuer.mint(scope="ks:fiks")), **creds()}.items()
    ).encode()
    for target in (
        ORG_PATH.encode(),
        b"/./innsyn/" + TAIL.encode(),
        b"//innsyn/%61pi/v1/orgs/" + GRANTING_ORG.encode() + b"/x/../saker",
        b"/public/%2E%2E/innsyn/" + TAIL.encode(),
    ):
        before = len(nginx.access_lines())
        status, _, body = await raw_request(gw, pki, target, extra=auth)
        assert (status, body.decode()) == (200, f"protected {ORG_PATH}\n"), target
        # nginx got the canonical request target itself ($request_uri), not the spelling sent
        assert nginx.access_lines()[before:] == [f"{ORG_PATH} {ORG_PATH}"]
    # the path template read the canonical path: the target organisation is in the audit record
    assert await gw.stop_async() == 0
    records = []
    for f in glob.glob(str(tmp_path / "audit" / "audit.jsonl*")):
        records += [json.loads(x) for x in Path(f).read_text().splitlines() if x.endswith("}")]
    reqs = [r for r in records if r.get("type") == "request" and r.get("route") == "innsyn"]
    assert len(reqs) == 4
    assert {r["path"] for r in reqs} == {ORG_PATH} and {r["target_org"] for r in reqs} == {GRANTING_ORG}


async def test_unescaped_slashes_when_the_operator_chooses(start_gateway, nginx, issuer, pki, tmp_path):
    cfg = demo_like(nginx.url, issuer, tmp_path)
    cfg["http"] = {"path_with_escaped_slashes_action": "unescape_and_forward"}
    gw = await start_gateway(cfg)
    for target in (
        b"/public%2F..%2Finnsyn/" + TAIL.encode(),
        b"/public\\..\\innsyn/" + TAIL.encode(),
        b"/innsyn%2f" + TAIL.encode(),
    ):
        status, _, body = await raw_request(gw, pki, target)
        assert status == 401 and json.loads(body)["reason"] == "authentication_required", (target, body)
    status, _, body = await raw_request(gw, pki, b"/a%2Fb")
    assert (status, body) == (200, b"public /a/b\n")

    cfg["http"] = {"path_with_escaped_slashes_action": "unescape_and_redirect"}
    gw.write_config(cfg)
    assert await gw.reload() == "success"
    status, head, _ = await raw_request(gw, pki, b"/public%2F..%2Finnsyn/" + TAIL.encode() + b"?q=%2F")
    assert status == 308
    assert re.search(rb"(?i)\r\nlocation: " + re.escape(ORG_PATH.encode() + b"?q=%2F") + rb"\r\n", head)


async def test_case_sensitive_upstream_opt_out_and_kept_spellings(
    start_gateway, nginx, issuer, pki, tmp_path
):
    """With http.case_sensitive_upstream (nginx is case-sensitive) a case variant is byte-exact
    routed (the public route; nginx serves its public location); trailing dots and encoded
    delimiters can be kept too. The protected handler is never reached anonymously."""
    cfg = demo_like(nginx.url, issuer, tmp_path)
    cfg["http"] = {
        "case_sensitive_upstream": True,
        "trailing_dot_or_space": "keep",
        "encoded_delimiters": "keep",
    }
    gw = await start_gateway(cfg)
    for target, want in (
        (b"/INNSYN/x", b"public /INNSYN/x\n"),
        (b"/innsyn./x", b"public /innsyn./x\n"),
        (b"/innsyn%20/x", b"public /innsyn /x\n"),
        (b"/public/a%3Fb", b"public /public/a?b\n"),
    ):
        status, _, body = await raw_request(gw, pki, target)
        assert (status, body) == (200, want), target
    status, _, body = await raw_request(gw, pki, b"/public/..%3B/innsyn/x")  # path_parameters still rejects
    assert status == 400 and json.loads(body)["reason"] == "path_not_canonical"
    # and back to the default on reload
    cfg["http"] = {}
    gw.write_config(cfg)
    assert await gw.reload() == "success"
    for target in (b"/INNSYN/x", b"/innsyn./x", b"/innsyn%20/x", b"/public/a%3Fb"):
        status, _, body = await raw_request(gw, pki, target)
        assert status == 400 and json.loads(body)["reason"] == "path_not_canonical", (target, status, body)
    await asyncio.sleep(0.3)
    reasons = [e.get("internal_reason") or e.get("reason") for e in gw.access_log()[-4:]]
    assert all(r for r in reasons)


async def test_host_compared_canonically(start_gateway, nginx, issuer, pki, tmp_path):
    """A protected route bound to api.example in front of a catch-all: every spelling of that
    host gets the protected route's policy (a trailing dot used to fall through to the public
    route, and nginx served the protected handler)."""
    gw = await start_gateway(demo_like(nginx.url, issuer, tmp_path, hosts=["api.example"]))
    target = ORG_PATH.encode()
    for host in (
        b"api.example",
        b"api.example.",
        b"API.Example",
        b"API.EXAMPLE.",
        b"api.example:443",
        b"api.example.:443",
        b"api.example:8443",
    ):
        status, _, body = await raw_request(gw, pki, target, host=host)
        assert status == 401 and b"protected" not in body, (host, status, body)
    for host in (
        b"api.example..",
        b"api..example",
        b"api.example:0",
        b"api.example:99999",
        b"user@api.example",
        b"api.example:443:443",
        b"[::1",
    ):
        status, _, body = await raw_request(gw, pki, target, host=host)
        assert status == 400 and json.loads(body)["reason"] == "host_not_canonical", (host, status, body)
    status, _, body = await raw_request(gw, pki, target, host=b"other.example")
    assert status == 200 and body.startswith(b"protected")  # by this config: another host is public


async def test_uri_limit_counts_the_target_as_sent_not_its_shorter_canonical_form(start_gateway, nginx, pki):
    from tests.fixtures.gateway import basic_config

    gw = await start_gateway(basic_config(nginx.url, ingress={"max_uri_bytes": 8192}))
    before = len(nginx.access_lines())
    status, _, body = await raw_request(gw, pki, b"/" + b"./" * 4100)  # canonical: "/"
    assert status == 414 and json.loads(body)["reason"] == "uri_too_long"
    assert len(nginx.access_lines()) == before


async def test_absolute_form_targets_are_canonicalised_too(start_gateway, nginx, issuer, pki, tmp_path):
    gw = await start_gateway(demo_like(nginx.url, issuer, tmp_path))
    for target in (
        b"https://localhost/./innsyn/" + TAIL.encode(),
        b"https://LOCALHOST.:443//innsyn/" + TAIL.encode(),
        b"https://localhost/public/%2e%2e/innsyn/" + TAIL.encode(),
    ):
        status, _, body = await raw_request(gw, pki, target)
        assert status == 401 and b"protected" not in body, (target, status, body)
    for target in (
        b"https://localhost/public%2F..%2Finnsyn/" + TAIL.encode(),
        b"https://other.example/innsyn/x",
    ):
        status, _, body = await raw_request(gw, pki, target)
        assert status == 400 and b"protected" not in body, (target, status, body)
