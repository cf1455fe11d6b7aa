"""The README's commands after `make run`, run as written (bash) against the real demo."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.test_demo import DEMO_PORTS, _port_free

ROOT = Path(__file__).resolve().parents[2]


def readme_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```sh\n(. \.venv/bin/activate\n.*?)```", text, re.S)
    assert len(blocks) == 1, "the README's after-`make run` block (starting with `. .venv/bin/activate`)"
    return blocks[0]


def test_readme_commands_run_as_written_against_the_demo():
    busy = [p for p in DEMO_PORTS if not _port_free(p)]
    if busy:
        pytest.skip(f"demo ports in use on this machine: {busy} (is `make run` running?)")
    assert (ROOT / ".venv" / "bin" / "activate").exists() and (ROOT / ".venv" / "bin" / "portvakt").exists()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        seen: list[str] = []
        started = False
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            seen.append(line)
            if not line or "Ctrl-C stops everything" in line:
                started = bool(line)
                break
        if not started or proc.poll() is not None:
            text = "".join(seen)
            if "address already in use" in text.lower() or "cannot start" in text.lower():
                pytest.skip("demo ports taken by another process between the check and the start")
            raise AssertionError("the demo did not start:\n" + text)
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV",)}
        env["PATH"] = "/usr/local/bin:/usr/bin:/bin"  # `portvakt` only through the activated venv
        out = subprocess.run(
            ["bash", "-c", readme_block()], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
        )
        assert out.returncode == 0, out.stdout + out.stderr
        lines = [line for line in out.stdout.splitlines() if line.strip()]
        assert (
            '"path": "/innsyn/api/v1/orgs/958935420/saker"' in out.stdout
            or '"path":"/innsyn/api/v1/orgs/958935420/saker"' in out.stdout
        ), out.stdout
        assert '"reason":"missing_privilege"' in out.stdout, out.stdout
        assert '"reason":"waf_blocked"' in out.stdout, out.stdout
        assert "ok" in lines, lines
        assert '"status":"ready"' in out.stdout
        assert out.stderr.strip() == "", out.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
