"""The rows of ``make bench``: a row's process (Portvakt config, nginx, bare proxy), its preflight,
one measurement, and its py-spy profile."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import ssl
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import svg
import waftable
from load import (
    SETTLE,
    Sample,
    run_wrk,
)
from processes import (
    HERE,
    PY,
    ROOT,
    Cpus,
    Proc,
    free_port,
    start,
    wait_http,
    wait_port,
)
from scenarios import Env, Request, Scenario

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
    # py-spy samples the steady part of the run only: it starts once wrk's connections are up
    # (their TLS handshakes, and the upstream connections replacing those cancelled when the
    # previous run stopped, are start-up, not per-request work) and stops before wrk does.
    sampled = max(1, round(seconds - 2 * SETTLE - 0.5))
    cmd = cpus.wrap(
        [
            spy,
            "record",
            "--pid",
            str(row.proc.pid),
            "--rate",
            str(args.profile_rate),
            "--nonblocking",
            *(() if getattr(args, "profile_lines", False) else ("--function",)),
            "--format",
            "raw",
            "--output",
            str(raw),
            "--duration",
            str(sampled),
        ],
        "aux",
    )
    spied: list[subprocess.Popen[str]] = []
    timer = threading.Timer(
        SETTLE,
        lambda: spied.append(
            subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        ),
    )
    timer.start()
    err = ""
    try:
        run_wrk(row.url, row.script, seconds, args, cpus, pid=row.proc.pid)
    finally:
        timer.join()
        for spy_proc in spied:
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
