"""`make run` as a newcomer meets the persons' login: the demo prints the URL, a browser logs in at
the dev ID-porten (picking the level), and the upstream sees the person."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.persons import dev_login

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


async def test_demo_person_logs_in_with_a_browser(chromium):
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
        url = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and url is None:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "log in as a person: open " in line:
                url = line.split("open ", 1)[1].split()[0]
        assert url == "https://127.0.0.1:8443/minside/", "".join(lines)
        ctx = await chromium()
        page = await ctx.new_page()
        await page.goto(url)
        await dev_login(page, acr="idporten-loa-substantial")
        await page.wait_for_url(url)
        doc = json.loads(await page.inner_text("body"))
        assert doc["headers"]["X-Portvakt-Person"] == "24917397852"
        assert doc["headers"]["X-Portvakt-Acr"] == "idporten-loa-substantial"
        await page.goto(url + "hoy/")  # step-up to high
        await dev_login(page, acr="idporten-loa-high")
        await page.wait_for_url(url + "hoy/")
        assert json.loads(await page.inner_text("body"))["headers"]["X-Portvakt-Acr"] == "idporten-loa-high"
        await page.goto("https://127.0.0.1:8443/portvakt/logout")
        await page.click("#logout-confirm")
        await page.wait_for_url("https://127.0.0.1:8443/")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines)
