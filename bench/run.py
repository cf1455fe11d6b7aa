"""``make bench``: Portvakt against a bare aiohttp proxy, measured with wrk in one run on loopback.

Usage: ``python bench/run.py [--duration 5] [--warmup 1] [--connections 32] [--only WORD ...]
[--markdown FILE] [--json FILE] [--no-pin] [--keep]``

Each row of ``bench/scenarios.py`` is started fresh (its own process), checked with one preflight
request (it must answer 2xx from the upstream, and every filter the row is about must show
decisions in ``/metrics``), warmed up, then measured by wrk with a generated Lua script. With
two or more CPUs the process under test is pinned to one CPU and wrk, the upstream and Redis to
another (``taskset``), so a row's requests/s is what one core of the proxy does and
1e6 / (requests/s) approximates its CPU time per request. Ratios are against the bare proxy with
the same request shape, measured in the same run, and against the row's reference.

A row whose feature is not there yet (a stage module that does not import, a config section the
model rejects, Redis/CRS/nginx absent) prints "skipped: why"; a row that was set up but did not
work (no start, non-2xx answers) prints "failed: why". Neither stops the run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
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

import scenarios as sc  # noqa: E402
from scenarios import Env, Request, Scenario  # noqa: E402

PY = sys.executable


# ---- processes ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cpus:
    """Which CPU runs the process under test and which runs everything else."""

    def __init__(self, pin: bool) -> None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.enabled = pin and len(cpus) >= 2 and shutil.which("taskset") is not None
        self.sut = str(cpus[0]) if self.enabled else None
        self.aux = ",".join(str(c) for c in cpus[1:]) if self.enabled else None

    def wrap(self, cmd: list[str], role: str) -> list[str]:
        cpu = self.sut if role == "sut" else self.aux
        return ["taskset", "-c", cpu, *cmd] if cpu is not None else cmd


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

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


def start(name: str, cmd: list[str], work: Path, env: dict[str, str] | None = None) -> Proc:
    log = work / f"{name}.log"
    f = open(log, "wb")
    p = subprocess.Popen(
        cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    f.close()
    return Proc(name, p, log)


def wait_http(url: str, proc: Proc, timeout: float, ctx: ssl.SSLContext | None = None, ok=(200,)) -> str | None:
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
    from gateway import devca

    d = work / "pki"
    devca.generate(d, seid2_orgs=[sc.CALLER_ORG], seid1_orgs=[sc.TARGET_ORG])
    return d


def mint_token(pki: Path, ttl: int = 7200) -> str:
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
    for cand in (os.environ.get("PORTVAKT_CRS_DIR"), str(ROOT.parent / "shared" / "waf" / "crs")):
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


def wrk_script(req: Request, path: Path) -> Path:
    lines = [f"wrk.method = {lua_string(req.method.encode())}", f"wrk.path = {lua_string(req.path.encode())}"]
    if req.body:
        lines.append(f"wrk.body = {lua_string(req.body)}")
    for k, v in req.headers.items():
        lines.append(f"wrk.headers[{lua_string(k.encode())}] = {lua_string(v.encode())}")
    path.write_text("\n".join(lines) + "\n" + DONE_LUA)
    return path


@dataclass
class Measure:
    rps: float
    requests: int
    p50_us: int
    p90_us: int
    p99_us: int
    errors: dict[str, int]


def run_wrk(url: str, script: Path, seconds: float, args: argparse.Namespace, cpus: Cpus) -> Measure:
    cmd = cpus.wrap(
        ["wrk", "-t", str(args.threads), "-c", str(args.connections), "-d", f"{max(1, round(seconds))}s",
         "--timeout", "10s", "-s", str(script), url],
        "aux",
    )
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    m = re.search(r"^BENCH_JSON (\{.*\})$", out.stdout, re.M)
    if m is None:
        raise RuntimeError(f"wrk gave no result (exit {out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    d = json.loads(m.group(1))
    dur = d["duration_us"] / 1e6
    errors = {k: d[k] for k in ("connect", "read", "write", "status", "timeout") if d[k]}
    return Measure(d["requests"] / dur if dur else 0.0, d["requests"], d["p50"], d["p90"], d["p99"], errors)


# ---- one row --------------------------------------------------------------------------------

@dataclass
class Row:
    n: int
    scenario: Scenario
    status: str = "pending"  # ok | skipped | failed
    why: str = ""
    m: Measure | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def client_ssl(pki: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki / "ca.pem"))


def preflight(url: str, req: Request, ctx: ssl.SSLContext | None, headers_expected: tuple[str, ...] = ()) -> str | None:
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


_METRIC = re.compile(r'^portvakt_filter_decisions_total\{([^}]*)\}\s+([0-9.e+]+)$', re.M)


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
                "nginx": "nginx not installed (apt-get install nginx adds this reference row)",
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


def portvakt_config(s: Scenario, env: Env, port: int, admin: int) -> dict[str, Any]:
    assert s.config is not None
    cfg = s.config(env)
    cfg["server"] = {
        "listen": f"127.0.0.1:{port}",
        "tls": {"certificate": f"{env.pki_dir}/server.pem", "private_key": f"{env.pki_dir}/server-key.pem"},
    }
    cfg["admin"] = {"listen": f"127.0.0.1:{admin}"}
    return cfg


def nginx_conf(work: Path, pki: Path, port: int, upstream: str) -> Path:
    user = "user root root;" if os.geteuid() == 0 else ""
    up = upstream.removeprefix("http://")
    conf = work / "nginx.conf"
    conf.write_text(
        f"""{user}
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {work}/nginx-body;
  proxy_temp_path {work}/nginx-proxy;
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


def run_row(row: Row, env: Env, work: Path, args: argparse.Namespace, cpus: Cpus, have: dict[str, bool]) -> None:
    s = row.scenario
    why = why_skipped(s, env, have)
    if why:
        row.status, row.why = "skipped", why
        return
    pki = Path(env.pki_dir)
    req = s.request(env)
    slug = re.sub(r"[^a-z0-9]+", "-", s.name.lower()).strip("-")[:40]
    port = free_port()
    ctx: ssl.SSLContext | None = client_ssl(pki)
    admin_url = None
    if s.kind == "upstream":
        proc = start(f"{row.n:02d}-{slug}", cpus.wrap([PY, str(HERE / "upstream.py"), str(port)], "sut"), work)
        url, ctx = f"http://127.0.0.1:{port}", None
        err = wait_port(port, proc, 20)
    elif s.kind == "bare":
        cmd = [PY, str(HERE / "bareproxy.py"), str(port), env.upstream_url, str(pki / "server.pem"), str(pki / "server-key.pem")]
        proc = start(f"{row.n:02d}-{slug}", cpus.wrap(cmd, "sut"), work)
        url = f"https://127.0.0.1:{port}"
        err = wait_port(port, proc, 20)
    elif s.kind == "nginx":
        conf = nginx_conf(work, pki, port, env.upstream_url)
        proc = start(f"{row.n:02d}-{slug}", cpus.wrap(["nginx", "-c", str(conf), "-p", str(work)], "sut"), work)
        url = f"https://127.0.0.1:{port}"
        err = wait_port(port, proc, 20)
    else:
        from gateway.config import ConfigError, parse_config

        import yaml

        admin = free_port()
        cfg = portvakt_config(s, env, port, admin)
        cfg_path = work / f"{row.n:02d}-{slug}.yaml"
        text = yaml.safe_dump(cfg, sort_keys=False)
        cfg_path.write_text(text)
        try:
            parse_config(text, str(cfg_path))
        except ConfigError as e:
            row.status, row.why = "skipped", "config not accepted yet: " + "; ".join(e.problems[:3])
            return
        cmd = [PY, "-m", "gateway", "run", "--config", str(cfg_path), "--log-level", "WARNING"]
        proc = start(f"{row.n:02d}-{slug}", cpus.wrap(cmd, "sut"), work)
        url = f"https://127.0.0.1:{port}"
        admin_url = f"http://127.0.0.1:{admin}"
        err = wait_http(admin_url + "/readyz", proc, 120)
    try:
        if err:
            row.status, row.why = "failed", err
            return
        err = preflight(url, req, ctx, s.expect_upstream_headers)
        if err:
            row.status, row.why = ("skipped", err[6:]) if err.startswith("skip: ") else ("failed", err)
            return
        if admin_url and s.expect_filters:
            seen = filters_seen(admin_url)
            missing = [f for f in s.expect_filters if not any(v > 0 for k, v in seen.get(f, {}).items() if k != "deny")]
            if missing:
                row.status, row.why = "skipped", f"feature inactive: no decisions from filter(s) {', '.join(missing)}"
                return
        for name in s.expect_files:
            f = work / name
            deadline = time.monotonic() + 5
            while not (f.exists() and f.stat().st_size > 0) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not (f.exists() and f.stat().st_size > 0):
                row.status, row.why = "skipped", f"feature inactive: {name} was not written"
                return
        script = wrk_script(req, work / f"{row.n:02d}-{slug}.lua")
        if args.warmup > 0:
            run_wrk(url, script, args.warmup, args, cpus)
        m = run_wrk(url, script, args.duration, args, cpus)
        bad = sum(m.errors.values())
        if m.requests == 0:
            row.status, row.why = "failed", f"no request completed in {args.duration:g} s ({m.errors or 'no errors'})"
            return
        if bad > 0.01 * m.requests:
            row.status, row.why = "failed", f"{bad} of {m.requests} requests failed ({m.errors})"
            return
        if not proc.alive():
            row.status, row.why = "failed", f"process died during the run: {proc.tail()}"
            return
        row.status, row.m = "ok", m
        if m.errors:
            row.extra["errors"] = m.errors
    except Exception as e:  # noqa: BLE001 - one broken row must not end the run
        row.status, row.why = "failed", f"{type(e).__name__}: {e}"
    finally:
        proc.stop()


# ---- report ---------------------------------------------------------------------------------

def fmt_us(us: int) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us} µs"


def table(rows: list[Row], cpus: Cpus) -> str:
    by_name = {r.scenario.name: r for r in rows}
    bare = {"GET": by_name.get(sc.BARE_GET), "POST": by_name.get(sc.BARE_POST)}
    head = "| # | scenario | req/s | p50 | p99 | × bare proxy | vs reference |"
    sep = "|---|---|---:|---:|---:|---:|---|"
    if cpus.enabled:
        head += " CPU µs/req |"
        sep += "---:|"
    lines = [head, sep]
    for r in rows:
        s = r.scenario
        if r.status != "ok" or r.m is None:
            cells = [str(r.n), s.name, f"{r.status}: {r.why}".replace("|", "/").replace("\n", " ")[:300], "", "", "", ""]
            if cpus.enabled:
                cells.append("")
            lines.append("| " + " | ".join(cells) + " |")
            continue
        b = bare.get(s.request(Env("", "", "")).method)
        vs_bare = f"{r.m.rps / b.m.rps:.2f}" if b and b.status == "ok" and b.m else "–"
        ref = by_name.get(s.compare) if s.compare else None
        vs_ref = f"{r.m.rps / ref.m.rps:.2f} of #{ref.n}" if ref and ref.status == "ok" and ref.m else "–"
        cells = [str(r.n), s.name, f"{r.m.rps:,.0f}", fmt_us(r.m.p50_us), fmt_us(r.m.p99_us), vs_bare, vs_ref]
        if cpus.enabled:
            cells.append(f"{1e6 / r.m.rps:.0f}" if r.m.rps else "–")
        lines.append("| " + " | ".join(cells) + " |")
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
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({model}), Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per row (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each row (default 1)")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1, help="measure every row this many times (default 1)")
    ap.add_argument("--pick", choices=("median", "best"), default="median",
                    help="which round a row reports: median, or best (highest req/s: other load only slows "
                    "a row down, so on a busy shared machine the best round is closest to the truth)")
    ap.add_argument("--threads", type=int, default=None, help="wrk threads (default: 1 when pinned, else 2)")
    ap.add_argument("--only", nargs="*", default=None, help="run rows whose name contains one of these words (the bare rows always run)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--markdown", help="also write the table to this file")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs, wrk scripts)")
    args = ap.parse_args(argv)

    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk; `make bench` does it as root)", file=sys.stderr)
        return 2
    # SIGTERM/SIGHUP end the run like Ctrl-C does, so the processes it started are stopped.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(130))
    cpus = Cpus(not args.no_pin)
    if args.threads is None:
        args.threads = 1 if cpus.enabled else 2
    work = Path(tempfile.mkdtemp(prefix="portvakt-bench-"))
    procs: list[Proc] = []
    try:
        pki = prepare_pki(work)
        password, pw_hash = integration_credentials()
        crs = find_crs()
        have = {"redis": shutil.which("redis-server") is not None, "crs": crs is not None, "nginx": shutil.which("nginx") is not None}

        wanted = {s.name for s in sc.SCENARIOS if args.only is None or s.kind == "bare"
                  or any(w.lower() in s.name.lower() or w in s.tags for w in args.only)}
        by_name = {s.name: s for s in sc.SCENARIOS}
        for name in list(wanted):  # a row's reference runs too, so its ratio has a partner
            ref = by_name[name].compare
            while ref and ref not in wanted:
                wanted.add(ref)
                ref = by_name[ref].compare
        selected = [s for s in sc.SCENARIOS if s.name in wanted]

        up_port = free_port()
        upstream = start("upstream", cpus.wrap([PY, str(HERE / "upstream.py"), str(up_port)], "aux"), work)
        procs.append(upstream)
        err = wait_port(up_port, upstream, 20)
        if err:
            print(f"bench upstream did not start: {err}", file=sys.stderr)
            return 1
        redis_url = None
        if have["redis"] and any("redis" in s.needs for s in selected):
            rport = free_port()
            rdir = work / "redis"
            rdir.mkdir()
            redis = start("redis", cpus.wrap(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                              "--appendonly", "no", "--dir", str(rdir)], "aux"), work)
            procs.append(redis)
            if wait_port(rport, redis, 20) is None:
                redis_url = f"redis://127.0.0.1:{rport}/0"
            else:
                have["redis"] = False
        env = Env(
            work=str(work), pki_dir=str(pki), upstream_url=f"http://127.0.0.1:{up_port}", token=mint_token(pki),
            integration_password=password, integration_hash=pw_hash, redis_url=redis_url,
            crs_dir=str(crs) if crs else None,
        )

        print(f"# Portvakt bench — {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", file=sys.stderr)
        pin = f"process under test on CPU {cpus.sut}, wrk/upstream/Redis on CPU {cpus.aux}" if cpus.enabled else "not pinned"
        print(f"{machine()}; wrk -t{args.threads} -c{args.connections}, {args.duration:g} s per row "
              f"after {args.warmup:g} s warm-up; {pin}", file=sys.stderr)
        rows = [Row(i + 1, s) for i, s in enumerate(selected)]
        # Several rounds over all rows, then the median per row: load from other processes on a
        # shared machine shifts single rows, rarely the same row in every round.
        runs: dict[int, list[Measure]] = {r.n: [] for r in rows}
        for rnd in range(1, args.rounds + 1):
            for row in rows:
                if row.status in ("skipped", "failed"):
                    continue
                t0 = time.monotonic()
                attempt = Row(row.n, row.scenario)
                run_row(attempt, env, work, args, cpus, have)
                if attempt.m is not None:
                    runs[row.n].append(attempt.m)
                    res = f"{attempt.m.rps:,.0f} req/s, p50 {fmt_us(attempt.m.p50_us)}, p99 {fmt_us(attempt.m.p99_us)}"
                else:
                    row.status, row.why = attempt.status, attempt.why
                    res = f"{attempt.status}: {attempt.why}"
                tag = f"round {rnd}/{args.rounds} " if args.rounds > 1 else ""
                print(f"  {tag}[{row.n:2d}] {row.scenario.name}: {res} ({time.monotonic() - t0:.1f}s)",
                      file=sys.stderr, flush=True)
        for row in rows:
            ms = sorted(runs[row.n], key=lambda m: m.rps)
            if row.status == "pending" and ms:
                row.status, row.m = "ok", ms[-1] if args.pick == "best" else ms[len(ms) // 2]
                row.extra["rps_all"] = [round(m.rps) for m in runs[row.n]]

        md = "\n".join([
            f"Portvakt bench ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d}): {machine()}.",
            f"wrk -t{args.threads} -c{args.connections}, {args.duration:g} s per row"
            + (f", {args.pick} of {args.rounds} rounds" if args.rounds > 1 else "")
            + f", keep-alive over TLS on loopback; {pin}.",
            "× bare proxy: requests/s relative to the bare aiohttp TLS proxy with the same request shape, same run.",
            "",
            table(rows, cpus),
            "",
        ])
        print(md)
        if args.markdown:
            Path(args.markdown).write_text(md)
        if args.json:
            Path(args.json).write_text(json.dumps([
                {"n": r.n, "scenario": r.scenario.name, "status": r.status, "why": r.why,
                 **({"rps": r.m.rps, "p50_us": r.m.p50_us, "p90_us": r.m.p90_us, "p99_us": r.m.p99_us,
                     "requests": r.m.requests, "errors": r.m.errors, "rps_rounds": r.extra.get("rps_all")}
                    if r.m else {})}
                for r in rows
            ], indent=2))
        return 0
    finally:
        for p in reversed(procs):
            p.stop()
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
