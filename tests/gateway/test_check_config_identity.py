"""`portvakt check-config` on the identity contract: issuers without an audience, the explicit
scope-bound opt-in for Maskinporten (a warning), and argon2 hashes below the floor (an error)."""

from __future__ import annotations

import pytest
from argon2 import PasswordHasher

from filters.integrations import ARGON2_FLOOR_KIB, below_floor
from tests.gateway.test_config import check_config

pytestmark = pytest.mark.e2e  # each test runs `portvakt check-config` in a subprocess

BASE = """\
server: {listen: "127.0.0.1:8443", plain_http: true}
upstreams: {demo: {url: "http://127.0.0.1:9001"}}
"""
ROUTES = """\
routes:
  - name: api
    upstream: demo
    access: {any_of: [{organizations: ["991825827"]}, {organizations: ["958935420"], scopes: ["ks:fiks"]}]}
"""


def write(tmp_path, text: str):
    f = tmp_path / "c.yaml"
    f.write_text(BASE + text)
    return f


def test_idporten_without_audience_is_an_error(tmp_path):
    out = check_config(
        write(
            tmp_path,
            ROUTES
            + """\
issuers:
  idp: {kind: idporten, issuer: "https://idporten.no", jwks_uri: "https://idporten.no/jwks.json"}
""",
        )
    )
    assert out.returncode == 1
    assert "issuers.idp" in out.stdout and "audience is required for an idporten issuer" in out.stdout


def test_maskinporten_without_audience_needs_the_explicit_opt_in(tmp_path):
    out = check_config(
        write(
            tmp_path,
            ROUTES
            + """\
issuers:
  mp: {kind: maskinporten, issuer: "https://maskinporten.no/", jwks_uri: "https://maskinporten.no/jwk"}
""",
        )
    )
    assert out.returncode == 1 and "tokens_without_audience: bound_by_scope" in out.stdout


def test_scope_bound_opt_in_loads_with_warnings(tmp_path):
    out = check_config(
        write(
            tmp_path,
            ROUTES
            + """\
issuers:
  mp: {kind: maskinporten, issuer: "https://maskinporten.no/", jwks_uri: "https://maskinporten.no/jwk",
       tokens_without_audience: bound_by_scope}
""",
        )
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith("ok (")
    warnings = [line for line in out.stdout.splitlines() if ": warning: " in line]
    assert any("issuers.mp.tokens_without_audience: warning: bound_by_scope" in w for w in warnings), (
        out.stderr
    )
    # The rule without a scope is named; the one requiring ks:fiks is not.
    assert any("routes[0].access.any_of[0]" in w for w in warnings), out.stderr
    assert not any("any_of[1]" in w for w in warnings)


def test_audience_given_no_warning(tmp_path):
    out = check_config(
        write(
            tmp_path,
            ROUTES
            + """\
issuers:
  mp: {kind: maskinporten, issuer: "https://maskinporten.no/", jwks_uri: "https://maskinporten.no/jwk",
       audience: ["https://api.example/", "https://api2.example/"]}
""",
        )
    )
    assert out.returncode == 0 and "warning" not in out.stderr, out.stderr


def test_weak_argon2_hash_refused(tmp_path):
    weak = PasswordHasher(time_cost=2, memory_cost=19455, parallelism=1).hash("x")
    out = check_config(
        write(
            tmp_path,
            f"""\
integrations:
  - {{id: "7b1c9a52-0d3e-4a8f-9c61-2f5e8d4b1a07", password_hash: "{weak}", authorized_org: "991825827"}}
""",
        )
    )
    assert out.returncode == 1
    assert "integrations[0].password_hash" in out.stdout and "below the floor" in out.stdout
    assert weak not in out.stdout  # the hash itself is not echoed
    # The documented escape hatch for test setups.
    out = check_config(
        write(
            tmp_path,
            f"""\
integrations_policy: {{password_hash_floor: none}}
integrations:
  - {{id: "7b1c9a52-0d3e-4a8f-9c61-2f5e8d4b1a07", password_hash: "{weak}", authorized_org: "991825827"}}
""",
        )
    )
    assert out.returncode == 0, out.stdout


def test_floor_table():
    def h(t: int, m: int) -> str:
        return f"$argon2id$v=19$m={m},t={t},p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo"

    for t, m in ARGON2_FLOOR_KIB.items():
        assert below_floor(h(t, m)) is None
        assert below_floor(h(t, m - 1)) is not None
    assert below_floor(h(9, 7168)) is None and below_floor(h(9, 7167)) is not None
    assert below_floor(h(3, 65536)) is None  # RFC 9106 low-memory (the hash-password default)
    assert below_floor(h(1, 8)) is not None
