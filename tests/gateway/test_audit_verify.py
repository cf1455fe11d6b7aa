"""gateway/audit/cli.py + chainfile.py: the chain verifies, and every kind of tampering is named; query and reveal."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from gateway.audit import cli as auditcli
from gateway.audit.cli import VerifyError, query, verify
from tests.gateway.helpers_audit import (
    AUDIT_KEY,
    KEY,
    PID,
    audit_cfg,
    auditor_keys,
    certificate,
    idporten,
    lines,
    make_config,
    make_ctx,
    maskinporten,
    outcome,
    started,
    trail,
)


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


# ------------------------------------------- a trail cut short together with its head file


async def _trail_of_three_requests(tmp_path) -> list[str]:
    cfg = make_config(audit=audit_cfg(tmp_path))
    sink = await started(cfg)
    for i in range(3):
        sink.record(outcome(make_ctx(cfg, request_id=f"r{i}"), 200, "allow"))
    await sink.close()
    return trail(tmp_path)


def _run(capsys, *argv: str) -> tuple[int, str]:
    ap = argparse.ArgumentParser()
    auditcli.register_commands(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["audit", "verify", *argv])
    rc = args.func(args)
    return rc, capsys.readouterr().out


async def test_truncated_trail_without_its_head_fails(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PORTVAKT_AUDIT_KEY", AUDIT_KEY)
    files = await _trail_of_three_requests(tmp_path)
    active = files[-1]
    assert _run(capsys, *files)[0] == 0
    # The attacker drops the newest records and the head that would betray it.
    with open(active, "rb") as f:
        data = f.read().splitlines(keepends=True)
    with open(active, "wb") as f:
        f.writelines(data[:-2])
    os.remove(active + ".head")
    rc, out = _run(capsys, *files)
    assert rc == 1 and out.startswith("FAIL ") and "no head file" in out, out
    rc, out = _run(capsys, "--no-head", *files)  # explicitly accepted: records alone
    assert rc == 0 and "head absent" in out


async def test_damaged_head_is_a_fail_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PORTVAKT_AUDIT_KEY", AUDIT_KEY)
    files = await _trail_of_three_requests(tmp_path)
    for text in ("[1, 2]", '{"seq": 3}', '"mac"'):
        with open(files[-1] + ".head", "w") as f:
            f.write(text)
        rc, out = _run(capsys, *files)
        assert rc == 1 and out.startswith("FAIL ") and ".head:1: head" in out, (text, out)


async def test_reload_that_fails_to_start_leaves_the_writer_as_it_was(tmp_path):
    # A reload whose audit sink started but whose runtime then failed to start (a later
    # component) is closed while the old sink still serves: the old sink's records must stay
    # MAC'd with the old key, and the trail must say the privilege changes did not happen.
    from gateway.audit.cli import verify
    from tests.gateway.helpers_audit import AUDIT_KEY, integration

    integ = {
        "id": integration().id,
        "password_hash": "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo",
        "authorized_org": "991825827",
        "grants": [{"organization": "958935420", "services": ["arkiv"]}],
    }
    cfg1 = make_config(audit=audit_cfg(tmp_path), integrations=[integ])
    cfg2 = make_config(
        audit=audit_cfg(tmp_path, key="another-audit-key-0123456789"), integrations=[{**integ, "grants": []}]
    )
    s1 = await started(cfg1)
    failed = await started(cfg2, previous=s1)
    await failed.close()  # the reload failed after the audit sink started
    s1.record(outcome(make_ctx(cfg1, request_id="still-old"), 200, "allow"))
    await s1.close()
    import json

    recs = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    kinds = [r["type"] for r in recs]
    assert "grant_withdrawn" in kinds and "reload_aborted" in kinds
    aborted = next(r for r in recs if r["type"] == "reload_aborted")
    assert [e["type"] for e in aborted["reverted"]] == ["grant_withdrawn"]
    # Records up to the failed start carry the new key's MACs only where the failed sink wrote;
    # everything the serving sink wrote after it (the request, the abort, the stop) verifies
    # with the old key: check from the abort record on.
    verify(trail(tmp_path), [AUDIT_KEY.encode(), b"another-audit-key-0123456789"])
    import hashlib
    import hmac as _hmac

    from gateway.audit import derive_keys
    from gateway.audit.sinks import line_body

    old_mac = derive_keys(AUDIT_KEY.encode())[0]
    lines_ = (tmp_path / "audit.jsonl").read_bytes().splitlines()
    start = kinds.index("reload_aborted")
    for line in lines_[start:]:
        body, mac = line_body(line)
        assert _hmac.compare_digest(mac, _hmac.new(old_mac, body, hashlib.sha256).hexdigest()), line[:80]
