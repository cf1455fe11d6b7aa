"""Processes under test and their helpers for ``make bench``: start, pin, wait; the PKI, tokens
and credentials the rows use."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import scenarios as sc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

PY = sys.executable


# ---- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cpus:
    """Which CPU runs the process under test and which run everything else."""

    def __init__(self, pin: bool) -> None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.enabled = pin and len(cpus) >= 2 and shutil.which("taskset") is not None
        self.sut = str(cpus[0]) if self.enabled else None
        self.aux = ",".join(str(c) for c in cpus[1:]) if self.enabled else None

    def wrap(self, cmd: list[str], role: str) -> list[str]:
        cpu = {"sut": self.sut, "aux": self.aux}.get(role)
        return ["taskset", "-c", cpu, *cmd] if cpu is not None else cmd

    def describe(self) -> str:
        if not self.enabled:
            return "not pinned (fewer than 2 CPUs, taskset missing, or --no-pin)"
        return (
            f"process under test pinned to CPU {self.sut}; wrk, upstream, Redis and py-spy to CPU {self.aux}"
        )


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 12) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, grace: float = 10.0) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the harness dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def start(
    name: str, cmd: list[str], work: Path, env: dict[str, str] | None = None, root: Path = ROOT
) -> Proc:
    log = work / f"{name}.log"
    f = open(log, "wb")
    p = subprocess.Popen(
        cmd,
        stdout=f,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=str(root),
        env={**os.environ, "PYTHONPATH": str(root), **(env or {})},
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    f.close()
    return Proc(name, p, log)


def wait_http(
    url: str, proc: Proc, timeout: float, ctx: ssl.SSLContext | None = None, ok=(200,)
) -> str | None:
    """Poll ``url`` until it answers one of ``ok``. Returns None, or why it never did."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            return f"{proc.name} exited ({proc.popen.returncode}): {proc.tail(2)}"
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
                if r.status in ok:
                    return None
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            if e.code in ok:
                return None
            last = f"HTTP {e.code}: {e.read(300)!r}"
        except (OSError, ssl.SSLError) as e:
            last = str(e)
        time.sleep(0.2)
    return f"{proc.name} not ready after {timeout:.0f}s ({last})"


def wait_port(port: int, proc: Proc, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            return f"{proc.name} exited ({proc.popen.returncode}): {proc.tail(2)}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return None
        except OSError:
            time.sleep(0.1)
    return f"{proc.name} did not listen on {port} within {timeout:.0f}s"


# ---- credentials ----------------------------------------------------------------------------


def prepare_pki(work: Path) -> Path:
    from gateway.dev import ca as devca

    d = work / "pki"
    devca.generate(d, seid2_orgs=[sc.CALLER_ORG], seid1_orgs=[sc.TARGET_ORG])
    return d


def mint_token(pki: Path, ttl: int = 3600) -> str:  # issuers refuse > 3600 s by default
    """A Maskinporten-shaped access token signed by the dev issuer key (RS256, kid from the JWKS)."""
    import jwt

    kid = json.loads((pki / "issuer-jwks.json").read_text())["keys"][0]["kid"]
    now = int(time.time())
    claims = {
        "iss": "https://test.maskinporten.no/",
        "consumer": {"authority": "iso6523-actorid-upis", "ID": f"0192:{sc.CALLER_ORG}"},
        "scope": "ks:fiks",
        "aud": sc.AUDIENCE,
        "client_amr": "private_key_jwt",
        "client_id": "bench-client",
        "token_type": "Bearer",
        "iat": now,
        "exp": now + ttl,
        "jti": str(uuid.uuid4()),
    }
    return jwt.encode(claims, (pki / "issuer-key.pem").read_bytes(), algorithm="RS256", headers={"kid": kid})


def integration_credentials() -> tuple[str, str]:
    from argon2 import PasswordHasher

    password = "bench-" + uuid.uuid4().hex
    return password, PasswordHasher().hash(password)  # argon2id, library defaults


def find_crs() -> Path | None:
    for cand in (
        os.environ.get("PORTVAKT_CRS_DIR"),
        str(ROOT.parent / "shared" / "waf" / "crs"),
        str(ROOT.parent.parent / "shared" / "waf" / "crs"),  # a worktree one level further down
    ):
        if cand and (Path(cand) / "rules").is_dir():
            return Path(cand).resolve()
    return None
