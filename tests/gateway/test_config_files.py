"""Files referenced by the config (audit keys, JWKS files, CRLs, the audit directory) are
reported by `portvakt check-config` as ``file: yaml.path: reason``, all at once, never echoing a
secret."""

from __future__ import annotations

from pathlib import Path

from gateway.cli import check_config

PLAIN = """\
server: {listen: "127.0.0.1:8443", plain_http: true}
upstreams: {demo: {url: "http://127.0.0.1:9001"}}
routes: [{name: demo, upstream: demo}]
"""


def write(tmp_path: Path, extra: str) -> Path:
    f = tmp_path / "gw.yaml"
    f.write_text(PLAIN + extra)
    return f


def test_every_missing_referenced_file_is_listed_with_its_yaml_path(tmp_path):
    f = write(
        tmp_path,
        f"""\
audit: {{path: {tmp_path}/audit/audit.jsonl, key_file: {tmp_path}/no-such-key}}
issuers:
  mp: {{kind: maskinporten, issuer: "https://maskinporten.no/", jwks_file: {tmp_path}/no-such-jwks.json, audience: a}}
certificates: {{ca_file: {tmp_path}/no-such-ca.pem}}
""",
    )
    problems = check_config(str(f))
    paths = sorted(p.split(": ")[1] for p in problems)
    assert paths == ["audit.key_file", "certificates", "issuers.mp.jwks_file"], problems
    assert all(p.startswith(f"{f}: ") and "runtime:" not in p for p in problems), problems


def test_short_audit_key_from_env_names_the_key_not_its_value(tmp_path, monkeypatch):
    monkeypatch.setenv("REVIEW_AUDIT_KEY", "s3cr3t-v4lue")
    f = write(tmp_path, f'audit: {{path: {tmp_path}/a.jsonl, key: "${{REVIEW_AUDIT_KEY}}"}}\n')
    problems = check_config(str(f))
    assert problems == [f"{f}: audit.key: audit key must be at least 16 characters"]
    (tmp_path / "k").write_text("too-short\n")
    f = write(tmp_path, f"audit: {{path: {tmp_path}/a.jsonl, key_file: {tmp_path}/k}}\n")
    problems = check_config(str(f))
    assert len(problems) == 1 and problems[0].startswith(f"{f}: audit.key_file: "), problems
    assert "too-short" not in problems[0]


def test_auditor_public_key_that_is_not_a_key(tmp_path):
    (tmp_path / "auditor.pem").write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    f = write(
        tmp_path,
        f'audit: {{path: {tmp_path}/a.jsonl, key: "0123456789abcdef", '
        f"auditor_public_key: {tmp_path}/auditor.pem}}\n",
    )
    assert check_config(str(f)) == [
        f"{f}: audit.auditor_public_key: {tmp_path}/auditor.pem is not a PEM X25519 or RSA public key"
    ]
    f = write(
        tmp_path,
        f'audit: {{path: {tmp_path}/a.jsonl, key: "0123456789abcdef", '
        f"auditor_public_key: {tmp_path}/missing.pem}}\n",
    )
    problems = check_config(str(f))
    assert len(problems) == 1 and problems[0].startswith(f"{f}: audit.auditor_public_key: cannot read "), (
        problems
    )


def test_audit_path_under_a_regular_file(tmp_path):
    (tmp_path / "plainfile").write_text("x")
    f = write(tmp_path, f'audit: {{path: {tmp_path}/plainfile/audit.jsonl, key: "0123456789abcdef"}}\n')
    problems = check_config(str(f))
    assert problems == [f"{f}: audit.path: {tmp_path}/plainfile is not a directory"]


async def test_audit_file_that_cannot_be_opened_names_audit_path(tmp_path):
    import pytest

    from gateway.audit import build_audit
    from gateway.chain import BuildEnv
    from gateway.config import load_config

    (tmp_path / "plainfile").write_text("x")
    f = write(tmp_path, f'audit: {{path: {tmp_path}/plainfile/audit.jsonl, key: "0123456789abcdef"}}\n')
    sink = build_audit(BuildEnv(config=load_config(f), base_dir=str(tmp_path), secrets={}))
    with pytest.raises(ValueError, match=r"^audit\.path: cannot open the audit file "):
        await sink.start()


def test_upstream_ca_file_is_checked(tmp_path):
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    for ca, reason in (("missing.pem", "cannot read"), ("junk.pem", "holds no usable PEM certificate")):
        f = tmp_path / "gw.yaml"
        f.write_text(
            PLAIN.replace(
                '{url: "http://127.0.0.1:9001"}', f'{{url: "https://127.0.0.1:9001", ca_file: {ca}}}'
            )
        )
        problems = check_config(str(f))
        assert len(problems) == 1 and problems[0].startswith(f"{f}: upstreams.demo.ca_file: "), problems
        assert reason in problems[0]


def test_audit_redis_url_is_checked_at_load_without_echoing_it(tmp_path):
    for url in ("http://:pw-s3cret@127.0.0.1:6379/0", "redis://:pw-s3cret@127.0.0.1:99999/0"):
        f = write(
            tmp_path,
            f'audit: {{path: {tmp_path}/a.jsonl, key: "0123456789abcdef", redis: {{url: "{url}"}}}}\n',
        )
        problems = check_config(str(f))
        assert len(problems) == 1 and problems[0].startswith(f"{f}: audit.redis.url: "), problems
        assert "pw-s3cret" not in problems[0]


def test_a_key_given_twice_is_an_error_not_the_last_one_winning():
    import pytest

    from gateway.config import ConfigError, parse_config

    text = (
        PLAIN
        + """\
integrations:
  - id: "7b1c9a52-0d3e-4a8f-9c61-2f5e8d4b1a07"
    password_hash: "$argon2id$v=19$m=65536,t=3,p=4$DN12ithEb5mZ4DYJSdXWbw$6g//KzkTNVDy7l+6q9Zuilsd4Na4m/VsTckgqvkjz/A"
    authorized_org: "991825827"
    grants: [{organization: "958935420", services: [innsyn]}]
    grants: []
"""
    )
    with pytest.raises(ConfigError) as e:
        parse_config(text, "gw.yaml")
    assert e.value.problems == ["gw.yaml: line 9 column 5: invalid YAML: duplicate key 'grants'"]
    # merge keys (<<) are not duplicates
    cfg = parse_config(PLAIN + "ingress: {<<: {max_headers: 50}, max_uri_bytes: 4096}\n")
    assert cfg.ingress.max_headers == 50 and cfg.ingress.max_uri_bytes == 4096
