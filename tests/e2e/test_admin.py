"""The admin listener from outside: a rejected reload is a 422 problem list (one log line per
problem), the reload token guards POST /-/reload, and no response names Python or aiohttp."""

from __future__ import annotations

import aiohttp

from tests.fixtures.gateway import basic_config

TOKEN = "adm1n-t0ken-f0r-the-tests-0123456789"


async def post_reload(gw, headers: dict | None = None) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.admin_url + "/-/reload", headers=headers or {}) as r:
            return r.status, dict(r.headers), await r.json(content_type=None)


async def test_rejected_reload_is_a_422_problem_list_logged_one_line_per_problem(start_gateway, upstream):
    gw = await start_gateway(basic_config(upstream.url))
    gw.write_config(
        "upstreams: {}\nroutes: [{name: a, upstream: b, bogus: 1}]\nserver: {workers: 0}\n", raw=True
    )
    status, headers, doc = await post_reload(gw)
    assert status == 422
    assert headers["Content-Type"].startswith("application/problem+json")
    assert doc["reason"] == "config_rejected" and doc["status"] == 422 and doc["result"] == "failure"
    assert doc["type"].endswith("/config_rejected") and doc["request_id"]
    # Every layer in one answer: schema (workers, bogus) and cross-checks (tls, upstream).
    assert all(p.startswith(f"{gw.config_path}: ") for p in doc["problems"])
    paths = sorted(p[len(str(gw.config_path)) + 2 :].split(": ")[0] for p in doc["problems"])
    assert paths == ["routes[0].bogus", "routes[0].upstream", "server.tls", "server.workers"], doc["problems"]
    logged = [line for line in gw.output().splitlines() if "config reload problem: " in line]
    assert len(logged) == len(doc["problems"])
    for p in doc["problems"]:
        assert any(line.endswith(p) for line in logged), (p, logged)
    assert "Traceback" not in gw.output()
    async with gw.session() as s:  # the old config still serves
        async with s.get(gw.url + "/x") as r:
            assert r.status == 200


async def test_admin_responses_do_not_name_python_or_aiohttp(start_gateway, upstream):
    gw = await start_gateway(basic_config(upstream.url))
    async with aiohttp.ClientSession() as s:
        for method, path in (
            ("GET", "/healthz"),
            ("GET", "/readyz"),
            ("GET", "/metrics"),
            ("GET", "/nope"),
            ("POST", "/-/reload"),
            ("GET", "/-/reload"),
        ):
            async with s.request(method, gw.admin_url + path) as r:
                assert r.headers.get("Server") == "portvakt", (path, r.headers.get("Server"))


async def test_reload_token_from_env_guards_post_reload(start_gateway, upstream):
    cfg = basic_config(upstream.url, admin={"reload_token": "${PV_TEST_ADMIN_TOKEN}"})
    gw = await start_gateway(cfg, env={"PV_TEST_ADMIN_TOKEN": TOKEN})
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer"},
    ):
        status, h, doc = await post_reload(gw, headers)
        assert status == 401 and doc["reason"] == "admin_token_required", headers
        assert h["WWW-Authenticate"].startswith("Bearer")
    assert await gw.metric("portvakt_config_reloads_total", {"result": "success"}) in (None, 0)
    status, _, doc = await post_reload(gw, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and doc == {"result": "success"}
    assert TOKEN not in gw.output()


async def test_reload_token_file_is_reread_on_reload(start_gateway, upstream, tmp_path):
    tok = tmp_path / "admin-token"
    tok.write_text(TOKEN + "\n")
    cfg = basic_config(upstream.url, admin={"reload_token_file": str(tok)})
    gw = await start_gateway(cfg)
    assert (await post_reload(gw))[0] == 401
    new = "r0tated-" + TOKEN
    tok.write_text(new)
    status, _, _ = await post_reload(gw, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200  # the old token admitted this reload; the new one holds from now on
    assert (await post_reload(gw, {"Authorization": f"Bearer {TOKEN}"}))[0] == 401
    assert (await post_reload(gw, {"Authorization": f"Bearer {new}"}))[0] == 200
    # An unreadable token file rejects the reload and keeps the token in force.
    tok.unlink()
    status, _, doc = await post_reload(gw, {"Authorization": f"Bearer {new}"})
    assert status == 422 and any("admin.reload_token_file" in p for p in doc["problems"])
    assert (await post_reload(gw, {"Authorization": f"Bearer {new}"}))[0] == 422
    assert new not in gw.output() and TOKEN not in gw.output()


async def test_reload_token_under_workers(start_gateway, upstream):
    cfg = basic_config(upstream.url, admin={"reload_token": TOKEN})
    gw = await start_gateway(cfg, workers=2, wait_ready=False)
    await gw.wait_ready(timeout=120)  # supervisor + 2 workers: slow on a loaded machine
    assert (await post_reload(gw))[0] == 401
    status, _, doc = await post_reload(gw, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200, doc
    gw.write_config("routes: [{name: a, upstream: b}]\n", raw=True)
    status, h, doc = await post_reload(gw, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 422 and doc["reason"] == "config_rejected" and h["Server"] == "portvakt"
    assert all(p.startswith("worker ") for p in doc["problems"])


async def _raw_admin(gw, head: str, body: bytes = b"") -> tuple[int, str, bytes]:
    """One request to the admin port with exactly these header lines (no client defaults)."""
    import asyncio
    import re

    port = int(gw.admin_url.rsplit(":", 1)[1])
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(head.encode() + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        await w.drain()
        async with asyncio.timeout(20):
            data = await r.read()
    finally:
        w.close()
    top, _, payload = data.partition(b"\r\n\r\n")
    status = int(re.match(rb"HTTP/1\.[01] (\d{3})", top).group(1))
    return status, top.decode("latin-1"), payload


async def test_reload_refuses_requests_made_by_web_pages(start_gateway, upstream):
    """Red team F08: without a reload token, a cross-origin form POST (what any web page in a
    browser on the host can send without a CORS preflight) reloaded the gateway. Every browser
    shape is 403 admin_cross_origin and reloads nothing; curl's shape still reloads."""
    import json

    gw = await start_gateway(basic_config(upstream.url))
    port = gw.admin_url.rsplit(":", 1)[1]
    host = f"Host: 127.0.0.1:{port}\r\n"
    refused = [
        # the red team's request: a cross-site HTML form
        (
            host + "Content-Type: application/x-www-form-urlencoded\r\nOrigin: https://evil.example\r\n"
            "Sec-Fetch-Site: cross-site\r\n",
            b"x=1",
        ),
        (
            host + "Content-Type: application/x-www-form-urlencoded\r\nOrigin: https://evil.example\r\n",
            b"x=1",
        ),
        (host + "Content-Type: text/plain\r\nOrigin: null\r\n", b"x"),  # sandboxed iframe / data: URL
        (
            host + "Content-Type: multipart/form-data; boundary=b\r\n",
            b"--b--\r\n",
        ),  # older browsers: no Origin
        (host + "Content-Type: application/x-www-form-urlencoded\r\n", b"x=1"),
        (host + "Content-Type: text/plain;charset=UTF-8\r\n", b"x"),
        (host + "Sec-Fetch-Site: same-site\r\nSec-Fetch-Mode: no-cors\r\n", b""),
        (
            host + "Origin: http://evil.example\r\nSec-Fetch-Site: cross-site\r\nSec-Fetch-Mode: no-cors\r\n",
            b"",
        ),
        # a no-cors fetch without a body: browser headers but no JSON
        (
            host
            + f"Origin: http://127.0.0.1:{port}\r\nSec-Fetch-Site: same-origin\r\nSec-Fetch-Mode: no-cors\r\n",
            b"",
        ),
        # DNS rebinding: same origin as far as the browser knows, but the Host is the attacker's name
        (
            f"Host: rebind.evil.example:{port}\r\nOrigin: http://rebind.evil.example:{port}\r\n"
            "Sec-Fetch-Site: same-origin\r\nContent-Type: application/json\r\n",
            b"{}",
        ),
    ]
    for head, body in refused:
        status, top, payload = await _raw_admin(gw, "POST /-/reload HTTP/1.1\r\n" + head, body)
        assert status == 403, (head, status, payload)
        assert "application/problem+json" in top and json.loads(payload)["reason"] == "admin_cross_origin"
    assert await gw.metric("portvakt_config_reloads_total", {"result": "success"}) in (None, 0)
    assert "looks like a web page's request" in gw.output()
    # curl -X POST (README), curl with JSON, and a same-origin JSON fetch to an IP literal reload
    for head, body in (
        (host + "User-Agent: curl/8.5.0\r\nAccept: */*\r\n", b""),
        (host + "Content-Type: application/json\r\n", b"{}"),
        (
            host + f"Origin: http://127.0.0.1:{port}\r\nSec-Fetch-Site: same-origin\r\n"
            "Content-Type: application/json\r\n",
            b"{}",
        ),
    ):
        status, _, payload = await _raw_admin(gw, "POST /-/reload HTTP/1.1\r\n" + head, body)
        assert (status, json.loads(payload)) == (200, {"result": "success"}), (head, payload)
    # GETs (Prometheus, probes) are not affected by browser headers
    status, _, _ = await _raw_admin(
        gw, "GET /healthz HTTP/1.1\r\n" + host + "Origin: https://evil.example\r\n"
    )
    assert status == 200
