"""Red team 3, F08: a route's policy section written as ``person:`` with nothing under it (or with
every setting commented out) is YAML null, which read as "no person policy": the login route was
public, and check-config said nothing. The same for ``access:``, ``party:`` and ``privilege:``."""

from __future__ import annotations

import pytest

from gateway.configcheck import check

BASE = """\
upstreams: {{u: {{url: "http://127.0.0.1:1"}}}}
persons:
  provider: {{issuer: "http://127.0.0.1:1", client_id: c, client_auth: client_secret_basic, client_secret: s}}
  cookie_keys: [{{id: k1, secret: "0123456789abcdef0123456789abcdef"}}]
routes:
  - name: minside
    match: {{path_prefix: /minside/}}
    upstream: u
{section}
  - name: public
    upstream: u
"""


@pytest.mark.parametrize(
    "section,key",
    [
        ("    person:\n      # min_acr: idporten-loa-high", "person"),
        ("    person: null", "person"),
        ("    person:\n    forward: {person: true}", "person"),
        ("    person: {}\n    party:", "party"),
        ("    person: {}\n    privilege: ~", "privilege"),
        ("    service: s\n    access:\n      # any_of: [{integration: true}]", "access"),
    ],
)
def test_an_empty_policy_section_is_an_error_not_a_public_route(tmp_path, section, key):
    f = tmp_path / "c.yaml"
    f.write_text(BASE.format(section=section))
    report = check(str(f))
    paths = [e.path for e in report.errors]
    assert f"routes[0].{key}" in paths, [(e.path, e.message) for e in report.errors]
    msg = next(e.message for e in report.errors if e.path == f"routes[0].{key}")
    assert "policy off" in msg


@pytest.mark.parametrize("section", ["    person: {}", "    person: {min_acr: idporten-loa-high}", ""])
def test_a_written_or_absent_section_still_loads(tmp_path, section):
    f = tmp_path / "c.yaml"
    f.write_text(BASE.format(section=section))
    report = check(str(f))
    assert not [e for e in report.errors if e.path.startswith("routes[0]")], report.errors
