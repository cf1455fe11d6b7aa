"""Review: `portvakt audit verify` must not pass a trail cut short together with its head file,
and a damaged head file is a FAIL line, not a traceback."""

from __future__ import annotations

import argparse
import os

from gateway import auditcli
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
