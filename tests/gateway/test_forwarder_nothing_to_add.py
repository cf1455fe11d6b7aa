"""Forwarder.headers answers {} at once when a request has no verified fact and no assertion is
signed (the minimal route's case). Every fact alone must still reach the upstream: a fact the
shortcut forgot would be silently dropped."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gateway.chain import BuildEnv
from gateway.identity import Forwarder, build_forwarder
from tests.gateway.helpers_audit import (
    certificate,
    idporten,
    integration,
    make_config,
    make_ctx,
    maskinporten,
)


def _forwarder(enabled: bool) -> Forwarder:
    cfg = make_config(identity={"assertion": {"enabled": enabled}})
    return build_forwarder(BuildEnv(config=cfg, base_dir=".", secrets={}))


def test_open_route_without_facts_or_assertion_adds_nothing() -> None:
    fwd = _forwarder(False)
    assert fwd.headers(make_ctx(make_config(), "open", path="/x")) == {}
    assert fwd.headers(make_ctx(make_config(), None, path="/x")) == {}


def test_the_assertion_alone_is_still_added() -> None:
    fwd = _forwarder(True)
    assert set(fwd.headers(make_ctx(make_config(), "open", path="/x"))) == {"X-Portvakt-Assertion"}


@pytest.mark.parametrize(
    ("fact", "value", "header"),
    [
        ("token", maskinporten(), "X-Portvakt-Consumer-Org"),
        ("token", idporten(), "X-Portvakt-Acr"),
        ("integration", integration(), "X-Portvakt-Integration-Id"),
        ("certificate", certificate(), "X-Portvakt-Certificate-Org"),
        ("target_org", "958935420", "X-Portvakt-Target-Org"),
        ("acting_org", "958935420", "X-Portvakt-Acting-Org"),
        (
            "person",
            SimpleNamespace(amr=("BankID",), auth_time=1_700_000_000, session="s1"),
            "X-Portvakt-Session",
        ),
    ],
)
def test_each_fact_alone_is_forwarded(fact: str, value: object, header: str) -> None:
    fwd = _forwarder(False)
    h = fwd.headers(make_ctx(make_config(), "open", path="/x", **{fact: value}))
    assert header in h


def test_the_routes_legal_basis_alone_is_forwarded() -> None:
    fwd = _forwarder(False)
    assert set(fwd.headers(make_ctx(make_config(), "cases"))) == {"X-Portvakt-Legal-Basis"}
