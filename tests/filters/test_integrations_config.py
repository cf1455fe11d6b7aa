"""Integration ids and org numbers in the config are exact (a YAML block scalar's
trailing newline made an integration that could never authenticate, silently)."""

from __future__ import annotations

import pytest
from argon2 import PasswordHasher

from gateway.config import ConfigError, parse_config
from tests.filters.helpers_identity import (
    FAST,
    GRANTING_ORG,
    INTEGRATION_ID,
    OTHER_ORG,
    OWNER_ORG,
    integration,
    make_config,
)

HASH = "$argon2id$v=19$m=65536,t=3,p=4$DN12ithEb5mZ4DYJSdXWbw$6g//KzkTNVDy7l+6q9Zuilsd4Na4m/VsTckgqvkjz/A"


def config(iid: str, org: str, grant_org: str) -> str:
    return f"""\
server: {{plain_http: true}}
upstreams: {{demo: {{url: "http://127.0.0.1:9001"}}}}
routes: [{{name: demo, upstream: demo}}]
integrations:
  - id: {iid}
    password_hash: "{HASH}"
    authorized_org: {org}
    grants: [{{organization: {grant_org}, services: [innsyn]}}]
"""


def test_trailing_newlines_are_config_errors():
    text = config('"7b1c9a52-0d3e-4a8f-9c61-2f5e8d4b1a07\\n"', '"991825827\\n"', '"958935420\\n"')
    with pytest.raises(ConfigError) as e:
        parse_config(text)
    where = sorted(p.split(": ")[1] for p in e.value.problems)
    assert where == [
        "integrations[0].authorized_org",
        "integrations[0].grants[0].organization",
        "integrations[0].id",
    ]


def test_exact_values_still_load():
    cfg = parse_config(config('"7B1C9A52-0d3e-4a8f-9c61-2f5e8d4b1a07"', '"991825827"', '"958935420"'))
    assert cfg.integrations[0].id == "7b1c9a52-0d3e-4a8f-9c61-2f5e8d4b1a07"


def test_header_name_of_organization_from_is_exact():
    text = config('"7b1c9a52-0d3e-4a8f-9c61-2f5e8d4b1a07"', '"991825827"', '"958935420"').replace(
        "routes: [{name: demo, upstream: demo}]",
        'routes: [{name: demo, upstream: demo, organization_from: "header:FiksOrgId\\n"}]',
    )
    with pytest.raises(ConfigError) as e:
        parse_config(text)
    assert {p.split(": ")[1] for p in e.value.problems} == {"routes[0].organization_from"}
    assert any("header:Name" in p for p in e.value.problems), e.value.problems


def test_rate_limit_key_prefix_is_exact():
    text = config('"7b1c9a52-0d3e-4a8f-9c61-2f5e8d4b1a07"', '"991825827"', '"958935420"')
    with pytest.raises(ConfigError) as e:
        parse_config(text + 'rate_limit: {key_prefix: "portvakt\\n"}\n')
    assert [p.split(": ")[1] for p in e.value.problems] == ["rate_limit.key_prefix"]


def test_rate_limit_tls_files_and_bad_redis_url_name_their_field(tmp_path):
    from filters.rate_limit import build_stage
    from gateway.chain import BuildEnv

    base = config('"7b1c9a52-0d3e-4a8f-9c61-2f5e8d4b1a07"', '"991825827"', '"958935420"').replace(
        "routes: [{name: demo, upstream: demo}]",
        "routes: [{name: demo, upstream: demo, rate_limits: [{per: route, limit: 5, period_seconds: 1}]}]",
    )
    cases = [
        (
            f'rate_limit: {{backend: "rediss://127.0.0.1:6379/0", tls_ca_file: {tmp_path}/missing-ca.pem}}\n',
            f"rate_limit.tls_ca_file: cannot read {tmp_path}/missing-ca.pem: ",
        ),
        (
            f'rate_limit: {{backend: "rediss://127.0.0.1:6379/0?ssl_ca_certs={tmp_path}/no-ca.pem"}}\n',
            f"rate_limit.backend (ssl_ca_certs): cannot read {tmp_path}/no-ca.pem: ",
        ),
    ]
    # A bad URL fails the load itself (filters.redis_client parses it), naming the field only.
    with pytest.raises(ConfigError) as ce:
        parse_config(base + 'rate_limit: {backend: "redis://:pw-s3cret@127.0.0.1:99999/0"}\n')
    assert any(": rate_limit.backend" in p for p in ce.value.problems), ce.value.problems
    assert "pw-s3cret" not in "\n".join(ce.value.problems)
    for extra, prefix in cases:
        cfg = parse_config(base + extra)
        with pytest.raises(ValueError) as e:
            build_stage(BuildEnv(config=cfg, base_dir=str(tmp_path), secrets={}))
        assert str(e.value).startswith(prefix) and "pw-s3cret" not in str(e.value), str(e.value)


# --- entries the config refuses ------------------------------------------------------------


@pytest.mark.parametrize(
    "entry,message",
    [
        (dict(id="nope"), "must be a UUID"),
        (dict(password_hash="plaintext"), "not an argon2 hash"),
        (
            dict(
                password_hash=PasswordHasher(
                    type=__import__("argon2").Type.I, time_cost=1, memory_cost=8, parallelism=1
                ).hash("x")
            ),
            "must be an argon2id hash",
        ),
        (dict(org="12345"), "9-digit"),
        (dict(grants=[{"organization": "958935420", "services": []}]), "at least one"),
    ],
)
def test_config_rejects_bad_entries(entry, message):
    kw = dict(entry)
    iid = kw.pop("id", INTEGRATION_ID)
    org = kw.pop("org", OWNER_ORG)
    with pytest.raises(ConfigError) as e:
        make_config([integration(iid, org=org, **kw)])
    assert message in str(e.value)


def test_config_normalises_id_and_rejects_duplicates():
    cfg = make_config([integration(INTEGRATION_ID.upper())])
    assert cfg.integrations[0].id == INTEGRATION_ID
    with pytest.raises(ConfigError, match="duplicate integration id"):
        make_config([integration(), integration(INTEGRATION_ID.upper())])


def test_grant_fixture_orgs_are_valid():
    from gateway.norid import is_org_number

    assert all(is_org_number(o) for o in (OWNER_ORG, GRANTING_ORG, OTHER_ORG))
    assert FAST.verify(FAST.hash("x"), "x")
