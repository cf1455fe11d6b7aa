"""``make bench``: the gateway's CPU time per request, row by row, against a bare aiohttp proxy
measured in the same run.

Usage: ``python bench/run.py [--quick] [--profile] [--rounds 3] [--duration 3] [--only WORD ...]
[--no-waf-table] [--no-latency] [--no-workers] [--out DIR] [--no-pin] [--keep]``

What it measures, and why that way: on a small machine where the load generator, the upstream and
the gateway share cores, requests/s moves by 2-4x between runs and flatters cheap rows (the load
generator's core fills first). What holds is the **CPU time the process under test spends per
request**: utime+stime from ``/proc/<pid>/stat`` (the process and its children, all threads) read
right before and right after each measured window, divided by the requests wrk completed in it.
Every row's process is started once, checked (a preflight request that must reach the upstream,
and decisions from every filter the row is about in ``/metrics``) and warmed up (not measured);
then the rows are measured in interleaved rounds (A B C ... A B C ...), and each row reports the
median over rounds with the spread (min-max), beside its ratio to the bare proxy of the same
request shape (per round, then the median), req/s and wrk's latency percentiles.

With two or more CPUs the process under test runs on the first CPU (``taskset``), wrk, the
upstream and Redis on the others; the header of the output says what was pinned where.

Further sections (each can be turned off): latency against offered load for a few rows, the WAF
table (Portvakt CRS PL1 against nginx + libmodsecurity3 + the same CRS, on three corpora and two
request shapes), and ``--workers 2`` against one worker. ``--profile`` records every Python row
with py-spy and writes a flame graph per row. Plots (SVG) go next to the table in ``--out``.

A row whose feature is not there (a stage module that does not import, a config section the
model rejects, Redis/CRS/nginx absent) prints "skipped: why"; a row that was set up but did not
work prints "failed: why". Neither stops the run. Nothing here is a test: no speed is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import procstat  # noqa: E402
import scenarios as sc  # noqa: E402
import svg  # noqa: E402
import waftable  # noqa: E402
from scenarios import Env, Request, Scenario  # noqa: E402

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
        "/work/shared/waf/crs",
    ):
        if cand and (Path(cand) / "rules").is_dir():
            return Path(cand).resolve()
    return None


# ---- wrk ------------------------------------------------------------------------------------


def lua_string(data: bytes) -> str:
    out = ['"']
    for b in data:
        c = chr(b)
        if c in '"\\':
            out.append("\\" + c)
        elif 32 <= b < 127:
            out.append(c)
        else:
            out.append(f"\\{b:03d}")
    out.append('"')
    return "".join(out)


DONE_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


def wrk_script(req: Request, path: Path, delay_ms: float | None = None) -> Path:
    """A wrk Lua script sending ``req``; with ``delay_ms`` each connection waits that long before
    each request (the offered-load points of the latency plot)."""
    lines = [f"wrk.method = {lua_string(req.method.encode())}", f"wrk.path = {lua_string(req.path.encode())}"]
    if req.body:
        lines.append(f"wrk.body = {lua_string(req.body)}")
    for k, v in req.headers.items():
        lines.append(f"wrk.headers[{lua_string(k.encode())}] = {lua_string(v.encode())}")
    if delay_ms is not None:
        lines.append(f"delay = function() return {delay_ms:.3f} end")
    path.write_text("\n".join(lines) + "\n" + DONE_LUA)
    return path


def run_replay(url: str, slice_path: Path, cpus: Cpus, pid: int, connections: int = 8) -> Sample:
    """``bench/replay.py`` sends exactly the slice's requests; CPU of ``pid``'s tree over that."""
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    cmd = cpus.wrap([PY, str(HERE / "replay.py"), host, port, str(slice_path), str(connections)], "aux")
    c0 = procstat.tree_cpu_seconds(pid)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    c1 = procstat.tree_cpu_seconds(pid)
    m = re.search(r"^REPLAY_JSON (\{.*\})$", out.stdout, re.M)
    if m is None:
        raise RuntimeError(f"replay gave no result (exit {out.returncode}): {out.stderr.strip()[-300:]}")
    d = json.loads(m.group(1))
    non2xx = sum(v for k, v in d["statuses"].items() if not k.startswith("2"))
    errors = {k: v for k, v in (("status", non2xx), ("socket", d["errors"])) if v}
    return Sample(d["requests"] + d["errors"], d["seconds"], c1 - c0, 0, 0, 0, errors)


@dataclass
class Sample:
    """One measured window of one row."""

    requests: int
    seconds: float
    cpu_s: float  # process under test (and its children), utime+stime over the window
    p50_us: int
    p90_us: int
    p99_us: int
    errors: dict[str, int]
    wrk_cpu_s: float = 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_us(self) -> float:
        return self.cpu_s * 1e6 / self.requests if self.requests else float("nan")


def upstream_count(url: str) -> int:
    with urllib.request.urlopen(url + "/__bench/count", timeout=10) as r:
        return int(r.read())


SETTLE = 0.5  # seconds after wrk starts (connections up) and before it ends, outside the window


def run_wrk(
    url: str,
    script: Path,
    seconds: float,
    args: argparse.Namespace,
    cpus: Cpus,
    pid: int | None = None,
    connections: int | None = None,
    pin: bool = True,
    counter: str | None = None,
) -> Sample:
    """wrk against ``url`` for ``seconds``; with ``pid``, that process tree's CPU time.

    With ``counter`` (the bench upstream's URL) the window is the steady part of the run: wrk
    runs ``settle + seconds + settle``, and CPU time and the upstream's request count are read
    ``settle`` after the start and ``seconds`` later, so wrk's connection set-up (a TLS
    handshake per connection, 1-3 ms each) and tear-down fall outside. Without it, the window is
    wrk's whole run and the requests are wrk's count."""
    settle = SETTLE if counter else 0.0
    total = seconds + 2 * settle
    cmd = [
        "wrk",
        "-t",
        str(args.threads),
        "-c",
        str(connections or args.connections),
        "-d",
        f"{max(1, round(total))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    if pin:
        cmd = cpus.wrap(cmd, "aux")
    c0 = procstat.tree_cpu_seconds(pid) if pid else 0.0
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    window = None
    try:
        if counter:
            time.sleep(settle)
            n0, c0, w0 = (
                upstream_count(counter),
                procstat.tree_cpu_seconds(pid) if pid else 0.0,
                time.monotonic(),
            )
            time.sleep(seconds)
            n1, c1, w1 = (
                upstream_count(counter),
                procstat.tree_cpu_seconds(pid) if pid else 0.0,
                time.monotonic(),
            )
            window = (n1 - n0, c1 - c0, w1 - w0)
        out, err = p.communicate(timeout=total + 120)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if window is None:
        c1 = procstat.tree_cpu_seconds(pid) if pid else 0.0
    m = re.search(r"^BENCH_JSON (\{.*\})$", out, re.M)
    if m is None:
        raise RuntimeError(f"wrk gave no result (exit {p.returncode}): {err.strip() or out.strip()}"[:400])
    d = json.loads(m.group(1))
    errors = {k: d[k] for k in ("connect", "read", "write", "status", "timeout") if d[k]}
    if window is not None:
        return Sample(window[0], window[2], window[1], d["p50"], d["p90"], d["p99"], errors)
    dur = d["duration_us"] / 1e6 or (time.monotonic() - t0)
    return Sample(d["requests"], dur, c1 - c0, d["p50"], d["p90"], d["p99"], errors)


class ChildClock:
    """Cumulative CPU time of the harness's waited-for children (wrk, py-spy): diff around a run."""

    @staticmethod
    def now() -> float:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime


# ---- rows -----------------------------------------------------------------------------------


@dataclass
class Row:
    n: int
    scenario: Scenario
    status: str = "pending"  # ok | skipped | failed
    why: str = ""
    samples: list[Sample] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # per round, against the bare proxy's CPU
    proc: Proc | None = None
    url: str = ""
    script: Path | None = None
    request: Request | None = None
    profile: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> str:
        return self.request.method if self.request else "GET"

    def median(self, attr: str) -> float:
        vals = [getattr(s, attr) for s in self.samples]
        return statistics.median(vals) if vals else float("nan")

    def spread(self, attr: str) -> tuple[float, float]:
        vals = [getattr(s, attr) for s in self.samples]
        return (min(vals), max(vals)) if vals else (float("nan"), float("nan"))


def client_ssl(pki: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki / "ca.pem"))


def preflight(
    url: str, req: Request, ctx: ssl.SSLContext | None, headers_expected: tuple[str, ...] = ()
) -> str | None:
    """One request like wrk's: it must come back 2xx with the upstream's JSON (having received
    ``headers_expected``)."""
    r = urllib.request.Request(url + req.path, data=req.body or None, method=req.method, headers=req.headers)
    try:
        with urllib.request.urlopen(r, timeout=30, context=ctx) as resp:
            body = resp.read()
            if not 200 <= resp.status < 300:
                return f"preflight answered {resp.status}"
            try:
                doc = json.loads(body)
            except ValueError:
                return f"preflight body is not the upstream's JSON: {body[:200]!r}"
            if doc.get("method") != req.method:
                return f"preflight body is not the upstream's answer: {body[:200]!r}"
            if req.body and doc.get("body_bytes") != len(req.body):
                return f"upstream received {doc.get('body_bytes')} body bytes, sent {len(req.body)}"
            missing = [h for h in headers_expected if h not in doc.get("header_names", [])]
            if missing:
                return f"skip: feature inactive: the upstream did not receive {', '.join(missing)}"
            return None
    except urllib.error.HTTPError as e:
        return f"preflight answered {e.code}: {e.read(400).decode(errors='replace')}"
    except (OSError, ssl.SSLError) as e:
        return f"preflight failed: {e}"


_METRIC = re.compile(r"^portvakt_filter_decisions_total\{([^}]*)\}\s+([0-9.e+]+)$", re.M)


def filters_seen(admin: str) -> dict[str, dict[str, float]]:
    """filter -> decision -> count, from the admin /metrics exposition."""
    with urllib.request.urlopen(admin + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, dict[str, float]] = {}
    for labels, value in _METRIC.findall(text):
        lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        out.setdefault(lab.get("filter", "?"), {})[lab.get("decision", "?")] = float(value)
    return out


def why_skipped(s: Scenario, env: Env, have: dict[str, bool]) -> str | None:
    for need in s.needs:
        if not have.get(need):
            return {
                "redis": "redis-server not found (apt-get install redis-server)",
                "crs": "CRS not found at ../shared/waf/crs (or PORTVAKT_CRS_DIR)",
                "nginx": "nginx not installed (apt-get install nginx-light)",
            }.get(need, f"{need} unavailable")
    for spec in s.modules:
        modname, _, attr = spec.partition(":")
        try:
            mod = importlib.import_module(modname)
        except Exception as e:  # noqa: BLE001 - any import problem means "not there yet"
            return f"{modname} does not import ({type(e).__name__}: {e})"
        if attr and not hasattr(mod, attr):
            return f"{modname}.{attr} not implemented yet"
    return None


def portvakt_config(
    s: Scenario, env: Env, port: int, admin: int, plain: bool = False, workers: int | None = None
) -> dict[str, Any]:
    assert s.config is not None
    cfg = s.config(env)
    if plain:
        cfg["server"] = {"listen": f"127.0.0.1:{port}", "plain_http": True}
    else:
        cfg["server"] = {
            "listen": f"127.0.0.1:{port}",
            "tls": {
                "certificate": f"{env.pki_dir}/server.pem",
                "private_key": f"{env.pki_dir}/server-key.pem",
            },
        }
    if workers:
        cfg["server"]["workers"] = workers
    cfg["admin"] = {"listen": f"127.0.0.1:{admin}"}
    return cfg


def nginx_conf(work: Path, pki: Path, port: int, upstream: str) -> Path:
    user = "user root root;" if os.geteuid() == 0 else ""
    up = upstream.removeprefix("http://")
    d = work / f"nginx-{port}"
    d.mkdir(exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(
        f"""{user}
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  upstream bench {{ server {up}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {pki}/server.pem;
    ssl_certificate_key {pki}/server-key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{
      proxy_pass http://bench;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    }}
  }}
}}
"""
    )
    return conf


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def launch(
    row: Row,
    env: Env,
    work: Path,
    cpus: Cpus,
    have: dict[str, bool],
    plain: bool = False,
    workers: int | None = None,
    role: str = "sut",
) -> str | None:
    """Start the row's process (not yet waited for). Sets row.proc/url; returns why it cannot."""
    s = row.scenario
    why = why_skipped(s, env, have)
    if why:
        row.status, row.why = "skipped", why
        return why
    pki = Path(env.pki_dir)
    row.request = s.request(env)
    name = f"{row.n:02d}-{slug(s.name)}"
    port = free_port()
    if s.kind == "upstream":
        row.proc = start(name, cpus.wrap([PY, str(HERE / "upstream.py"), str(port)], role), work)
        row.url = f"http://127.0.0.1:{port}"
    elif s.kind == "bare":
        cmd = [
            PY,
            str(HERE / "bareproxy.py"),
            str(port),
            env.upstream_url,
            str(pki / "server.pem"),
            str(pki / "server-key.pem"),
        ]
        row.proc = start(name, cpus.wrap(cmd, role), work)
        row.url = f"https://127.0.0.1:{port}"
    elif s.kind == "nginx":
        conf = nginx_conf(work, pki, port, env.upstream_url)
        row.proc = start(name, cpus.wrap(["nginx", "-c", str(conf), "-p", str(conf.parent)], role), work)
        row.url = f"https://127.0.0.1:{port}"
    elif s.kind == "modsec":
        assert env.crs_dir
        conf = waftable.modsec_conf(work, port, env.upstream_url, Path(env.crs_dir))
        row.proc = start(name, cpus.wrap(["nginx", "-c", str(conf), "-p", str(conf.parent)], role), work)
        row.url = f"http://127.0.0.1:{port}"
    else:
        import yaml

        from gateway.config import ConfigError, parse_config

        admin = free_port()
        cfg = portvakt_config(s, env, port, admin, plain=plain, workers=workers)
        cfg_path = work / f"{name}.yaml"
        text = yaml.safe_dump(cfg, sort_keys=False)
        cfg_path.write_text(text)
        try:
            parse_config(text, str(cfg_path))
        except ConfigError as e:
            row.status, row.why = "skipped", "config not accepted: " + "; ".join(e.problems[:3])
            return row.why
        cmd = [PY, "-m", "gateway", "run", "--config", str(cfg_path), "--log-level", "WARNING"]
        row.proc = start(name, cpus.wrap(cmd, role), work, root=s.source or ROOT)
        row.url = f"{'http' if plain else 'https'}://127.0.0.1:{port}"
        row.profile["admin"] = f"http://127.0.0.1:{admin}"
    return None


def ready(row: Row, env: Env, work: Path) -> None:
    """Wait for the row's process, then prove it does what the row says (or mark it)."""
    s, proc = row.scenario, row.proc
    assert proc is not None and row.request is not None
    admin = row.profile.get("admin")
    port = int(row.url.rsplit(":", 1)[1])
    err = wait_http(admin + "/readyz", proc, 240) if admin else wait_port(port, proc, 30)
    if err:
        row.status, row.why = "failed", err
        return
    ctx = client_ssl(Path(env.pki_dir)) if row.url.startswith("https") else None
    err = preflight(row.url, row.request, ctx, s.expect_upstream_headers)
    if err:
        row.status, row.why = ("skipped", err[6:]) if err.startswith("skip: ") else ("failed", err)
        return
    if admin and s.expect_filters:
        seen = filters_seen(admin)
        missing = [
            f for f in s.expect_filters if not any(v > 0 for k, v in seen.get(f, {}).items() if k != "deny")
        ]
        if missing:
            row.status, row.why = (
                "skipped",
                f"feature inactive: no decisions from filter(s) {', '.join(missing)}",
            )
            return
    for name in s.expect_files:
        f = work / name
        deadline = time.monotonic() + 10
        while not (f.exists() and f.stat().st_size > 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not (f.exists() and f.stat().st_size > 0):
            row.status, row.why = "skipped", f"feature inactive: {name} was not written"
            return


def measure_row(row: Row, seconds: float, args: argparse.Namespace, cpus: Cpus) -> Sample | None:
    assert row.proc is not None and row.script is not None
    try:
        counter = (
            row.url if row.scenario.kind == "upstream" else args.upstream_url
        )  # where requests are counted
        m = run_wrk(row.url, row.script, seconds, args, cpus, pid=row.proc.pid, counter=counter)
    except Exception as e:  # noqa: BLE001 - one broken row must not end the run
        row.status, row.why = "failed", f"{type(e).__name__}: {e}"
        return None
    bad = sum(v for k, v in m.errors.items() if k != "status") + m.errors.get("status", 0)
    if m.requests == 0:
        row.status, row.why = "failed", f"no request completed in {seconds:g} s ({m.errors or 'no errors'})"
        return None
    if bad > 0.01 * m.requests:
        row.status, row.why = "failed", f"{bad} of {m.requests} requests failed ({m.errors})"
        return None
    if not row.proc.alive():
        row.status, row.why = "failed", f"process died during the run: {row.proc.tail()}"
        return None
    return m


# ---- profiles -------------------------------------------------------------------------------


def profile_row(row: Row, seconds: float, args: argparse.Namespace, cpus: Cpus, out: Path) -> str | None:
    """py-spy (sampling, non-blocking) on the row's process while wrk loads it: collapsed stacks
    and a flame graph SVG. Returns the SVG path or why there is none."""
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not os.path.exists(spy):
        return "py-spy not installed (pip install py-spy; `make bench` installs the bench extra)"
    assert row.proc is not None and row.script is not None
    raw = out / f"profile-{row.n:02d}-{slug(row.scenario.name)}.txt"
    cmd = cpus.wrap(
        [
            spy,
            "record",
            "--pid",
            str(row.proc.pid),
            "--rate",
            "200",
            "--nonblocking",
            "--function",
            "--format",
            "raw",
            "--output",
            str(raw),
            "--duration",
            str(max(1, round(seconds))),
        ],
        "aux",
    )
    spy_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # let py-spy attach before the load starts
    try:
        run_wrk(row.url, row.script, seconds, args, cpus, pid=row.proc.pid)
    finally:
        try:
            _, err = spy_proc.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            spy_proc.kill()
            _, err = spy_proc.communicate()
    if not raw.exists():
        return f"py-spy wrote nothing: {err.strip()[-300:]}"
    stacks: dict[str, int] = {}
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[stack] = stacks.get(stack, 0) + int(count)
    path = out / f"flame-{row.n:02d}-{slug(row.scenario.name)}.svg"
    path.write_text(svg.flame_graph(row.scenario.name, stacks))
    row.profile["top"] = svg.top_frames(stacks, 80)
    row.profile["by_self"] = sorted(svg.top_frames(stacks, 10_000), key=lambda t: -t[2])[:15]
    row.profile["svg"] = str(path)
    return str(path)


# ---- report ---------------------------------------------------------------------------------


def fmt_us(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"


def bare_rows(rows: list[Row]) -> dict[str, Row]:
    return {r.shape: r for r in rows if r.scenario.kind == "bare" and r.status == "ok"}


def compute_ratios(rows: list[Row]) -> None:
    """Per round: a row's CPU per request over the bare proxy's of the same shape, same round."""
    bare = bare_rows(rows)
    for r in rows:
        b = bare.get(r.shape)
        r.ratios = []
        if b is None or r.status != "ok":
            continue
        for s, bs in zip(r.samples, b.samples):
            if bs.cpu_us and bs.cpu_us == bs.cpu_us:
                r.ratios.append(s.cpu_us / bs.cpu_us)


def _cpu_cell(r: Row) -> tuple[str, str]:
    lo, hi = r.spread("cpu_us")
    cpu = f"{r.median('cpu_us'):,.0f}"
    spread = f"{lo:,.0f}–{hi:,.0f}" if len(r.samples) > 1 else "–"
    return cpu, spread


def main_table(rows: list[Row]) -> str:
    by_name = {r.scenario.name: r for r in rows}
    lines = [
        "| # | row | CPU µs/req | spread | × bare proxy | + vs reference | req/s | p50 | p99 |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        s = r.scenario
        if r.status != "ok" or not r.samples:
            lines.append(
                f"| {r.n} | {s.name} | {r.status}: {r.why}".replace("\n", " ")[:300] + " | | | | | | | |"
            )
            continue
        cpu, spread = _cpu_cell(r)
        ratio = "–"
        if r.ratios:
            ratio = f"{statistics.median(r.ratios):.2f}"
            if len(r.ratios) > 1:
                ratio += f" ({min(r.ratios):.2f}–{max(r.ratios):.2f})"
        ref = by_name.get(s.compare) if s.compare else None
        vs = "–"
        if ref and ref.status == "ok" and ref.samples:
            vs = f"{r.median('cpu_us') - ref.median('cpu_us'):+,.0f} µs vs #{ref.n}"
        lines.append(
            f"| {r.n} | {s.name} | {cpu} | {spread} | {ratio} | {vs} | {r.median('rps'):,.0f} | "
            f"{fmt_us(r.median('p50_us'))} | {fmt_us(r.median('p99_us'))} |"
        )
    return "\n".join(lines)


def twin_table(rows: list[Row]) -> str:
    """``--compare``: each row against its twin at the other revision, per round."""
    by_name = {r.scenario.name: r for r in rows}
    lines = [
        "| row | this tree µs/req (spread) | at the revision (spread) | this / revision, per round (range) |",
        "|---|---:|---:|---:|",
    ]
    for t in rows:
        cur = by_name.get(t.scenario.compare or "") if "twin" in t.scenario.tags else None
        if cur is None or not cur.samples or not t.samples:
            continue
        rat = [a.cpu_us / b.cpu_us for a, b in zip(cur.samples, t.samples) if b.cpu_us]
        lo, hi = cur.spread("cpu_us")
        tlo, thi = t.spread("cpu_us")
        lines.append(
            f"| #{cur.n} {cur.scenario.name} | {cur.median('cpu_us'):,.0f} ({lo:,.0f}–{hi:,.0f}) | "
            f"{t.median('cpu_us'):,.0f} ({tlo:,.0f}–{thi:,.0f}) | "
            f"{statistics.median(rat):.2f} ({min(rat):.2f}–{max(rat):.2f}) |"
        )
    return "\n".join(lines)


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ""
    try:
        load = ", load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({model}), Python {platform.python_version()}{load}"


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- sections -------------------------------------------------------------------------------


def rounds_over(rows: list[Row], args: argparse.Namespace, cpus: Cpus, label: str, measure=None) -> None:
    """Interleaved rounds: every live row once per round, in order, ``args.rounds`` times."""
    measure = measure or (lambda r: measure_row(r, args.duration, args, cpus))
    for rnd in range(1, args.rounds + 1):
        t0 = time.monotonic()
        for row in rows:
            if row.status != "pending":
                continue
            m = measure(row)
            if m is None:
                say(f"  {label} round {rnd}: [{row.n}] {row.scenario.name}: {row.status}: {row.why}")
                continue
            row.samples.append(m)
        done = [f"{r.n}:{r.samples[-1].cpu_us:,.0f}" for r in rows if r.status == "pending" and r.samples]
        say(
            f"  {label} round {rnd}/{args.rounds} ({time.monotonic() - t0:.0f}s): CPU µs/req "
            + " ".join(done)
        )
    for row in rows:
        if row.status == "pending" and row.samples:
            row.status = "ok"


def start_rows(
    rows: list[Row],
    env: Env,
    work: Path,
    cpus: Cpus,
    have: dict[str, bool],
    args: argparse.Namespace,
    plain: bool = False,
    workers: int | None = None,
    role: str = "sut",
) -> None:
    """Start every row's process, then wait for each, check it and warm it up (unmeasured)."""
    for row in rows:
        launch(row, env, work, cpus, have, plain=plain, workers=workers, role=role)
    for row in rows:
        if row.status != "pending":
            say(f"  [{row.n}] {row.scenario.name}: {row.status}: {row.why}")
            continue
        ready(row, env, work)
        if row.status != "pending":
            say(f"  [{row.n}] {row.scenario.name}: {row.status}: {row.why}")
            continue
        assert row.request is not None
        row.script = wrk_script(row.request, work / f"{row.n:02d}-{slug(row.scenario.name)}.lua")
        if args.warmup > 0:
            try:
                run_wrk(row.url, row.script, args.warmup, args, cpus, pin=role == "sut")
            except Exception as e:  # noqa: BLE001
                row.status, row.why = "failed", f"warm-up: {e}"


def stop_rows(rows: list[Row]) -> None:
    for r in rows:
        if r.proc is not None:
            r.proc.stop()


def latency_section(
    rows: list[Row], args: argparse.Namespace, cpus: Cpus, work: Path, out: Path
) -> tuple[str, dict]:
    """Latency against offered load for a few rows: each connection waits before each request
    (wrk ``delay()``), at fractions of the row's own saturated rate. Closed loop with think
    time, so the x axis is the rate achieved, not the rate asked for."""
    names = [sc.BARE_GET, sc.PV_GET, sc.IDENTITY_GET, "upstream direct (HTTP, no proxy)"]
    picked = [r for r in rows if r.scenario.name in names and r.status == "ok" and r.samples]
    fractions = (0.25, 0.5, 0.75, 0.9) if not args.quick else (0.5,)
    conns = 16
    series, table_rows, doc = [], [], {}
    upstream_row = next((r for r in picked if r.scenario.kind == "upstream"), None)
    ident = next((r for r in picked if r.scenario.name == sc.IDENTITY_GET), None)
    for r in picked:
        if r.scenario.kind == "upstream":
            continue
        sat = r.median("rps")
        pts50, pts99 = [], []
        for fr in fractions:
            delay = conns * 1000.0 / (sat * fr)
            script = wrk_script(r.request, work / f"lat-{r.n}-{fr}.lua", delay_ms=delay)  # type: ignore[arg-type]
            m = run_wrk(
                r.url,
                script,
                args.latency_duration,
                args,
                cpus,
                pid=r.proc.pid,
                connections=conns,  # type: ignore[union-attr]
                counter=args.upstream_url,
            )
            pts50.append((m.rps, m.p50_us / 1000))
            pts99.append((m.rps, m.p99_us / 1000))
            table_rows.append(
                f"| {r.scenario.name} | {fr:.0%} | {m.rps:,.0f} | {fmt_us(m.p50_us)} | {fmt_us(m.p99_us)} | {m.cpu_us:,.0f} |"
            )
            doc.setdefault(r.scenario.name, []).append(
                {"fraction": fr, "rps": m.rps, "p50_us": m.p50_us, "p99_us": m.p99_us, "cpu_us": m.cpu_us}
            )
            if r is ident and fr == 0.5 and upstream_row is not None:
                um = run_wrk(
                    upstream_row.url,
                    wrk_script(upstream_row.request, work / "lat-up.lua", delay_ms=delay),  # type: ignore[arg-type]
                    args.latency_duration,
                    args,
                    cpus,
                    connections=conns,
                )
                doc["added_p99_at_half"] = {
                    "gateway_p99_us": m.p99_us,
                    "upstream_direct_p99_us": um.p99_us,
                    "added_us": m.p99_us - um.p99_us,
                    "rps": m.rps,
                }
        label = r.scenario.name.split(" (")[0][:24]
        series.append((f"{label} p50", pts50, False))
        series.append((f"{label} p99", pts99, True))
    (out / "latency-vs-load.svg").write_text(
        svg.line_chart(
            "Latency vs offered load (GET, TLS keep-alive, 16 connections)",
            series,
            "achieved requests/s",
            "latency, ms (solid p50, dashed p99)",
        )
    )
    text = [
        "| row | offered (of saturation) | achieved req/s | p50 | p99 | CPU µs/req |",
        "|---|---:|---:|---:|---:|---:|",
        *table_rows,
    ]
    if "added_p99_at_half" in doc:
        a = doc["added_p99_at_half"]
        text.append("")
        text.append(
            f"Identity pipeline at half of its saturation ({a['rps']:,.0f} req/s): p99 {fmt_us(a['gateway_p99_us'])}; "
            f"upstream direct at the same pacing: p99 {fmt_us(a['upstream_direct_p99_us'])}; "
            f"added p99 ≈ {fmt_us(a['added_us'])}."
        )
    return "\n".join(text), doc


WAF_TARGETS = [
    Scenario("nginx + ModSecurity 3 + CRS PL1 (reference)", "modsec", sc.get_plain, needs=("crs", "modsec")),
    Scenario(
        "Portvakt + CRS PL1",
        "portvakt",
        sc.get_plain,
        sc._c(sc.catch_all, lambda c, e: sc.with_waf(c, e, "crs")),
        modules=sc.WAF,
        expect_filters=("waf",),
        needs=("crs",),
    ),
    Scenario(
        "Portvakt minimal, no WAF (for scale)",
        "portvakt",
        sc.get_plain,
        sc._c(sc.catch_all),
        expect_filters=("ingress",),
    ),
]


def waf_section(
    env: Env, work: Path, cpus: Cpus, have: dict[str, bool], args: argparse.Namespace
) -> tuple[str, dict]:
    """The WAF table: every target on every workload, interleaved; plain HTTP (the WAF and the
    proxy, not TLS); CPU per request of the process under test."""
    shared = Path(env.crs_dir).parent if env.crs_dir else None
    corpora = [
        ("(a) CRS regression corpus", shared / "crs-regression.jsonl" if shared else None),
        ("(b) benign corpus", shared / "benign.jsonl" if shared else None),
        ("(c) keyword-dense corpus", HERE / "data" / "waf-dense.jsonl"),
    ]
    targets = [Row(100 + i, s) for i, s in enumerate(WAF_TARGETS)]
    start_rows(targets, env, work, cpus, have, args, plain=True)
    live = [t for t in targets if t.status == "pending"]
    if not any(t.scenario.kind == "modsec" for t in live) or not any(
        t.scenario.name.startswith("Portvakt + CRS") for t in live
    ):
        why = "; ".join(f"{t.scenario.name}: {t.why}" for t in targets if t.status != "pending")
        stop_rows(targets)
        return f"WAF table skipped: {why}", {}
    workloads: list[tuple[str, Any]] = []
    for name, path in corpora:
        if path is None or not path.exists():
            continue
        reqs, left_out = waftable.load_corpus(path)
        workloads.append((f"{name}, {len(reqs)} requests ({left_out} unsendable left out)", reqs))
    workloads.append(("small GET", sc.get_plain(env)))
    workloads.append(("1 KB JSON POST", sc.post_json(env)))
    results: dict[tuple[str, str], list[Sample]] = {}
    n = args.waf_requests
    for rnd in range(args.rounds):
        t0 = time.monotonic()
        for wname, wl in workloads:
            if isinstance(wl, list):
                sl = waftable.write_slice(wl, rnd * n, n, work / f"waf-{slug(wname)}-{rnd}.bin")
            else:
                script = wrk_script(wl, work / f"waf-{slug(wname)}.lua")
            for t in live:
                try:
                    if isinstance(wl, list):
                        m = run_replay(t.url, sl, cpus, t.proc.pid)  # type: ignore[union-attr]
                    else:
                        m = run_wrk(
                            t.url,
                            script,
                            args.duration,
                            args,
                            cpus,
                            pid=t.proc.pid,
                            connections=8,  # type: ignore[union-attr]
                            counter=args.upstream_url,
                        )
                except Exception as e:  # noqa: BLE001
                    say(f"  WAF {t.scenario.name} on {wname}: {e}")
                    continue
                results.setdefault((t.scenario.name, wname), []).append(m)
        say(f"  WAF round {rnd + 1}/{args.rounds} ({time.monotonic() - t0:.0f}s)")
    stop_rows(targets)
    ref = WAF_TARGETS[0].name
    lines = [
        "| workload | target | CPU µs/req (median) | spread | × ModSecurity | answered non-2xx | requests/round |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    doc: dict[str, Any] = {}
    for wname, _ in workloads:
        base = results.get((ref, wname), [])
        for t in live:
            ms = results.get((t.scenario.name, wname), [])
            if not ms:
                continue
            cpus_ = [m.cpu_us for m in ms]
            ratios = [m.cpu_us / b.cpu_us for m, b in zip(ms, base) if b.cpu_us]
            ratio = (
                f"{statistics.median(ratios):.2f}"
                if ratios and t.scenario.name != ref
                else "1.00"
                if t.scenario.name == ref
                else "–"
            )
            if ratios and len(ratios) > 1 and t.scenario.name != ref:
                ratio += f" ({min(ratios):.2f}–{max(ratios):.2f})"
            blocked = statistics.median([m.errors.get("status", 0) / m.requests for m in ms if m.requests])
            other = sum(v for m in ms for k, v in m.errors.items() if k != "status")  # closed without answer
            lines.append(
                f"| {wname} | {t.scenario.name} | {statistics.median(cpus_):,.0f} | "
                f"{min(cpus_):,.0f}–{max(cpus_):,.0f} | {ratio} | {blocked:.0%}"
                + (f" (+{other} socket errors)" if other else "")
                + f" | {statistics.median([m.requests for m in ms]):,.0f} |"
            )
            doc.setdefault(wname, {})[t.scenario.name] = {
                "cpu_us": cpus_,
                "ratio_vs_modsec": ratios,
                "non_2xx_share": blocked,
            }
    return "\n".join(lines), doc


def workers_section(
    env: Env, work: Path, cpus: Cpus, have: dict[str, bool], args: argparse.Namespace
) -> tuple[str, dict]:
    """The identity pipeline (GET) with one worker and with ``--workers 2``, nothing pinned: both
    cores are shared by the gateway, wrk, the upstream and Redis, and the table says how much each
    took."""
    base = next(s for s in sc.SCENARIOS if s.name == sc.IDENTITY_GET)
    rows = []
    trees: list[tuple[str, Path | None]] = [("", None)]
    if args.compare:
        trees.append((f" [at {args.compare}]", args.compare_source))
    for label, source in trees:
        for w in (1, 2):

            def config(e: Env, w: int = w, tag: str = slug(label) or "this") -> dict[str, Any]:
                cfg = base.config(e)  # type: ignore[misc]
                cfg["audit"]["path"] = e.path(f"audit-workers-{w}-{tag}.jsonl")  # one trail per gateway
                return cfg

            s = Scenario(
                f"{w} worker{'s' if w > 1 else ''}{label}",
                "portvakt",
                base.request,
                config,
                modules=base.modules,
                needs=base.needs,
                expect_upstream_headers=base.expect_upstream_headers,
                source=source,
            )
            rows.append((w, Row(200 + len(rows), s)))
    for w, r in rows:
        launch(r, env, work, cpus, have, workers=w, role="none")
    for w, r in rows:
        if r.status == "pending":
            ready(r, env, work)
        if r.status == "pending":
            r.script = wrk_script(r.request, work / f"workers-{w}.lua")  # type: ignore[arg-type]
            run_wrk(r.url, r.script, max(args.warmup, 1), args, cpus, pin=False)
    live = [(w, r) for w, r in rows if r.status == "pending"]
    if len(live) < 2 or len(live) < len(rows):
        stop_rows([r for _, r in rows])
        return "workers figure skipped: " + "; ".join(
            f"{r.scenario.name}: {r.why}" for _, r in rows if r.why
        ), {}
    aux: dict[int, list[tuple[float, float, float]]] = {
        r.n: [] for _, r in live
    }  # (wrk cpu, upstream+redis cpu, wall)
    others = [p for p in env.aux_pids if p]
    for _round in range(args.rounds):
        for _, r in live:
            o0, k0 = sum(procstat.tree_cpu_seconds(p) for p in others), ChildClock.now()
            m = run_wrk(
                r.url,
                r.script,
                args.duration,
                args,
                cpus,
                pid=r.proc.pid,
                pin=False,  # type: ignore[arg-type,union-attr]
                counter=args.upstream_url,
            )
            aux[r.n].append(
                (ChildClock.now() - k0, sum(procstat.tree_cpu_seconds(p) for p in others) - o0, m.seconds)
            )
            r.samples.append(m)
    stop_rows([r for _, r in rows])
    lines = [
        "| gateway | req/s (median) | spread | CPU µs/req | gateway cores busy | wrk cores | upstream+Redis cores |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    doc: dict[str, Any] = {}
    for _, r in live:
        lo, hi = r.spread("rps")
        busy = statistics.median([s.cpu_s / s.seconds for s in r.samples])
        wrk_c = statistics.median([a[0] / a[2] for a in aux[r.n]])
        oth = statistics.median([a[1] / a[2] for a in aux[r.n]])
        lines.append(
            f"| {r.scenario.name} | {r.median('rps'):,.0f} | {lo:,.0f}–{hi:,.0f} | "
            f"{r.median('cpu_us'):,.0f} | {busy:.2f} | {wrk_c:.2f} | {oth:.2f} |"
        )
        doc[r.scenario.name] = {
            "rps": [s.rps for s in r.samples],
            "cpu_us": [s.cpu_us for s in r.samples],
            "cores": busy,
            "wrk_cores": wrk_c,
            "aux_cores": oth,
        }
    for i in range(0, len(live) - 1, 2):
        (_, one), (_, two) = live[i], live[i + 1]
        tput = [b.rps / a.rps for a, b in zip(one.samples, two.samples) if a.rps]
        cpu = [b.cpu_us / a.cpu_us for a, b in zip(one.samples, two.samples) if a.cpu_us]
        if tput and cpu:
            lines.append("")
            lines.append(
                f"{two.scenario.name} / {one.scenario.name}, per round: throughput "
                f"{statistics.median(tput):.2f}× ({min(tput):.2f}–{max(tput):.2f}), CPU per request "
                f"{statistics.median(cpu):.2f}× ({min(cpu):.2f}–{max(cpu):.2f})."
            )
    return "\n".join(lines), doc


# ---- main -----------------------------------------------------------------------------------


def export_revision(rev: str, work: Path) -> Path:
    """``git archive`` of the gateway code at ``rev`` (gateway/, filters/), to run beside this tree."""
    d = work / f"rev-{re.sub(r'[^A-Za-z0-9._-]', '_', rev)}"
    d.mkdir()
    tar = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "gateway", "filters"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(d)], input=tar.stdout, check=True)
    return d


def with_twins(chosen: list[Scenario], rev: str, source: Path) -> list[Scenario]:
    """Each Portvakt row followed by the same row run from ``source`` (the code at ``rev``), so
    both are measured in the same rounds, next to each other; the twin's reference is the row."""
    out: list[Scenario] = []
    for s in chosen:
        out.append(s)
        if s.kind == "portvakt":
            out.append(
                dataclasses.replace(
                    s,
                    name=f"{s.name} [at {rev}]",
                    compare=s.name,
                    source=source,
                    config=_own_audit_file(s.config),
                    tags=s.tags + ("twin",),
                )
            )
    return out


def _own_audit_file(config: Any) -> Any:
    def build(env: Env) -> dict[str, Any]:
        cfg = config(env)
        if cfg.get("audit", {}).get("enabled"):
            cfg["audit"]["path"] = cfg["audit"]["path"].replace(".jsonl", "-twin.jsonl")
        return cfg

    return build


def select(args: argparse.Namespace) -> list[Scenario]:
    chosen = [s for s in sc.SCENARIOS if (not args.quick or "quick" in s.tags)]
    if args.only:
        chosen = [
            s
            for s in chosen
            if s.kind == "bare" or any(w.lower() in s.name.lower() or w in s.tags for w in args.only)
        ]
        names = {s.name for s in chosen}
        by_name = {s.name: s for s in sc.SCENARIOS}
        for s in list(chosen):  # a row's reference runs too, so its difference has a partner
            ref = s.compare
            while ref and ref not in names:
                names.add(ref)
                ref = by_name[ref].compare
        chosen = [s for s in sc.SCENARIOS if s.name in names]
    return chosen


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="CI smoke: a few rows, one short round, small WAF samples"
    )
    ap.add_argument(
        "--duration", type=float, default=None, help="measured seconds per row and round (default 3; quick 1)"
    )
    ap.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="unmeasured seconds per row before the rounds (default 1.5)",
    )
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; quick 1)")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    ap.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="rows whose name or tag contains one of these words (bare rows always)",
    )
    ap.add_argument(
        "--profile", action="store_true", help="after the rounds, a py-spy flame graph (SVG) per Python row"
    )
    ap.add_argument("--no-waf-table", action="store_true", help="skip the WAF table")
    ap.add_argument("--no-latency", action="store_true", help="skip latency vs offered load")
    ap.add_argument("--no-workers", action="store_true", help="skip the --workers 2 figure")
    ap.add_argument(
        "--waf-requests",
        type=int,
        default=None,
        help="corpus requests per target and round (default 200; quick 60)",
    )
    ap.add_argument(
        "--latency-duration", type=float, default=None, help="seconds per offered-load point (default 2)"
    )
    ap.add_argument(
        "--compare",
        metavar="REV",
        help="also run every selected Portvakt row from the code at git "
        "revision REV, next to the same row of this tree in every round (before/after in one run)",
    )
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument(
        "--out",
        default=str(HERE / "out"),
        help="where the table, JSON, plots and profiles go (default bench/out)",
    )
    ap.add_argument("--markdown", help="also write the report to this file")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    ap.add_argument(
        "--keep", action="store_true", help="keep the work directory (configs, logs, wrk scripts)"
    )
    args = ap.parse_args(argv)
    q = args.quick
    args.duration = args.duration if args.duration is not None else (1.0 if q else 3.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if q else 1.5)
    args.rounds = args.rounds if args.rounds is not None else (1 if q else 3)
    args.waf_requests = args.waf_requests if args.waf_requests is not None else (60 if q else 200)
    args.latency_duration = (
        args.latency_duration if args.latency_duration is not None else (1.0 if q else 2.0)
    )
    if q:
        args.no_workers = True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        say("wrk is not installed (Debian: apt-get install wrk; `make bench` does it as root)")
        return 2
    # SIGTERM/SIGHUP end the run like Ctrl-C does, so the processes it started are stopped.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(130))
    cpus = Cpus(not args.no_pin)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="portvakt-bench-"))
    procs: list[Proc] = []
    rows: list[Row] = []
    t_start = time.monotonic()
    try:
        pki = prepare_pki(work)
        password, pw_hash = integration_credentials()
        crs = find_crs()
        have = {
            "redis": shutil.which("redis-server") is not None,
            "crs": crs is not None,
            "nginx": shutil.which("nginx") is not None,
            "modsec": waftable.modsec_available() is None,
        }
        selected = select(args)
        if args.compare:
            args.compare_source = export_revision(args.compare, work)
            selected = with_twins(selected, args.compare, args.compare_source)

        up_port = free_port()
        upstream = start("upstream", cpus.wrap([PY, str(HERE / "upstream.py"), str(up_port)], "aux"), work)
        procs.append(upstream)
        err = wait_port(up_port, upstream, 20)
        if err:
            say(f"bench upstream did not start: {err}")
            return 1
        redis_url, redis_pid = None, None
        if have["redis"]:
            rport = free_port()
            rdir = work / "redis"
            rdir.mkdir()
            redis = start(
                "redis",
                cpus.wrap(
                    [
                        "redis-server",
                        "--port",
                        str(rport),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(rdir),
                    ],
                    "aux",
                ),
                work,
            )
            procs.append(redis)
            if wait_port(rport, redis, 20) is None:
                redis_url, redis_pid = f"redis://127.0.0.1:{rport}/0", redis.pid
            else:
                have["redis"] = False
        args.upstream_url = f"http://127.0.0.1:{up_port}"
        env = Env(
            work=str(work),
            pki_dir=str(pki),
            upstream_url=f"http://127.0.0.1:{up_port}",
            token=mint_token(pki),
            integration_password=password,
            integration_hash=pw_hash,
            redis_url=redis_url,
            crs_dir=str(crs) if crs else None,
        )
        env.aux_pids = [upstream.pid, redis_pid or 0]

        now = dt.datetime.now(dt.UTC)
        header = [
            f"Portvakt bench, {now:%Y-%m-%d %H:%M} UTC: {machine()}.",
            f"{cpus.describe()}.",
            f"wrk -t{args.threads} -c{args.connections}, TLS keep-alive on loopback; {args.rounds} interleaved round(s) of "
            f"{args.duration:g} s per row after {args.warmup:g} s warm-up (not measured).",
            "CPU µs/req: utime+stime of the process under test over the measured window / requests completed "
            "(median over rounds; spread = min–max). × bare proxy: that CPU over the bare aiohttp proxy's, same "
            "request shape, same round (median of the per-round ratios, min–max).",
        ]
        say("\n".join(header))
        rows = [Row(i + 1, s) for i, s in enumerate(selected)]
        t0 = time.monotonic()
        start_rows(rows, env, work, cpus, have, args)
        say(
            f"  {sum(r.status == 'pending' for r in rows)} rows started, checked and warmed up in {time.monotonic() - t0:.0f}s"
        )
        rounds_over(rows, args, cpus, "rows")
        compute_ratios(rows)
        report = ["\n".join(header), "", main_table(rows), ""]
        if args.compare:
            report += [f"This tree against {args.compare} (same rounds):", "", twin_table(rows), ""]
        ok = [r for r in rows if r.status == "ok" and r.samples]
        bars = [
            (
                f"#{r.n} {r.scenario.name}",
                r.median("cpu_us"),
                *r.spread("cpu_us"),
                {"upstream": "reference", "nginx": "reference", "bare": "bare proxy"}.get(
                    r.scenario.kind, "Portvakt"
                ),
            )
            for r in ok
        ]
        (out / "cpu-per-row.svg").write_text(
            svg.bar_chart("Gateway CPU per request (TLS keep-alive)", bars, "CPU µs per request")
        )
        report.append("Plot: `cpu-per-row.svg`.")
        doc: dict[str, Any] = {
            "header": header,
            "rows": [
                {
                    "n": r.n,
                    "row": r.scenario.name,
                    "status": r.status,
                    "why": r.why,
                    "cpu_us": [s.cpu_us for s in r.samples],
                    "ratio_vs_bare": r.ratios,
                    "rps": [s.rps for s in r.samples],
                    "p50_us": [s.p50_us for s in r.samples],
                    "p99_us": [s.p99_us for s in r.samples],
                }
                for r in rows
            ],
        }

        if args.profile:
            say("profiles (py-spy, non-blocking sampling at 200 Hz):")
            for r in ok:
                if r.scenario.kind in ("bare", "portvakt") and r.proc and r.proc.alive():
                    res = profile_row(r, max(args.duration, 3.0), args, cpus, out)
                    say(f"  [{r.n}] {r.scenario.name}: {res}")
            report += ["", "Profiles (py-spy, inclusive % of samples, top frames):", ""]
            for r in ok:
                if r.profile.get("top") and (
                    "pipeline" in r.scenario.tags or "twin" in r.scenario.tags or r.scenario.kind == "bare"
                ):
                    report.append(f"#{r.n} {r.scenario.name} — flame graph `{Path(r.profile['svg']).name}`")
                    report.append("")
                    report.append("| Portvakt function | inclusive | self |")
                    report.append("|---|---:|---:|")
                    report += [
                        f"| `{f[:110]}` | {i:.1f} % | {s:.1f} % |"
                        for f, i, s in r.profile["top"]
                        if ("gateway/" in f or "filters/" in f) and "cli.py" not in f and "__main__" not in f
                    ][:18]
                    report.append("")
                    report.append("| function (by self time) | self | inclusive |")
                    report.append("|---|---:|---:|")
                    report += [f"| `{f[:110]}` | {s:.1f} % | {i:.1f} % |" for f, i, s in r.profile["by_self"]]
                    report.append("")
        if not args.no_latency:
            say("latency vs offered load:")
            text, ldoc = latency_section(rows, args, cpus, work, out)
            report += [
                "",
                "Latency vs offered load (wrk delay() per connection, 16 connections; closed loop, so the "
                "x axis is the achieved rate). Plot: `latency-vs-load.svg`.",
                "",
                text,
            ]
            doc["latency"] = ldoc
        stop_rows(rows)

        if not args.no_waf_table:
            say("WAF table (plain HTTP, 8 connections):")
            text, wdoc = waf_section(env, work, cpus, have, args)
            report += [
                "",
                f"WAF table: CPU µs per request of the process under test, plain HTTP, 8 connections, "
                f"{args.rounds} interleaved round(s); corpora replayed {args.waf_requests} requests per target "
                f"and round (a different slice each round, the same for every target), GET/POST "
                f"{args.duration:g} s. × ModSecurity: per round, then the median.",
                "",
                text,
            ]
            doc["waf"] = wdoc
        if not args.no_workers:
            say("workers (nothing pinned):")
            text, kdoc = workers_section(env, work, cpus, have, args)
            report += [
                "",
                f"Workers: identity pipeline GET, wrk -c{args.connections} -t{args.threads}; nothing pinned, "
                "so the gateway, wrk, the upstream and Redis share both cores (their shares below, in cores "
                "busy over the window).",
                "",
                text,
            ]
            doc["workers"] = kdoc
        report.append("")
        report.append(f"Whole run: {time.monotonic() - t_start:.0f} s.")
        md = "\n".join(report)
        print(md)
        (out / "bench.md").write_text(md)
        (out / "bench.json").write_text(json.dumps(doc, indent=1, default=str))
        if args.markdown:
            Path(args.markdown).write_text(md)
        if args.json:
            Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
        say(
            f"written: {out}/bench.md, bench.json, cpu-per-row.svg"
            + (", latency-vs-load.svg" if not args.no_latency else "")
        )
        return 0
    finally:
        stop_rows(rows)
        for p in reversed(procs):
            p.stop()
        if args.keep:
            say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
