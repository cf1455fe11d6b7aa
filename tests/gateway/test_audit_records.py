"""gateway/audit/trail.py + records.py + keys.py: one record per request (batch and strict), persons pseudonymised and sealed, scrubbing."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.audit import build_audit, scrub_query, unseal
from gateway.audit.cli import reveal, verify
from gateway.chain import BuildEnv
from gateway.context import Detection
from tests.gateway.helpers_audit import (
    KEY,
    PID,
    audit_cfg,
    auditor_keys,
    idporten,
    integration,
    lines,
    make_config,
    make_ctx,
    maskinporten,
    outcome,
    requests_of,
    started,
    trail,
    waf,
)


def mixed_contexts(cfg):
    """One request per outcome the issue names, each as the server would leave the context."""
    yield outcome(
        make_ctx(
            cfg, request_id="ok", token=maskinporten(), integration=integration(), target_org="958935420"
        ),
        200,
        "allow",
    )
    yield outcome(
        make_ctx(cfg, request_id="r401", integration_id_claimed="3f1c8f6e-x"), 401, "deny", "token_missing"
    )
    yield outcome(make_ctx(cfg, request_id="r403", token=maskinporten()), 403, "deny", "grant_missing")
    yield outcome(make_ctx(cfg, request_id="r429", token=maskinporten()), 429, "deny", "rate_limited")
    yield outcome(make_ctx(cfg, request_id="rwaf", waf=waf(942100, 941100)), 403, "deny", "waf_blocked")
    c = outcome(make_ctx(cfg, request_id="r502", token=maskinporten()), 502, "error", "upstream_unavailable")
    c.upstream_duration = 0.002
    yield c


async def test_batch_one_request_event_per_request_with_reasons(tmp_path):
    cfg = make_config(audit=audit_cfg(tmp_path))
    sink = await started(cfg)
    ctxs = list(mixed_contexts(cfg))
    for ctx in ctxs:
        assert await sink.before_forward(ctx) is None  # batch: never waits
        sink.record(ctx)
    await sink.close()
    reqs = requests_of(lines(tmp_path / "audit.jsonl"))
    assert [(r["request_id"], r["status"], r.get("reason")) for r in reqs] == [
        (c.request_id, c.status, c.reason) for c in ctxs
    ]
    ok = reqs[0]
    assert ok["caller"] == {
        "integration_id": integration().id,
        "authorized_org": "991825827",
        "token_kind": "maskinporten",
        "consumer_org": "991825827",
        "client_amr": "virksomhetssertifikat",
        "scope": "ks:fiks",
    }
    assert ok["target_org"] == "958935420" and ok["legal_basis"] == "forvaltningsloven § 13b"
    assert ok["route"] == "cases" and ok["service"] == "saksbehandling" and ok["upstream"] == "case"
    assert reqs[1]["caller"] == {"integration_id_claimed": "3f1c8f6e-x"}
    assert reqs[4]["waf"] == {"rules": [942100, 941100], "score": 5}
    assert reqs[5]["upstream_ms"] == 2.0 and reqs[5]["decision"] == "error"
    assert verify(trail(tmp_path), KEY)["head"].endswith("verified")


async def test_strict_writes_granted_record_before_forward_then_completion(tmp_path):
    cfg = make_config(audit=audit_cfg(tmp_path, durability="strict"))
    sink = await started(cfg)
    ctx = make_ctx(cfg, request_id="s1", token=maskinporten(), target_org="958935420")
    assert await sink.before_forward(ctx) is None
    # durably on disk before the server forwards
    granted = [r for r in lines(tmp_path / "audit.jsonl") if r.get("request_id") == "s1"]
    assert granted == [granted[0]] and granted[0]["phase"] == "granted" and "status" not in granted[0]
    sink.record(outcome(ctx, 200, "allow"))
    denied = outcome(make_ctx(cfg, request_id="s2"), 401, "deny", "token_missing")
    sink.record(denied)
    await sink.close()
    recs = lines(tmp_path / "audit.jsonl")
    assert [r["request_id"] for r in requests_of(recs)] == ["s1", "s2"]
    done = [r for r in recs if r["type"] == "request_completed"]
    assert [(r["request_id"], r["status"]) for r in done] == [("s1", 200)]
    verify(trail(tmp_path), KEY)


@pytest.mark.parametrize("kind", ["x25519", "rsa"])
async def test_person_is_pseudonymised_sealed_and_revealed(tmp_path, kind):
    priv, pub = auditor_keys(tmp_path, kind)
    cfg = make_config(audit=audit_cfg(tmp_path, auditor_public_key=pub))
    sink = await started(cfg)
    for i in range(3):
        ctx = make_ctx(
            cfg,
            request_id=f"p{i}",
            path=f"/cases/persons/{PID}/journal",
            query=f"fnr={PID}&access_token=secret-value&page=2",
            token=idporten(),
            target_pid=PID,
        )
        ctx.audit["tokens"] = {"note": f"checked {PID}"}
        sink.record(outcome(ctx, 200, "allow"))
    await sink.close()
    files = trail(tmp_path)
    text = Path(files[-1]).read_text()
    assert PID not in text and "secret-value" not in text
    r = requests_of(lines(tmp_path / "audit.jsonl"))[0]
    person = r["caller"]["person"]
    assert r["target_person"]["pseudonym"] == person["pseudonym"] and len(person["pseudonym"]) == 32
    assert r["path"] == f"/cases/persons/~p:{person['pseudonym'][:16]}/journal"
    assert "access_token=REDACTED" in r["query"] and "page=2" in r["query"]
    assert r["caller"]["acr"] == "idporten-loa-high"
    out = list(reveal(files, priv, {"p1"}))
    assert [(o["request_id"], o["field"], o["pid"]) for o in out] == [
        ("p1", "caller.person", PID),
        ("p1", "target_person", PID),
    ]
    # another key does not open it; a sealed value moved beside another pseudonym does not either
    other = auditor_keys(tmp_path, kind)[0]
    assert all("error" in o for o in reveal(files, other, {"p0"}))
    with pytest.raises(ValueError):
        unseal(priv, person["sealed"], "0" * 32)


async def test_without_auditor_key_only_pseudonym(tmp_path):
    cfg = make_config(audit=audit_cfg(tmp_path))
    sink = await started(cfg)
    sink.record(outcome(make_ctx(cfg, token=idporten()), 200, "allow"))
    await sink.close()
    r = requests_of(lines(tmp_path / "audit.jsonl"))[0]
    assert set(r["caller"]["person"]) == {"pseudonym"}
    assert PID not in (tmp_path / "audit.jsonl").read_text()


def test_scrub_query_redacts_secrets():
    q = scrub_query("code=abc&state=xyz&client_secret=s&IntegrasjonPassord=p&q=ok", b"k")
    assert q == "code=REDACTED&state=REDACTED&client_secret=REDACTED&IntegrasjonPassord=REDACTED&q=ok"


async def test_query_string_dropped_unless_route_keeps_it(tmp_path):
    cfg = make_config(audit=audit_cfg(tmp_path))
    sink = await started(cfg)
    sink.record(outcome(make_ctx(cfg, "open", request_id="o", query="a=1"), 200, "allow"))
    await sink.close()
    assert "query" not in requests_of(lines(tmp_path / "audit.jsonl"))[0]


async def test_disabled_or_pathless_audit_is_inert(tmp_path):
    off = await started(make_config(audit={"enabled": False}))
    assert off.readiness() == {}
    nopath = await started(make_config())
    assert nopath.readiness() == {"file": "fallback: audit.path not set, no trail written"}
    nopath.record(make_ctx(make_config()))
    with pytest.raises(ValueError, match="strict"):
        build_audit(BuildEnv(config=make_config(audit={"durability": "strict"}), base_dir=".", secrets={}))
    await off.close()
    await nopath.close()


async def test_detections_and_facts_recorded(tmp_path):
    cfg = make_config(audit=audit_cfg(tmp_path))
    sink = await started(cfg)
    ctx = outcome(make_ctx(cfg, request_id="d"), 200, "allow")
    ctx.detections.append(Detection("waf", "sqli"))
    ctx.audit["identity"] = {"assertion_jti": "j1"}
    sink.record(ctx)
    await sink.close()
    r = requests_of(lines(tmp_path / "audit.jsonl"))[0]
    assert r["detections"] == [{"filter": "waf", "reason": "sqli"}]
    assert r["facts"] == {"identity": {"assertion_jti": "j1"}}
