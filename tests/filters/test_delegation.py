"""filters/delegation on hand-built inputs: the grant rules, Altinn's answer flattened, config
cross-checks, the audit view's pseudonyms, the privilege filter for integrations, and the Redis
store's atomic last-admin rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from filters.delegation import PrivilegeFilter, config_problems, subject_ref
from filters.delegation.admin import Authority, decide
from filters.delegation.altinn import AltinnUnavailable, flatten
from filters.delegation.auditview import View, org_concerns
from filters.delegation.config import DelegationConfig, PrivilegeStoreConfig, RoutePrivilegePolicy
from filters.delegation.store import LastAdmin, RedisStore, SqliteStore
from gateway.chain import Allow, Deny
from gateway.config import Config
from gateway.context import IntegrationIdentity
from gateway.dev.altinn import demo_parties
from tests.filters.helpers_identity import ctx as make_ctx

ME, OTHER = "ref-me", "ref-other"


def _g(ref: str, role: str, service: str, gid: str = "g") -> dict:
    return {
        "id": gid,
        "organization": "910000005",
        "subject": {"kind": "person", "ref": ref, "display": "x"},
        "role": role,
        "service": service,
    }


@pytest.mark.parametrize(
    "mine, role, service, subject, expected",
    [
        ([("admin", "*")], "admin", "*", OTHER, None),
        ([("admin", "*")], "user", "post", OTHER, None),
        ([("admin", "*")], "admin", "*", ME, "self_grant"),  # grant yourself admin
        ([("admin", "post")], "send", "post", OTHER, None),
        ([("admin", "post")], "admin", "post", OTHER, "admin_grant_not_allowed"),  # cannot grant further
        ([("admin", "post")], "admin", "*", OTHER, "outside_service"),
        ([("admin", "post")], "send", "tax", OTHER, "outside_service"),
        ([("admin", "post")], "send", "*", OTHER, "outside_service"),
        ([("admin", "post")], "admin", "*", ME, "self_grant"),
        ([("send", "post")], "send", "post", OTHER, "not_admin"),  # a privilege is not administration
        ([], "user", "post", OTHER, "not_admin"),
    ],
)
def test_decide(mine, role, service, subject, expected):
    grants = [_g(ME, r, s, f"g{i}") for i, (r, s) in enumerate(mine)] + [_g(OTHER, "admin", "tax", "gx")]
    assert decide(Authority(grants, ME), ME, role, service, subject) == expected


def test_flatten_marks_deleted_parents_and_drops_person_ids():
    out = flatten(demo_parties())
    by = {p["org"]: p for p in out if p["org"]}
    assert by["910000013"]["parent"] == "910000005" and by["910000013"]["selectable"]
    assert not by["920000000"]["selectable"] and by["920000019"]["selectable"]
    assert by["930000004"]["deleted"] and not by["930000004"]["selectable"]
    person = next(p for p in out if p["type"] == "Person")
    assert not person["selectable"] and "24917397852" not in repr(out)
    # Malformed entries are dropped; a non-array answer is the source failing.
    assert (
        flatten(
            [{"name": "no uuid"}, 7, {"partyUuid": "u", "type": "Organization", "organizationNumber": "12"}]
        )[0]["selectable"]
        is False
    )
    with pytest.raises(AltinnUnavailable):
        flatten({"parties": []})


def _cfg(routes: list, **deleg) -> Config:
    base = {
        "upstreams": {"u": {"url": "http://127.0.0.1:9"}},
        "routes": routes,
        "persons": {
            "provider": {
                "issuer": "https://op.example",
                "client_id": "c",
                "client_auth": "client_secret_basic",
                "client_secret": "s",
            },
            "cookie_keys": [{"id": "k", "secret": "x" * 32}],
        },
        "delegation": {"subject_key": "k" * 32, **deleg},
    }
    return Config.model_validate(base)


def test_config_cross_checks():
    cfg = _cfg(
        [
            {"name": "a", "match": {"path_prefix": "/a/"}, "upstream": "u", "party": {}},
            {
                "name": "b",
                "match": {"path_prefix": "/b/"},
                "upstream": "u",
                "person": {},
                "privilege": {"role": "user"},
            },
            {
                "name": "c",
                "match": {"path_prefix": "/c/"},
                "upstream": "u",
                "service": "s",
                "person": {},
                "privilege": {"role": "root"},
            },
        ]
    )
    msgs = [m for _, m in config_problems(cfg)]
    assert any("needs person:" in m for m in msgs)
    assert any("no role source" in m for m in msgs)
    assert any("needs the route's service" in m for m in msgs)
    assert any("'root' is not in delegation.privileges" in m for m in msgs)
    with pytest.raises(ValueError):
        DelegationConfig.model_validate({"subject_key": "short"})
    with pytest.raises(ValueError):
        DelegationConfig.model_validate(
            {"subject_key": "k" * 32, "admins": [{"organization": "12", "person": "1"}]}
        )


def test_audit_view_pseudonyms_are_per_org_and_never_sealed():
    rec = {
        "type": "request",
        "path": "/x/~p:" + "a" * 32,
        "caller": {"person": {"pseudonym": "b" * 32, "sealed": "x25519:..."}},
        "facts": {"party": {"acting_org": "910000005"}},
        "mac": "m",
        "prev": "p",
    }
    v1, v2 = View(b"k" * 32, "910000005"), View(b"k" * 32, "920000019")
    s1, s2 = v1.scrub(rec), v2.scrub(rec)
    assert "sealed" not in repr(s1) and "mac" not in s1 and "a" * 32 not in s1["path"]
    assert s1["caller"]["person"]["pseudonym"] != s2["caller"]["person"]["pseudonym"]
    assert org_concerns(rec, "910000005") and not org_concerns(rec, "920000019")
    assert org_concerns({"type": "privilege_granted", "organization": "920000019"}, "920000019")
    assert not org_concerns({"type": "login_success", "organization": "920000019"}, "920000019")


class _Store:
    def __init__(self, grants):
        self._g = grants

    async def grants(self, org):
        return [g for g in self._g if g["organization"] == org]


class _Stage:
    def __init__(self, grants):
        self.store = _Store(grants)

    def person_ref(self, pid):
        return subject_ref(b"k" * 32, pid)


async def test_privilege_filter_for_integrations_needs_the_orgs_run_time_grant():
    iid = "7b1c9a52-0d3e-4a8f-9c61-2f5e8d4b1a07"
    grant = {
        "id": "g1",
        "organization": "958935420",
        "subject": {"kind": "integration", "ref": iid, "display": iid},
        "role": "send",
        "service": "post",
    }
    f = PrivilegeFilter(_Stage([grant]), RoutePrivilegePolicy(role="send"), "post")  # type: ignore[arg-type]
    c = make_ctx(integ=IntegrationIdentity(iid, "958935420"))
    c.target_org = "958935420"
    assert isinstance(await f.check(c), Allow)
    c.target_org = "910000005"  # another organisation has not granted it
    assert isinstance(await f.check(c), Deny)
    other = PrivilegeFilter(_Stage([grant]), RoutePrivilegePolicy(role="send"), "tax")  # type: ignore[arg-type]
    c.target_org = "958935420"
    assert isinstance(await other.check(c), Deny)
    assert isinstance(await f.check(make_ctx()), Deny)  # no subject at all


@pytest.mark.parametrize("backend", ["sqlite", "redis", "redis_cluster"])
async def test_store_last_admin_and_idempotent_add(backend, request, tmp_path):
    if backend != "sqlite":
        url = request.getfixturevalue(
            {"redis": "redis_server", "redis_cluster": "redis_cluster"}[backend]
        ).url
        store = RedisStore(PrivilegeStoreConfig(backend="redis", url=url))
    else:
        p = str(tmp_path / "p.sqlite")
        store = SqliteStore(PrivilegeStoreConfig(path=p), p)
    await store.start()
    try:
        a = _g(ME, "admin", "*", "g-a")
        assert (await store.add(a))[1] is True
        again, new = await store.add({**a, "id": "g-dup"})
        assert not new and again["id"] == "g-a"
        await store.add(_g(OTHER, "admin", "post", "g-s"))
        with pytest.raises(LastAdmin):  # a service admin does not keep the organisation administered
            await store.remove("910000005", "g-a")
        await store.add(_g(OTHER, "admin", "*", "g-b"))
        assert (await store.remove("910000005", "g-a"))["id"] == "g-a"
        with pytest.raises(LastAdmin):
            await store.remove("910000005", "g-b")
        assert await store.remove("910000005", "nope") is None
        assert {g["id"] for g in await store.of_subject("person", OTHER)} == {"g-s", "g-b"}
    finally:
        await store.close()


def test_the_demo_altinn_knows_the_readme_s_second_person_for_910000005_only():
    """README "Try it": the administrator grants to 14859050000, who then acts for 910000005."""
    from gateway.dev.altinn import DEMO_PID_2, FakeAltinn, colleague_parties
    from gateway.norid import is_pid

    root = Path(__file__).resolve().parents[2]
    assert is_pid(DEMO_PID_2) and DEMO_PID_2 in (root / "README.md").read_text(encoding="utf-8")
    selectable = [p["org"] for p in flatten(colleague_parties()) if p["selectable"]]
    assert selectable == ["910000005"]
    assert set(FakeAltinn(None).parties) == {"24917397852", DEMO_PID_2}
