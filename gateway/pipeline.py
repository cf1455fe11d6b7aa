"""The pipeline, declared once: every policy stage in one typed, ordered list.

Each ``StageDecl`` says what the stage owns: its config section(s) (the ``Config`` model is
assembled from them in gateway/config.py), its per-route section(s) (assembled into
``RouteConfig``), its cross-section checks, its builder, and the chain position of each filter
it contributes, by the filter's ``name``. The runtime (gateway/runtime.py) builds the stages in
this order and orders each route's filters by the declared positions.

Adding a filter: its own package (config model, ``build_stage``, Filter/Stage) plus one entry
here. Nothing is looked up by name at run time; a declaration without a builder is refused when
this module loads.

The two roles that are not filters are declared here too, with their interfaces in
gateway/chain.py: the audit sink (``audit:``) and the identity forwarder (``identity:``,
``routes[].forward``).

Layering (tests/test_layers.py): this module is part of the assembly layer, like gateway/config,
gateway/runtime and the server; the stages it lists depend only on the core.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import filters.access
import filters.certificates
import filters.delegation
import filters.ingress
import filters.integrations
import filters.issuers
import filters.persons
import filters.rate_limit
import filters.waf
from filters.access import AccessPolicy
from filters.certificates import CertificatesConfig
from filters.delegation.config import DelegationConfig, RoutePartyPolicy, RoutePrivilegePolicy
from filters.ingress import IngressConfig
from filters.integrations import IntegrationConfig, IntegrationsPolicyConfig
from filters.issuers import IssuerConfig
from filters.persons.config import PersonsConfig, RoutePersonPolicy
from filters.rate_limit import RateLimitConfig, RateLimitRule
from filters.waf.config import RouteWafConfig, WafConfig
from gateway.audit import AuditConfig
from gateway.chain import BuildEnv, Stage
from gateway.configbase import ConfigBase, RouteBase
from gateway.identity import IdentityConfig, RouteForwardConfig

Problems = list[tuple[tuple[Any, ...], str]]  # (yaml path, message)


@dataclass(frozen=True, slots=True)
class Section:
    """One config key a stage owns: its type, its default and the help text of the reference."""

    key: str
    annotation: Any
    description: str
    default: Any = None
    default_factory: Callable[[], Any] | None = None


@dataclass(frozen=True, slots=True)
class StageDecl:
    """A policy stage: what it reads from the config and where its filters sit in the chain."""

    name: str
    builder: Callable[[BuildEnv], Stage | None]
    sections: tuple[Section, ...] = ()
    route_sections: tuple[Section, ...] = ()
    # Chain position of each filter this stage contributes, by filter name (lower runs first).
    positions: Mapping[str, int] = field(default_factory=dict)
    checks: Callable[[ConfigBase], Problems] | None = None  # cross-section checks at load
    route_checks: Callable[[RouteBase], Problems] | None = None  # per route, paths below the route

    def __post_init__(self) -> None:
        if not callable(self.builder):
            raise TypeError(f"pipeline stage {self.name!r} declares no builder")


# Chain order (the positions): the persons' cookie strip before anything (the upstream never sees
# Portvakt's cookies); ingress; the pre-auth rate limit before anything that costs CPU (WAF,
# signatures, argon2); WAF; credentials (certificate, person session and party, token,
# integration); authorize, then run-time privileges under it; the rate limit by identity last.
PIPELINE: tuple[StageDecl, ...] = (
    StageDecl(
        "ingress",
        filters.ingress.build_stage,
        sections=(
            Section(
                "ingress",
                IngressConfig,
                "Client address, host and size limits",
                default_factory=IngressConfig,
            ),
        ),
        positions={"ingress": 10},
    ),
    StageDecl(
        "rate_limit",
        filters.rate_limit.build_stage,
        sections=(
            Section(
                "rate_limit",
                RateLimitConfig,
                "Rate limiter backend and behaviour",
                default_factory=RateLimitConfig,
            ),
        ),
        route_sections=(
            Section("rate_limits", list[RateLimitRule], "Rate limits of this route", default_factory=list),
        ),
        positions={"rate_limit_pre": 20, "rate_limit": 80},
    ),
    StageDecl(
        "waf",
        filters.waf.build_stage,
        sections=(Section("waf", WafConfig, "Web application firewall", default_factory=WafConfig),),
        route_sections=(
            Section("waf", RouteWafConfig, "WAF exclusions for this route", default_factory=RouteWafConfig),
        ),
        positions={"waf": 30},
    ),
    StageDecl(
        "certificates",
        filters.certificates.build_stage,
        sections=(
            Section(
                "certificates",
                CertificatesConfig,
                "Enterprise client certificates",
                default_factory=CertificatesConfig,
            ),
        ),
        positions={"certificates": 40},
    ),
    StageDecl(
        "issuers",
        filters.issuers.build_stage,
        sections=(
            Section(
                "issuers",
                dict[str, IssuerConfig],
                "Token issuers (Maskinporten, ID-porten) by name",
                default_factory=dict,
            ),
        ),
        positions={"tokens": 50},
    ),
    StageDecl(
        "integrations",
        filters.integrations.build_stage,
        sections=(
            Section(
                "integrations",
                list[IntegrationConfig],
                "Fiks integrations and their grants",
                default_factory=list,
            ),
            Section(
                "integrations_policy",
                IntegrationsPolicyConfig,
                "Integrations filter mode and brute-force limits",
                default_factory=IntegrationsPolicyConfig,
            ),
        ),
        positions={"integrations": 60},
    ),
    StageDecl(
        "access",
        filters.access.build_stage,
        route_sections=(
            Section("access", AccessPolicy | None, "Who may call; absent: no credential required"),
        ),
        positions={"authorize": 70},
        route_checks=filters.access.route_policy_problems,
    ),
    StageDecl(
        "persons",
        filters.persons.build_stage,
        sections=(
            Section("persons", PersonsConfig | None, "Persons' login: OIDC relying party (ID-porten)"),
        ),
        route_sections=(
            Section("person", RoutePersonPolicy | None, "A logged-in person is required (persons: login)"),
        ),
        positions={"persons_cookies": 1, "persons": 45},
        checks=filters.persons.config_problems,
    ),
    StageDecl(
        "delegation",
        filters.delegation.build_stage,
        sections=(
            Section(
                "delegation",
                DelegationConfig | None,
                "Acting for organisations (Altinn parties), run-time privileges, admin API, org audit view",
            ),
        ),
        route_sections=(
            Section(
                "party",
                RoutePartyPolicy | None,
                "The person acts for an organisation they chose (delegation:)",
            ),
            Section(
                "privilege",
                RoutePrivilegePolicy | None,
                "A run-time grant for this route's service (delegation:)",
            ),
        ),
        positions={"party": 47, "privilege": 75},
        checks=filters.delegation.config_problems,
    ),
)


@dataclass(frozen=True, slots=True)
class RoleDecl:
    """A role that is not a filter (the audit sink, the identity forwarder): its sections."""

    name: str
    sections: tuple[Section, ...] = ()
    route_sections: tuple[Section, ...] = ()


AUDIT = RoleDecl(
    "audit",
    sections=(Section("audit", AuditConfig, "Audit trail", default_factory=AuditConfig),),
)
FORWARDER = RoleDecl(
    "identity",
    sections=(
        Section(
            "identity",
            IdentityConfig,
            "Identity headers and the signed assertion forwarded upstream",
            default_factory=IdentityConfig,
        ),
    ),
    route_sections=(
        Section(
            "forward",
            RouteForwardConfig,
            "What identity this route forwards upstream",
            default_factory=RouteForwardConfig,
        ),
    ),
)
ROLES: tuple[RoleDecl, ...] = (AUDIT, FORWARDER)


def chain_positions(pipeline: tuple[StageDecl, ...] = PIPELINE) -> dict[str, int]:
    """Filter name -> chain position, over every declared stage. A name declared twice is an error."""
    out: dict[str, int] = {}
    for decl in pipeline:
        for name, pos in decl.positions.items():
            if name in out:
                raise ValueError(f"pipeline: filter {name!r} declared twice")
            out[name] = pos
    return out


def _check_unique(pipeline: tuple[StageDecl, ...]) -> None:
    seen: set[str] = set()
    route_seen: set[str] = set()
    for decl in (*pipeline, *ROLES):
        for s in decl.sections:
            if s.key in seen:
                raise ValueError(f"pipeline: config section {s.key!r} declared twice")
            seen.add(s.key)
        for s in decl.route_sections:
            if s.key in route_seen:
                raise ValueError(f"pipeline: route section {s.key!r} declared twice")
            route_seen.add(s.key)
    chain_positions(pipeline)


_check_unique(PIPELINE)
