"""The audit trail end to end: one request event per request whatever the outcome, privilege
changes on reload, a verifiable chain, strict durability under kill -9, and no clear-text
fødselsnummer in logs, metrics or audit files."""

from __future__ import annotations

import asyncio
import glob
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
from argon2 import PasswordHasher
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from gateway.audit import build_audit
from gateway.audit.cli import reveal, verify
from gateway.chain import BuildEnv
from gateway.config import load_config
from tests.fixtures.gateway import basic_config
from tests.fixtures.issuer import TEST_PID
from tests.fixtures.upstream import free_port

ORG = "991825827"
TARGET = "958935420"
OTHER = "974760673"
KEY = "e2e-audit-key-0123456789abcdef"
INTEGRATION_ID = "7b1c9a52-0d3e-4a8f-9c61-2f5e8d4b1a07"
# The WAF case runs the OWASP CRS from ../shared (read-only project material) when it is there.
CRS_RULES = Path(__file__).resolve().parents[3] / "shared" / "waf" / "crs" / "rules"
WAF_AVAILABLE = hasattr(importlib.import_module("filters.waf"), "build_stage") and CRS_RULES.is_dir()


def config(upstream_url: str, issuer, tmp_path: Path, **audit) -> dict:
    cfg = basic_config(upstream_url, issuers=issuer.issuers_config())
    cfg["upstreams"]["dead"] = {
        "url": f"http://127.0.0.1:{free_port()}",
        "connect_timeout_seconds": 1,
        "timeout_seconds": 2,
    }
    protected = {"any_of": [{"organizations": [ORG], "scopes": ["ks:fiks"]}, {"person": True}]}
    cfg["routes"] = [
        {
            "name": "cases",
            "upstream": "demo",
            "service": "saksbehandling",
            "legal_basis": "forvaltningsloven § 13b",
            "match": {"path_prefix": "/orgs/"},
            "organization_from": "path:/orgs/{organization}/",
            "access": protected,
        },
        {
            "name": "limited",
            "upstream": "demo",
            "match": {"path_prefix": "/limited/"},
            "rate_limits": [{"per": "client_ip", "limit": 1, "period_seconds": 60, "stage": "pre_auth"}],
        },
        {"name": "dead", "upstream": "dead", "match": {"path_prefix": "/dead/"}},
        {"name": "open", "upstream": "demo", "match": {"path_prefix": "/"}},
    ]
    cfg["audit"] = {"path": str(tmp_path / "audit" / "audit.jsonl"), "key": KEY, **audit}
    return cfg


def records(tmp_path: Path) -> list[dict]:
    out = []
    for f in trail(tmp_path):
        out += [json.loads(x) for x in Path(f).read_text().splitlines() if x.endswith("}")]
    return out


def trail(tmp_path: Path) -> list[str]:
    p = str(tmp_path / "audit" / "audit.jsonl")
    return sorted(glob.glob(p + ".2*")) + [p]


async def get(gw, path: str, token: str | None = None, **headers) -> tuple[int, str, dict]:
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with gw.session() as s:
        async with s.get(gw.url + path, headers=headers) as r:
            body = await r.read()
            doc = (
                json.loads(body)
                if r.headers.get("Content-Type", "").startswith("application/problem")
                else {}
            )
            return r.status, r.headers["X-Request-Id"], doc


async def test_mixed_outcomes_give_exactly_one_request_event_each(start_gateway, upstream, issuer, tmp_path):
    cfg = config(upstream.url, issuer, tmp_path)
    if WAF_AVAILABLE:
        cfg["waf"] = {"rules": "crs", "crs_path": str(CRS_RULES)}
    else:
        print(f"WAF case left out: no CRS rules at {CRS_RULES}")
    gw = await start_gateway(cfg)
    good = issuer.mint(org=ORG, scope="ks:fiks")
    other = issuer.mint(org=OTHER, scope="ks:fiks")
    cases = [
        (f"/orgs/{TARGET}/a", good, 200, None),  # allowed
        (f"/orgs/{TARGET}/a", None, 401, "authentication_required"),  # no credential
        (f"/orgs/{TARGET}/a", other, 403, "organization_not_admitted"),  # client sees access_denied
        ("/limited/x", None, 200, None),
        ("/limited/x", None, 429, "rate_limited"),
        ("/dead/x", None, 502, "upstream_unavailable"),
    ]
    if WAF_AVAILABLE:
        cases.append(("/open/?id=1%27%20OR%201%3D1--", None, 403, "waf_blocked"))
    sent: dict[str, tuple[int, str | None, dict]] = {}
    for path, token, want_status, want_reason in cases:
        status, rid, doc = await get(gw, path, token)
        assert status == want_status, (path, status, doc)
        sent[rid] = (status, want_reason, doc)
    assert await gw.stop_async() == 0
    reqs = [r for r in records(tmp_path) if r["type"] == "request"]
    assert len(reqs) == len(cases)
    by_id = {r["request_id"]: r for r in reqs}
    assert set(by_id) == set(sent)
    got = [(by_id[rid]["status"], by_id[rid].get("reason")) for rid in sent]
    assert got == [(status, reason) for status, reason, _ in sent.values()]
    for rid, (status, _, _) in sent.items():
        assert by_id[rid]["decision"] == ("allow" if status == 200 else "error" if status == 502 else "deny")
    allowed = next(r for r in reqs if r["route"] == "cases" and r["status"] == 200)
    assert allowed["caller"]["consumer_org"] == ORG and allowed["target_org"] == TARGET
    assert allowed["legal_basis"] == "forvaltningsloven § 13b" and allowed["upstream"] == "demo"
    assert next(r for r in reqs if r["status"] == 502)["reason"] == "upstream_unavailable"
    assert next(r for r in reqs if r["status"] == 429)["route"] == "limited"
    if WAF_AVAILABLE:
        waf = next(r for r in reqs if r["route"] == "open")
        assert waf["waf"]["rules"]
    s = verify(trail(tmp_path), KEY.encode())
    assert s["head"].endswith("verified")
    # the real command line: passes untouched, names the record after a deleted line
    assert cli_verify(tmp_path).returncode == 0
    f = trail(tmp_path)[-1]
    kept = Path(f).read_text().splitlines(keepends=True)
    Path(f).write_text("".join(kept[:5] + kept[6:]))
    r = cli_verify(tmp_path)
    assert r.returncode == 1 and r.stdout.startswith(f"FAIL {f}:6: "), r.stdout + r.stderr


def cli_verify(tmp_path: Path) -> subprocess.CompletedProcess:
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PORTVAKT_AUDIT_KEY": KEY, "PYTHONPATH": root}
    return subprocess.run(
        [sys.executable, "-m", "gateway", "audit", "verify", *trail(tmp_path)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_reload_withdrawing_a_grant_is_audited(start_gateway, upstream, issuer, tmp_path):
    ph = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    integ = {
        "id": INTEGRATION_ID,
        "password_hash": ph.hash("passord"),
        "authorized_org": ORG,
        "grants": [{"organization": TARGET, "services": ["saksbehandling", "arkiv"]}],
    }
    cfg = config(upstream.url, issuer, tmp_path)
    cfg["integrations"] = [integ]
    cfg["integrations_policy"] = {"password_hash_floor": "none"}  # the cheap test hash is below the floor
    gw = await start_gateway(cfg)
    cfg["integrations"] = [{**integ, "grants": [{"organization": TARGET, "services": ["arkiv"]}]}]
    gw.write_config(cfg)
    assert await gw.reload() == "success"
    status, _, _ = await get(gw, "/open/after")
    assert status == 200
    assert await gw.stop_async() == 0
    recs = records(tmp_path)
    [withdrawn] = [r for r in recs if r["type"] == "grant_withdrawn"]
    assert withdrawn["integration_id"] == INTEGRATION_ID.lower()
    assert withdrawn["organization"] == TARGET and withdrawn["service"] == "saksbehandling"
    assert not [r for r in recs if r["type"] == "grant_added"]
    assert [r["type"] for r in recs].count("audit_started") == 1  # the writer survived the reload
    assert "argon2" not in "".join(Path(f).read_text() for f in trail(tmp_path))
    verify(trail(tmp_path), KEY.encode())


async def test_strict_kill9_under_load_loses_no_forwarded_request(start_gateway, upstream, issuer, tmp_path):
    gw = await start_gateway(config(upstream.url, issuer, tmp_path, durability="strict"))
    stop = asyncio.Event()

    async def client() -> None:
        async with gw.session() as s:
            while not stop.is_set():
                try:
                    async with s.get(gw.url + "/open/load") as r:
                        await r.read()
                except (TimeoutError, aiohttp.ClientError, OSError):
                    return

    tasks = [asyncio.create_task(client()) for _ in range(6)]
    for _ in range(200):
        if len(upstream.requests) >= 40:
            break
        await asyncio.sleep(0.02)
    gw.kill()  # SIGKILL while requests are in flight
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    received = {r["headers"]["X-Request-Id"] for r in upstream.requests}
    assert len(received) >= 20
    on_disk = {r["request_id"] for r in records(tmp_path) if r["type"] == "request"}
    assert received <= on_disk, f"{len(received - on_disk)} forwarded requests have no audit record"
    # a restarted writer continues the chain (cutting a torn tail if the kill left one) and the
    # whole trail verifies (the gateway itself would do this at start; a second gateway process
    # costs seconds of imports, so the sink is started in-process on the same file)
    restarted = build_audit(BuildEnv(config=load_config(gw.config_path), base_dir=".", secrets={}))
    await restarted.start()
    await restarted.close()
    verify(trail(tmp_path), KEY.encode())


async def test_no_clear_text_person_number_anywhere(start_gateway, upstream, issuer, tmp_path):
    auditor = x25519.X25519PrivateKey.generate()
    pub = tmp_path / "auditor.pub"
    pub.write_bytes(
        auditor.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    cfg = config(upstream.url, issuer, tmp_path, auditor_public_key=str(pub))
    cfg["routes"][-1]["audit"] = {"query_string": True}
    gw = await start_gateway(cfg)
    person = issuer.idporten.mint()
    ids = []
    for path, token in [
        (f"/orgs/{TARGET}/persons/{TEST_PID}", person),  # allowed person
        (f"/open/persons/{TEST_PID}?fnr={TEST_PID}", person),
        (f"/orgs/{TARGET}/persons/{TEST_PID}", issuer.idporten.mint(ttl=-600)),  # expired: denied
        (f"/nothing?pid={TEST_PID}", None),
    ]:
        ids.append((await get(gw, path, token))[1])
    metrics = await gw.metrics_text()
    assert await gw.stop_async() == 0
    assert TEST_PID not in gw.output()
    assert TEST_PID not in metrics
    files = trail(tmp_path) + glob.glob(str(tmp_path / "audit" / "*"))
    for f in files:
        assert TEST_PID not in Path(f).read_text(errors="replace"), f
    assert 'portvakt_audit_records_total{result="written",sink="file"}' in metrics
    revealed = list(reveal(trail(tmp_path), auditor, {ids[0]}))
    assert {r["pid"] for r in revealed} == {TEST_PID}
    assert os.path.exists(str(tmp_path / "audit" / "audit.jsonl.head"))


async def test_full_disk_in_strict_mode_denies_503_and_recovers(start_gateway, upstream, issuer, tmp_path):
    """A real write failure: RLIMIT_FSIZE on the running gateway makes the audit file's next
    write fail with EFBIG, as a full disk would (Python ignores SIGXFSZ)."""
    import resource

    cfg = config(upstream.url, issuer, tmp_path, durability="strict")
    # A trail bigger than anything else the gateway writes (its log), so only the audit file hits
    # the limit.
    from tests.gateway.helpers_audit import make_config as unit_config
    from tests.gateway.helpers_audit import make_ctx

    pre = build_audit(BuildEnv(config=unit_config(audit=cfg["audit"]), base_dir=".", secrets={}))
    await pre.start()
    for i in range(1500):
        ctx = make_ctx(pre.config, request_id=f"pre-{i}")
        ctx.status, ctx.decision = 200, "allow"
        pre.record(ctx)
    await pre.close()
    gw = await start_gateway(cfg)
    assert (await get(gw, "/open/before"))[0] == 200
    size = os.path.getsize(trail(tmp_path)[-1])
    resource.prlimit(gw.pid, resource.RLIMIT_FSIZE, (size + 64, resource.RLIM_INFINITY))
    upstream.clear()
    status, _, doc = await get(gw, "/open/refused")
    assert status == 503 and doc["reason"] == "audit_unavailable"
    assert upstream.requests == []  # nothing forwarded unaudited
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.admin_url + "/readyz") as r:
            assert r.status == 503
            assert "down" in json.dumps(await r.json(content_type=None))
    assert await gw.metric("portvakt_audit_write_errors_total", {"sink": "file"}) >= 1
    assert await gw.metric("portvakt_audit_records_total", {"sink": "file", "result": "failed"}) >= 1
    resource.prlimit(gw.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    for _ in range(100):  # the writer retries; readiness comes back
        async with aiohttp.ClientSession() as s:
            async with s.get(gw.admin_url + "/readyz") as r:
                if r.status == 200:
                    break
        await asyncio.sleep(0.1)
    assert (await get(gw, "/open/after"))[0] == 200
    assert await gw.stop_async() == 0
    reqs = {r["request_id"]: r for r in records(tmp_path) if r["type"] == "request"}
    refused = [r for r in reqs.values() if r.get("path") == "/open/refused"]
    assert [(r["status"], r["reason"]) for r in refused] == [(503, "audit_write_failed")]
    verify(trail(tmp_path), KEY.encode())
