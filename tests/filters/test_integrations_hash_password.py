"""`portvakt hash-password` (filters/integrations/hash_password.py)."""

from __future__ import annotations

import getpass
import io
import types

import pytest
from argon2 import PasswordHasher, profiles

from filters import integrations as mod


def _args(**kw):
    return types.SimpleNamespace(**{"time_cost": 1, "memory_cost": 8, "parallelism": 1, **kw})


@pytest.mark.parametrize("stdin_text", ["demo-passord\n", "demo-passord\r\n", "demo-passord"])
def test_hash_password_from_stdin(monkeypatch, capsys, stdin_text):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin_text))
    assert mod.cmd_hash_password(_args()) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("$argon2id$v=19$m=8,t=1,p=1$")
    assert PasswordHasher().verify(out, "demo-passord")


def test_hash_password_refuses_empty(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert mod.cmd_hash_password(_args()) == 2
    assert capsys.readouterr().out == ""


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_hash_password_prompts_twice(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", _Tty())
    answers = iter(["a", "b"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt: next(answers))
    assert mod.cmd_hash_password(_args()) == 2
    assert "differ" in capsys.readouterr().err
    answers2 = iter(["same", "same"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt: next(answers2))
    assert mod.cmd_hash_password(_args()) == 0
    assert PasswordHasher().verify(capsys.readouterr().out.strip(), "same")


def test_hash_password_subcommand_defaults_are_rfc9106_low_memory():
    import argparse

    parser = argparse.ArgumentParser()
    mod.register_commands(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["hash-password"])
    d = profiles.RFC_9106_LOW_MEMORY
    assert (args.time_cost, args.memory_cost, args.parallelism) == (d.time_cost, d.memory_cost, d.parallelism)
    assert args.func is mod.cmd_hash_password


def test_portvakt_hash_password_command_line():
    """The real CLI wiring: `python -m gateway hash-password` with the password on stdin."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "hash-password",
            "--time-cost",
            "1",
            "--memory-cost",
            "8",
            "--parallelism",
            "1",
        ],
        input="demo-passord\n",
        capture_output=True,
        text=True,
        cwd=root,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    hashed = out.stdout.strip()
    assert hashed.startswith("$argon2id$v=19$m=8,t=1,p=1$")
    assert PasswordHasher().verify(hashed, "demo-passord")
    assert "demo-passord" not in out.stdout + out.stderr
