"""gateway/configcheck.py through `portvakt check-config`: every layer in one run, warnings apart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.configcheck import check

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=120,
        env=e,
    )


# Mistakes from every layer: schema (a wrong value, two mistyped keys, a broken upstream, a route
# without upstream), cross-checks (a non-CIDR, an unknown upstream, a duplicate route name), files
# (missing TLS certificate, missing JWKS file); and warnings (host bits, a shadowed route, detect).
BROKEN = """\
server:
  listen: "127.0.0.1:8443"
  workers: 0
  tls: {{certificate: {d}/no-cert.pem, private_key: {d}/no-key.pem}}
trusted_proxies: ["10.0.0.0/8", "not-a-cidr"]
upstreams:
  demo: {{url: "http://127.0.0.1:9001", timeout_second: 3}}
  broken: {{url: "ftp://127.0.0.1:21"}}
routes:
  - {{name: api, upstream: demo, match: {{path_prefix: "/api/"}}}}
  - {{name: api-v2, upstream: demo, match: {{path_prefix: "/api/v2/"}}}}
  - {{name: typo, upstream: demo, match: {{path_prefx: "/t/"}}}}
  - {{name: lost, upstream: nowhere, match: {{path_prefix: "/x/"}}}}
  - {{name: viabroken, upstream: broken, match: {{path_prefix: "/b/"}}}}
  - {{name: noupstream, match: {{path_prefix: "/n/"}}}}
  - {{name: lost, upstream: demo, match: {{path_prefix: "/y/"}}}}
issuers:
  mp: {{kind: maskinporten, issuer: "https://maskinporten.no/", audience: "https://api.example.no", jwks_file: {d}/no-jwks.json}}
ingress: {{allow_cidrs: ["192.168.1.1/24"]}}
waf: {{mode: detect}}
"""


@pytest.mark.e2e
def test_a_config_broken_in_every_layer_gives_every_line_in_one_run(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text(BROKEN.format(d=tmp_path))
    out = run("check-config", str(f))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert all(line.startswith(f"{f}: ") for line in lines), lines
    errors = [line[len(str(f)) + 2 :] for line in lines if ": warning: " not in line]
    warns = [line[len(str(f)) + 2 :] for line in lines if ": warning: " in line]
    assert sorted(e.split(": ")[0] for e in errors) == sorted(
        [
            "server.workers",  # schema
            "upstreams.demo.timeout_second",  # schema, did-you-mean
            "upstreams.broken.url",  # schema
            "routes[2].match.path_prefx",  # schema, did-you-mean
            "routes[5].upstream",  # schema (required)
            "trusted_proxies[1]",  # cross-check
            "routes[3].upstream",  # cross-check (unknown upstream)
            "routes[6].name",  # cross-check (duplicate)
            "server.tls",  # files
            "issuers.mp.jwks_file",  # files
        ]
    ), out.stdout
    assert "upstreams.demo.timeout_second: unknown key (did you mean 'timeout_seconds'?)" in errors
    assert "routes[2].match.path_prefx: unknown key (did you mean 'path_prefix'?)" in errors
    # The route whose upstream did not parse is not reported a second time as "unknown upstream".
    assert not any(e.startswith("routes[4]") for e in errors), errors
    assert sorted(w.split(": ")[0] for w in warns) == ["ingress.allow_cidrs[0]", "routes[1]", "waf.mode"], (
        warns
    )
    assert any("192.168.1.0/24" in w for w in warns)
    assert any("'api-v2' is never matched" in w and "'api'" in w for w in warns)


@pytest.mark.e2e
def test_json_format_and_exit_codes(tmp_path, pki):
    f = tmp_path / "broken.yaml"
    f.write_text(BROKEN.format(d=tmp_path))
    out = run("check-config", "--format", "json", str(f))
    assert out.returncode == 1
    doc = json.loads(out.stdout)
    assert doc["valid"] is False and doc["file"] == str(f)
    assert {e["layer"] for e in doc["errors"]} == {"schema", "cross", "files"}
    assert all(set(e) == {"severity", "layer", "path", "message"} for e in doc["errors"] + doc["warnings"])
    assert len(doc["warnings"]) == 3

    ok = tmp_path / "warn-only.yaml"
    ok.write_text(f"""\
server: {{tls: {{certificate: {pki.server_cert}, private_key: {pki.server_key}}}}}
upstreams: {{demo: {{url: "http://127.0.0.1:9001"}}}}
routes: [{{name: demo, upstream: demo}}]
trusted_proxies: ["10.1.2.3/16"]
""")
    out = run("check-config", str(ok))
    assert out.returncode == 0, out.stdout
    assert out.stdout.strip().splitlines()[-1] == "ok (1 warning)"
    assert run("check-config", "--strict", str(ok)).returncode == 1
    doc = json.loads(run("check-config", "--format", "json", str(ok)).stdout)
    assert doc["valid"] is True and doc["errors"] == [] and doc["warnings"][0]["path"] == "trusted_proxies[0]"
    assert run("check-config").returncode == 2  # usage


def shadow_warnings(tmp_path: Path, routes: str) -> list[str]:
    f = tmp_path / "r.yaml"
    f.write_text(
        'server: {plain_http: true}\nupstreams: {u: {url: "http://127.0.0.1:1"}}\nroutes:\n' + routes
    )
    report = check(str(f))
    assert not report.errors, report.errors
    return [w.path for w in report.warnings]


def test_shadowed_routes(tmp_path):
    # Catch-all last, disjoint prefixes, host-specific before generic: nothing shadowed.
    assert (
        shadow_warnings(
            tmp_path,
            """\
  - {name: down, upstream: u, match: {path_prefix: /down}}
  - {name: a, upstream: u, match: {path_prefix: /a/, hosts: [a.example]}}
  - {name: a-any, upstream: u, match: {path_prefix: /a/}}
  - {name: ab, upstream: u, match: {path_prefix: /ab}}
  - {name: all, upstream: u}
""",
        )
        == []
    )
    # "/a" (no slash) matches /a and /a/...: "/a/x/" after it is shadowed, "/ab" is not.
    assert shadow_warnings(
        tmp_path,
        """\
  - {name: a, upstream: u, match: {path_prefix: /a}}
  - {name: ax, upstream: u, match: {path_prefix: /a/x/}}
  - {name: ab, upstream: u, match: {path_prefix: /ab}}
  - {name: a-get, upstream: u, match: {path_prefix: /a, methods: [GET]}}
  - {name: host, upstream: u, match: {path_prefix: /a/, hosts: [h.example]}}
""",
    ) == ["routes[1]", "routes[3]", "routes[4]"]
    # An earlier route limited to some hosts does not shadow one for any host.
    assert shadow_warnings(
        tmp_path,
        """\
  - {name: h, upstream: u, match: {hosts: [a.example, b.example]}}
  - {name: any, upstream: u, match: {path_prefix: /x/}}
  - {name: b, upstream: u, match: {path_prefix: /x/, hosts: [B.example]}}
""",
    ) == ["routes[2]"]


def test_risky_settings_are_warnings(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("""\
server: {plain_http: true, listen: "0.0.0.0:8080"}
admin: {listen: "0.0.0.0:9090"}
trusted_proxies: ["0.0.0.0/0"]
upstreams: {u: {url: "http://127.0.0.1:1"}}
routes: [{name: r, upstream: u}]
rate_limit: {on_backend_error: allow}
waf: {mode: "off"}
""")
    report = check(str(f))
    assert not report.errors, report.errors
    paths = sorted(w.path for w in report.warnings)
    assert paths == ["admin.listen", "rate_limit.on_backend_error", "trusted_proxies[0]", "waf.mode"], paths
    f.write_text(
        f.read_text().replace(
            'admin: {listen: "0.0.0.0:9090"}',
            'admin: {listen: "0.0.0.0:9090", reload_token: "x-very-long-token-1234"}',
        )
    )
    assert "admin.listen" not in [w.path for w in check(str(f)).warnings]


@pytest.mark.e2e
def test_shipped_example_passes_its_own_check_without_etc_portvakt(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "gateway.dev.ca", str(tmp_path / "tls")],
        check=True,
        cwd=str(ROOT),
        capture_output=True,
        timeout=120,
    )
    out = run(
        "check-config", "--strict", "config/example.yaml", env={"PORTVAKT_TLS_DIR": str(tmp_path / "tls")}
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "ok"
    # The example names no /etc/portvakt path outside comments.
    assert "/etc/portvakt/" not in "".join(
        line.split("#", 1)[0] for line in (ROOT / "config" / "example.yaml").read_text().splitlines()
    )


@pytest.mark.e2e
def test_demo_config_checks_cleanly_after_make_dev_certs_on_a_fresh_checkout(tmp_path):
    """A fresh checkout (no certs/dev yet): `make dev-certs` (gateway.dev.ca certs/dev) then
    `portvakt check-config config/demo.yaml` passes; before it, the error names the command."""
    (tmp_path / "config").mkdir()
    demo = tmp_path / "config" / "demo.yaml"
    demo.write_text((ROOT / "config" / "demo.yaml").read_text())
    before = run("check-config", str(demo))
    assert before.returncode == 1
    assert "persons.provider.client_key_file: cannot read" in before.stdout + before.stderr
    assert "make dev-certs" in before.stdout + before.stderr
    subprocess.run(
        [sys.executable, "-m", "gateway.dev.ca", str(tmp_path / "certs" / "dev")],
        check=True,
        cwd=str(ROOT),
        capture_output=True,
        timeout=120,
    )
    key = tmp_path / "certs" / "dev" / "persons-client-key.pem"
    assert key.exists() and (key.stat().st_mode & 0o077) == 0
    after = run("check-config", str(demo))
    assert after.returncode == 0, after.stdout + after.stderr
