"""gateway/audit/__init__.py, auditsinks.py, auditcli.py: records, chain, tampering, durability, privacy."""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa, x25519
from prometheus_client import generate_latest

from gateway.audit import AUDIT_UNAVAILABLE, AuditSink, build_audit, privilege_changes, scrub_query, unseal
from gateway.audit import cli as auditcli
from gateway.audit.cli import VerifyError, query, reveal, verify
from gateway.audit.sinks import ChainWriter, rotated_files
from gateway.chain import BuildEnv
from gateway.context import Detection
from gateway.metrics import REGISTRY
from tests.gateway.helpers_audit import (
    AUDIT_KEY,
    PID,
    certificate,
    idporten,
    integration,
    make_config,
    make_ctx,
    maskinporten,
    waf,
)

KEY = AUDIT_KEY.encode()


def audit_cfg(tmp_path: Path, **kw) -> dict:
    return {"path": str(tmp_path / "audit.jsonl"), "key": AUDIT_KEY, "batch_interval_ms": 1, **kw}


async def started(cfg, previous: AuditSink | None = None) -> AuditSink:
    sink = build_audit(BuildEnv(config=cfg, base_dir=".", secrets={}))
    if previous is not None:
        sink.adopt(previous)
    await sink.start()
    return sink


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def trail(tmp_path: Path) -> list[str]:
    p = str(tmp_path / "audit.jsonl")
    return rotated_files(p) + [p]


def requests_of(recs: list[dict]) -> list[dict]:
    return [r for r in recs if r["type"] == "request"]


def outcome(ctx, status, decision, reason=None):
    ctx.status, ctx.decision, ctx.reason = status, decision, reason
    return ctx


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


def metric(name: str, **labels) -> float:
    text = generate_latest(REGISTRY).decode()
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


async def test_failing_disk_denies_in_strict_and_recovers(tmp_path, monkeypatch):
    cfg = make_config(audit=audit_cfg(tmp_path, durability="strict", strict_timeout_seconds=2))
    sink = await started(cfg)
    w = sink.writer
    assert sink.readiness() == {"file": "ok"}
    errors0 = metric("portvakt_audit_write_errors_total", sink="file")
    real = ChainWriter._write_all

    def full(self, data):
        os.write(self._fd, data[: len(data) // 2])  # half a batch reaches the file, then ENOSPC
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ChainWriter, "_write_all", full)
    ctx = make_ctx(cfg, request_id="f1", token=maskinporten())
    problem = await sink.before_forward(ctx)
    assert problem is not None and problem.reason == AUDIT_UNAVAILABLE and problem.status == 503
    assert problem.internal_reason == "audit_write_failed"
    assert sink.readiness()["file"] == "down: No space left on device"
    assert metric("portvakt_audit_write_errors_total", sink="file") > errors0
    sink.record(outcome(ctx, 503, "deny", "audit_unavailable"))  # queued, retried later
    monkeypatch.setattr(ChainWriter, "_write_all", real)
    for _ in range(300):
        if w.healthy and w.depth() == 0:
            break
        await asyncio.sleep(0.01)
    assert sink.readiness() == {"file": "ok"}
    await sink.close()
    reqs = requests_of(lines(tmp_path / "audit.jsonl"))
    assert [(r["request_id"], r["status"], r["reason"]) for r in reqs] == [("f1", 503, "audit_unavailable")]
    verify(trail(tmp_path), KEY)  # the torn half batch was rolled back


async def test_full_queue_is_counted_and_reported(tmp_path):
    cfg = make_config(audit=audit_cfg(tmp_path, queue_max=2, batch_interval_ms=300))
    sink = await started(cfg)
    await asyncio.sleep(0.05)  # the writer has taken the start records and is waiting
    for i in range(6):
        sink.record(outcome(make_ctx(cfg, request_id=f"q{i}"), 200, "allow"))
    assert sink.readiness()["file"] == "down: queue full"
    await sink.close()
    recs = lines(tmp_path / "audit.jsonl")
    lost = [r for r in recs if r["type"] == "records_lost"]
    stopped = sum(r["type"] == "audit_stopped" for r in recs)
    # every record offered (6 requests + audit_stopped) is either written or counted as lost
    assert len(requests_of(recs)) + stopped + sum(r["count"] for r in lost) == 7
    assert lost and len(requests_of(recs)) < 6
    verify(trail(tmp_path), KEY)


async def test_reload_writes_privilege_changes_and_keeps_writer(tmp_path):
    integ = {
        "id": integration().id,
        "password_hash": "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
        "authorized_org": "991825827",
        "grants": [{"organization": "958935420", "services": ["saksbehandling", "arkiv"]}],
    }
    other = {**integ, "id": "0f0e0d0c-0b0a-4909-8807-060504030201", "grants": []}
    cfg1 = make_config(audit=audit_cfg(tmp_path), integrations=[integ, other])
    changed = {
        **integ,
        "password_hash": integ["password_hash"].replace("aGFzaG", "bmV3aG"),
        "grants": [{"organization": "958935420", "services": ["arkiv"]}],
    }
    cfg2 = make_config(audit=audit_cfg(tmp_path), integrations=[changed])
    s1 = await started(cfg1)
    s2 = await started(cfg2, previous=s1)
    assert s2.writer is s1.writer
    await s1.close()  # the old runtime retires: the adopted writer stays open
    s2.record(outcome(make_ctx(cfg2, request_id="after"), 200, "allow"))
    await s2.close()
    recs = lines(tmp_path / "audit.jsonl")
    kinds = [r["type"] for r in recs]
    assert kinds.count("audit_started") == 1 and kinds[-1] == "audit_stopped"
    events = {r["type"]: r for r in recs if r["type"].startswith(("grant_", "integration_"))}
    assert events["grant_withdrawn"] == {
        **events["grant_withdrawn"],
        "integration_id": integ["id"],
        "organization": "958935420",
        "service": "saksbehandling",
        "authorized_org": "991825827",
    }
    assert events["integration_removed"]["integration_id"] == other["id"]
    assert events["integration_password_changed"]["integration_id"] == integ["id"]
    text = (tmp_path / "audit.jsonl").read_text()
    assert "argon2" not in text and "aGFzaG" not in text
    snapshot = next(r for r in recs if r["type"] == "privileges")
    assert {"integration_id": integ["id"], "organization": "958935420", "service": "arkiv"} in snapshot[
        "grants"
    ]
    verify(trail(tmp_path), KEY)


def test_privilege_changes_grant_added():
    iid = integration().id
    base = {
        "id": iid,
        "password_hash": "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
        "authorized_org": "991825827",
    }
    old = make_config(integrations=[base])
    new = make_config(integrations=[{**base, "grants": [{"organization": "958935420", "services": ["s"]}]}])
    assert privilege_changes(old, new, b"k") == [
        {
            "type": "grant_added",
            "integration_id": iid,
            "authorized_org": "991825827",
            "organization": "958935420",
            "service": "s",
        }
    ]


# ------------------------------------------------------------------------------ tampering


async def write_trail(tmp_path, n=8, **kw) -> list[str]:
    cfg = make_config(audit=audit_cfg(tmp_path, **kw))
    sink = await started(cfg)
    for i in range(n):
        sink.record(outcome(make_ctx(cfg, request_id=f"t{i}", token=maskinporten()), 200, "allow"))
        if kw.get("rotate_bytes"):
            await asyncio.sleep(0.005)  # several batches, so rotation happens between them
    await sink.close()
    return trail(tmp_path)


def tamper_lines(path: str, fn) -> None:
    data = Path(path).read_bytes().split(b"\n")[:-1]
    data = fn(data)
    Path(path).write_bytes(b"".join(x + b"\n" for x in data))


def fails_at(files, where: str, what: str):
    with pytest.raises(VerifyError) as e:
        verify(files, KEY)
    assert where in str(e.value), str(e.value)
    assert what in str(e.value), str(e.value)


async def test_untouched_trail_verifies(tmp_path):
    files = await write_trail(tmp_path)
    s = verify(files, KEY)
    assert s["records"] == 11 and s["first_seq"] == 1 and s["head"] == "seq 11 verified"


async def test_verify_detects_edit(tmp_path):
    files = await write_trail(tmp_path)
    tamper_lines(files[-1], lambda d: d[:4] + [d[4].replace(b'"status":200', b'"status":201')] + d[5:])
    fails_at(files, "audit.jsonl:5:", "MAC")


async def test_verify_detects_byte_edit_that_keeps_json(tmp_path):
    files = await write_trail(tmp_path)
    tamper_lines(files[-1], lambda d: d[:4] + [d[4].replace(b'{"', b'{ "', 1)] + d[5:])
    fails_at(files, "audit.jsonl:5:", "edited")


async def test_verify_detects_deletion(tmp_path):
    files = await write_trail(tmp_path)
    tamper_lines(files[-1], lambda d: d[:4] + d[5:])
    fails_at(files, "audit.jsonl:5:", "missing")


async def test_verify_detects_swap(tmp_path):
    files = await write_trail(tmp_path)
    tamper_lines(files[-1], lambda d: d[:3] + [d[4], d[3]] + d[5:])
    fails_at(files, "audit.jsonl:4:", "out of order")


async def test_verify_detects_insertion(tmp_path):
    files = await write_trail(tmp_path)
    tamper_lines(files[-1], lambda d: d[:6] + [d[2]] + d[6:])
    fails_at(files, "audit.jsonl:7:", "out of order")


async def test_verify_detects_truncation(tmp_path):
    files = await write_trail(tmp_path)
    tamper_lines(files[-1], lambda d: d[:-3])
    fails_at(files, "audit.jsonl:9:", "truncated")


async def test_verify_detects_torn_last_line(tmp_path):
    files = await write_trail(tmp_path)
    data = Path(files[-1]).read_bytes()
    Path(files[-1]).write_bytes(data[:-20])
    fails_at(files, "audit.jsonl:11:", "truncated")


async def test_verify_wrong_key_fails(tmp_path):
    files = await write_trail(tmp_path)
    with pytest.raises(VerifyError, match="MAC"):
        verify(files, b"another-key-of-16-chars")


async def test_chain_across_rotation(tmp_path):
    files = await write_trail(tmp_path, n=12, rotate_bytes=1500)
    assert len(files) >= 3
    s = verify(list(reversed(files)), KEY)  # order given does not matter
    assert s["files"] == len(files) and s["records"] == 15
    first_of_second = json.loads(Path(files[1]).read_text().splitlines()[0])
    assert first_of_second["seq"] > 1
    # deleting the last record of a rotated file breaks the link into the next file
    tamper_lines(files[0], lambda d: d[:-1])
    fails_at(files, os.path.basename(files[1]) + ":1:", "missing")


async def test_rotated_file_removed_or_edited_is_named(tmp_path):
    files = await write_trail(tmp_path, n=12, rotate_bytes=1500)
    fails_at([files[0]] + files[2:], os.path.basename(files[2]) + ":1:", "missing")
    tamper_lines(files[1], lambda d: [d[0].replace(b'"GET"', b'"PUT"')] + d[1:])
    fails_at(files, os.path.basename(files[1]) + ":1:", "MAC")


async def test_restart_continues_chain_and_cuts_torn_tail(tmp_path):
    await write_trail(tmp_path, n=2)
    p = tmp_path / "audit.jsonl"
    with open(p, "ab") as f:
        f.write(b'{"partial":')  # a crash in the middle of an unsynced write
    files = await write_trail(tmp_path, n=2)
    recs = lines(p)
    started_ = [r for r in recs if r["type"] == "audit_started"]
    assert started_[1]["recovered"] == {"torn_tail_bytes": 11}
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    verify(files, KEY)


async def test_second_writer_on_same_file_is_refused(tmp_path):
    cfg = make_config(audit=audit_cfg(tmp_path))
    s1 = await started(cfg)
    with pytest.raises(RuntimeError, match="another process"):
        await started(cfg)
    await s1.close()


# ------------------------------------------------------------------------------ privacy


def auditor_keys(tmp_path, kind="x25519"):
    if kind == "x25519":
        priv = x25519.X25519PrivateKey.generate()
    else:
        priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = tmp_path / f"auditor-{kind}.pub"
    pub.write_bytes(
        priv.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return priv, str(pub)


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


# ------------------------------------------------------------------------------ reading + CLI


async def test_query_by_organization(tmp_path):
    cfg = make_config(audit=audit_cfg(tmp_path, durability="strict"))
    sink = await started(cfg)
    a = make_ctx(cfg, request_id="to-org", token=maskinporten("991825827"), target_org="958935420")
    assert await sink.before_forward(a) is None
    sink.record(outcome(a, 200, "allow"))
    sink.record(
        outcome(make_ctx(cfg, request_id="by-cert", certificate=certificate("958935420")), 401, "deny", "x")
    )
    sink.record(outcome(make_ctx(cfg, request_id="unrelated", token=maskinporten("974760673")), 200, "allow"))
    await sink.close()
    import datetime as dt

    since = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    got = [json.loads(x) for x in query(trail(tmp_path), "958935420", since)]
    assert [(r["type"], r["request_id"]) for r in got] == [
        ("request", "to-org"),
        ("request_completed", "to-org"),
        ("request", "by-cert"),
    ]
    assert list(query(trail(tmp_path), "958935420", dt.datetime(2100, 1, 1, tzinfo=dt.UTC))) == []


async def test_cli_verify_query_reveal(tmp_path, capsys):
    priv, pub = auditor_keys(tmp_path)
    cfg = make_config(audit=audit_cfg(tmp_path, auditor_public_key=pub))
    sink = await started(cfg)
    sink.record(
        outcome(make_ctx(cfg, request_id="c1", token=idporten(), target_org="958935420"), 200, "allow")
    )
    await sink.close()
    (tmp_path / "key").write_text(AUDIT_KEY + "\n")
    (tmp_path / "auditor.pem").write_bytes(
        priv.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ap = argparse.ArgumentParser()
    auditcli.register_commands(ap.add_subparsers(dest="command"))
    files = trail(tmp_path)

    def run(*argv) -> int:
        args = ap.parse_args(["audit", *argv])
        return args.func(args)

    assert run("verify", "--key-file", str(tmp_path / "key"), *files) == 0
    assert capsys.readouterr().out.startswith("OK 4 records")
    assert run("query", "--organization", "958935420", "--since", "2000-01-01T00:00:00Z", *files) == 0
    assert json.loads(capsys.readouterr().out)["request_id"] == "c1"
    assert run("reveal", "--key", str(tmp_path / "auditor.pem"), "--request-id", "c1", *files) == 0
    assert json.loads(capsys.readouterr().out)["pid"] == PID
    tamper_lines(files[-1], lambda d: d[:1] + d[2:])
    assert run("verify", "--key-file", str(tmp_path / "key"), *files) == 1
    assert capsys.readouterr().out.startswith(f"FAIL {files[-1]}:2:")
    assert run("auditor-keygen", str(tmp_path / "a.key"), str(tmp_path / "a.pub")) == 0


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


# ------------------------------------------------------------------------------ Redis sink


async def wait_for(cond, timeout=8.0):
    for _ in range(int(timeout / 0.02)):
        if await cond():
            return True
        await asyncio.sleep(0.02)
    return False


async def test_redis_stream_copy_with_spool_while_down(tmp_path, redis_server):
    spool = tmp_path / "spool"
    cfg = make_config(
        audit=audit_cfg(
            tmp_path, redis={"url": redis_server.url, "stream": "audit", "spool_path": str(spool)}
        )
    )
    sink = await started(cfg)
    client = redis_server.client()

    async def stream_ids() -> set[str]:
        try:
            entries = await client.xrange("audit")
        except Exception:
            return set()
        return {json.loads(f[b"record"]).get("request_id", "-") for _, f in entries}

    try:
        sink.record(outcome(make_ctx(cfg, request_id="up-1"), 200, "allow"))

        async def has(*ids):
            got = await stream_ids()
            return all(i in got for i in ids)

        assert await wait_for(lambda: has("up-1"))
        assert sink.readiness()["redis"] == "ok"
        redis_server.kill()
        for i in range(3):
            sink.record(outcome(make_ctx(cfg, request_id=f"down-{i}"), 200, "allow"))

        async def spooling():
            return (
                spool.exists()
                and spool.stat().st_size > 0
                and sink.readiness()["redis"].startswith("fallback")
            )

        assert await wait_for(spooling)
        assert sink.readiness()["file"] == "ok"  # the primary sink is unaffected
        assert "down-0" in spool.read_text()
        redis_server.start()  # comes back empty (no persistence): the spool is sent again, in order
        await client.aclose()
        client = redis_server.client()
        assert await wait_for(lambda: has("down-0", "down-1", "down-2"))
        assert not spool.exists()
        sink.record(outcome(make_ctx(cfg, request_id="up-2"), 200, "allow"))
        assert await wait_for(lambda: has("up-2"))
        entries = await client.xrange("audit")
        seqs = [json.loads(f[b"record"])["seq"] for _, f in entries]
        assert seqs == sorted(seqs)
    finally:
        await sink.close()
        await client.aclose()
    assert metric("portvakt_audit_records_total", sink="redis", result="spooled") >= 3


async def test_each_worker_writes_its_own_chain(tmp_path):
    cfg = make_config(audit=audit_cfg(tmp_path))
    sinks = [build_audit(BuildEnv(config=cfg, base_dir=".", secrets={"worker_index": i})) for i in range(2)]
    for s in sinks:
        await s.start()
    for i, s in enumerate(sinks):
        s.record(outcome(make_ctx(cfg, request_id=f"w{i}"), 200, "allow"))
        await s.close()
    for i in range(2):
        f = str(tmp_path / f"audit.jsonl.w{i}")
        assert [r["request_id"] for r in requests_of(lines(Path(f)))] == [f"w{i}"]
        verify([f], KEY)


async def test_writer_survives_a_bug_in_one_batch(tmp_path, monkeypatch):
    cfg = make_config(audit=audit_cfg(tmp_path, durability="strict"))
    sink = await started(cfg)
    real = ChainWriter._maybe_rotate
    calls = {"n": 0}

    def broken_once(self, incoming):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ZeroDivisionError("bug")
        return real(self, incoming)

    monkeypatch.setattr(ChainWriter, "_maybe_rotate", broken_once)
    problem = await sink.before_forward(make_ctx(cfg, request_id="b1"))
    assert problem is not None and problem.status == 503
    assert await sink.before_forward(make_ctx(cfg, request_id="b2")) is None  # the writer lives on
    await sink.close()
    verify(trail(tmp_path), KEY)


async def test_reload_that_never_starts_leaves_the_old_writer_alone(tmp_path):
    cfg = make_config(audit=audit_cfg(tmp_path))
    old = await started(cfg)
    failed = build_audit(BuildEnv(config=cfg, base_dir=".", secrets={}))
    failed.adopt(old)  # another component's build fails after this: never started, never closed
    old.record(outcome(make_ctx(cfg, request_id="still"), 200, "allow"))
    # a runtime that started but was closed again (swap aborted) gives its reference back
    aborted = await started(cfg, previous=old)
    await aborted.close()
    old.record(outcome(make_ctx(cfg, request_id="still-2"), 200, "allow"))
    await old.close()
    recs = lines(tmp_path / "audit.jsonl")
    assert [r["request_id"] for r in requests_of(recs)] == ["still", "still-2"]
    assert [r["type"] for r in recs].count("audit_stopped") == 1 and recs[-1]["type"] == "audit_stopped"
    assert old.writer._thread is None  # closed by the last user


async def test_key_change_on_reload_verifies_with_both_keys(tmp_path):
    s1 = await started(make_config(audit=audit_cfg(tmp_path)))
    new_key = "a-new-audit-key-after-rotation-42"
    s2 = await started(make_config(audit=audit_cfg(tmp_path, key=new_key)), previous=s1)
    await s1.close()
    s2.record(outcome(make_ctx(make_config(), request_id="k2"), 200, "allow"))
    await s2.close()
    with pytest.raises(VerifyError, match="MAC"):
        verify(trail(tmp_path), KEY)
    assert verify(trail(tmp_path), [KEY, new_key.encode()])["records"] == 4


async def test_strict_timeout_keeps_one_request_event_each(tmp_path, monkeypatch):
    import time as _time

    cfg = make_config(audit=audit_cfg(tmp_path, durability="strict", strict_timeout_seconds=0.1))
    sink = await started(cfg)
    await asyncio.sleep(0.05)  # start records written
    real = ChainWriter._write_all

    def stalled(self, data):
        _time.sleep(0.4)  # a disk that stalls longer than the strict timeout
        real(self, data)

    monkeypatch.setattr(ChainWriter, "_write_all", stalled)
    c1 = make_ctx(cfg, request_id="claimed")
    c2 = make_ctx(cfg, request_id="queued")
    t1 = asyncio.create_task(sink.before_forward(c1))
    await asyncio.sleep(0.03)  # the writer has taken c1's record and is stuck writing it
    p2 = await sink.before_forward(c2)  # queued behind it, gives up before any batch took it
    p1 = await t1
    assert p1.internal_reason == p2.internal_reason == "audit_timeout" and p1.status == 503
    sink.record(outcome(c1, 503, "deny", "audit_unavailable"))
    sink.record(outcome(c2, 503, "deny", "audit_unavailable"))
    await sink.close()
    recs = lines(tmp_path / "audit.jsonl")
    reqs = requests_of(recs)
    assert sorted(r["request_id"] for r in reqs) == ["claimed", "queued"]
    assert next(r for r in reqs if r["request_id"] == "claimed")["phase"] == "granted"
    assert next(r for r in reqs if r["request_id"] == "queued")["status"] == 503
    [done] = [r for r in recs if r["type"] == "request_completed"]
    assert (done["request_id"], done["status"], done["reason"]) == ("claimed", 503, "audit_unavailable")
    verify(trail(tmp_path), KEY)
