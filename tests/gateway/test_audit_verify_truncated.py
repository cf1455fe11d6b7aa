"""`portvakt audit verify` must not pass a trail cut short together with its head file,
and a damaged head file is a FAIL line, not a traceback."""

from __future__ import annotations

import argparse
import os

from gateway.audit import cli as auditcli
from tests.gateway.helpers_audit import AUDIT_KEY, make_config, make_ctx
from tests.gateway.test_audit import audit_cfg, outcome, started, trail


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
