"""`make run` as a user meets it: `portvakt demo` starts, prints a call, and that call works."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO_PORTS = (8443, 9090, 9001, 9002, 9003)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_demo_prints_a_call_that_exercises_token_integration_and_privilege():
    busy = [p for p in DEMO_PORTS if not _port_free(p)]
    if busy:
        pytest.skip(f"demo ports in use on this machine: {busy} (is `make run` running?)")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    try:
        call = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and call is None:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "TOKEN=" in line and "curl" in line:
                call = line.strip()
        if call is None and "address already in use" in "".join(lines):
            pytest.skip("demo ports taken by another process between the check and the start")
        assert call, "demo printed no example call:\n" + "".join(lines)
        out = subprocess.run(["bash", "-c", call], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        echo = json.loads(out.stdout)
        assert echo["path"].startswith("/innsyn/api/v1/orgs/958935420/")
        headers = {k.lower(): v for k, v in echo["headers"].items()}
        assert headers["x-portvakt-integration-id"] == "7b1c9a52-0d3e-4a8f-9c61-2f5e8d4b1a07"
        assert headers["x-portvakt-target-org"] == "958935420"
        assert "integrasjonpassord" not in headers
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines)
