"""gateway/config.py through `portvakt check-config`: every problem listed with its YAML path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]


def check_config(path: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(path)],
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=60,
        env=e,
    )


THREE_MISTAKES = """\
server:
  listen: "127.0.0.1:8443"
  plain_http: true
  workers: 0
upstreams:
  demo: {url: "ftp://127.0.0.1:9001"}
routes:
  - name: demo
    match: {path_prefix: "/", methodz: [GET]}
    upstream: demo
"""


@pytest.mark.e2e
def test_three_mistakes_give_three_lines_with_yaml_paths(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(THREE_MISTAKES)
    out = check_config(f)
    assert out.returncode == 1
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3, out.stdout
    assert all(line.startswith(f"{f}: ") for line in lines)
    paths = sorted(line.split(": ")[1] for line in lines)
    assert paths == ["routes[0].match.methodz", "server.workers", "upstreams.demo.url"]
    assert "Traceback" not in out.stdout + out.stderr


def in_process(path: Path) -> list[str]:
    from gateway.cli import check_config as run_check

    return run_check(str(path))


@pytest.mark.e2e
def test_valid_file_prints_ok(tmp_path, pki):
    f = tmp_path / "good.yaml"
    f.write_text(f"""\
server:
  tls: {{certificate: {pki.server_cert}, private_key: {pki.server_key}}}
upstreams:
  demo: {{url: "http://127.0.0.1:9001"}}
routes:
  - {{name: demo, upstream: demo}}
""")
    out = check_config(f)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "ok"


def test_missing_file_unknown_env_and_bad_yaml_are_reported(tmp_path):
    [line] = in_process(tmp_path / "absent.yaml")
    assert "cannot read" in line
    f = tmp_path / "env.yaml"
    f.write_text("upstreams:\n  demo: {url: '${PORTVAKT_TEST_UNSET_VAR}'}\nserver: {plain_http: true}\n")
    assert f"{f}: upstreams.demo.url: environment variable PORTVAKT_TEST_UNSET_VAR is not set" in in_process(
        f
    )
    f.write_text("routes: [unclosed\n")
    [line] = in_process(f)
    assert "invalid YAML" in line and "line 2" in line


def test_tls_files_are_checked(tmp_path):
    f = tmp_path / "tls.yaml"
    f.write_text("server:\n  tls: {certificate: nope.pem, private_key: nope-key.pem}\n")
    problems = in_process(f)
    assert any("cannot load certificate" in p and str(tmp_path / "nope.pem") in p for p in problems)


def test_env_interpolation_and_relative_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("PV_UPSTREAM", "http://10.0.0.5:8080")
    f = tmp_path / "c.yaml"
    f.write_text(
        "server: {tls: {certificate: certs/s.pem, private_key: certs/k.pem}}\n"
        "upstreams: {a: {url: '${PV_UPSTREAM}/'}, b: {url: '${PV_MISSING:-http://b:1}'}}\n"
    )
    cfg = load_config(f)
    assert cfg.upstreams["a"].url == "http://10.0.0.5:8080"
    assert cfg.upstreams["b"].url == "http://b:1"
    assert cfg.resolve_path(cfg.server.tls.certificate) == str(tmp_path / "certs" / "s.pem")


def test_the_model_is_frozen_and_cross_checks_run():
    cfg = parse_config("server: {plain_http: true}\n")
    with pytest.raises(ValidationError):
        cfg.server.workers = 3  # type: ignore[misc]
    with pytest.raises(ConfigError) as e:
        parse_config(
            "server: {tls: {certificate: a, private_key: b, client_certificate: required}}\n"
            "trusted_proxies: [not-a-cidr]\n",
            "x.yaml",
        )
    assert e.value.problems == [
        "x.yaml: server.tls.client_ca: required when client_certificate is optional or required",
        "x.yaml: trusted_proxies[0]: not a CIDR: 'not-a-cidr'",
    ]


@pytest.mark.parametrize("name", ["demo.yaml", "example.yaml"])
def test_shipped_configs_parse(name):
    cfg = load_config(ROOT / "config" / name)
    assert cfg.routes and cfg.upstreams
