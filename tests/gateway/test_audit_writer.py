"""gateway/audit/writer.py + redis_stream.py + trail.py lifecycle: failing disks, full queues, reloads, workers, the Redis copy."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import threading
from pathlib import Path

import pytest

from gateway.audit import AUDIT_UNAVAILABLE, build_audit, privilege_changes
from gateway.audit.cli import VerifyError, verify
from gateway.audit.sinks import ChainWriter
from gateway.chain import BuildEnv
from tests.gateway.helpers_audit import (
    KEY,
    audit_cfg,
    integration,
    lines,
    make_config,
    make_ctx,
    maskinporten,
    metric,
    outcome,
    requests_of,
    started,
    trail,
    wait_for,
)


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


# ------------------------------------------------------------------------------ Redis sink


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
    cfg = make_config(audit=audit_cfg(tmp_path, durability="strict", strict_timeout_seconds=0.1))
    sink = await started(cfg)
    for _ in range(1000):  # the start records are written
        if sink.writer.seq >= 2 and sink.writer.depth() == 0:
            break
        await asyncio.sleep(0.01)
    real = ChainWriter._write_all
    entered, release = threading.Event(), threading.Event()

    def stalled(self, data):
        entered.set()
        release.wait(30)  # a disk that stalls until both requests have given up
        real(self, data)

    monkeypatch.setattr(ChainWriter, "_write_all", stalled)
    c1 = make_ctx(cfg, request_id="claimed")
    c2 = make_ctx(cfg, request_id="queued")
    t1 = asyncio.create_task(sink.before_forward(c1))
    for _ in range(1000):  # the writer has taken c1's record and is stuck writing it
        if entered.is_set():
            break
        await asyncio.sleep(0.01)
    assert entered.is_set()
    try:
        p2 = await sink.before_forward(c2)  # queued behind it, gives up before any batch took it
        p1 = await t1
    finally:
        release.set()
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
