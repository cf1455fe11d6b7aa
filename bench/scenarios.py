"""The bench's rows, as data: each scenario is a target kind, a request shape and (for Portvakt) a
config dict following the config sections of the issues. ``bench/run.py`` turns the request
shape into a wrk Lua script, the config into a YAML file, and measures.

Adding a row is adding a ``Scenario`` to ``SCENARIOS``. A Portvakt scenario names the stage
modules it needs (``modules``: they must import and expose their builder, else the row says
"skipped: ...") and the filters whose decisions must show up in ``/metrics`` after the preflight
request (``expect_filters``), so a row never measures a feature that silently did not run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# The org numbers of the dev PKI: the integration's owner, and the organisation granting it access.
CALLER_ORG = "991825827"
TARGET_ORG = "958935420"
INTEGRATION_ID = "5d0c6c1e-3f0a-4b7e-9a51-8c2f6e1d4b3a"
SERVICE = "bench"


@dataclass
class Env:
    """What the harness prepared for this run (paths, ports, credentials)."""

    work: str
    pki_dir: str
    upstream_url: str
    token: str = ""
    integration_password: str = ""
    integration_hash: str = ""
    redis_url: str | None = None
    crs_dir: str | None = None  # .../waf/crs (rules/ and crs-setup.conf.example inside)
    aux_pids: list[int] = field(default_factory=list)  # upstream, Redis: their CPU share is reported

    def path(self, name: str) -> str:
        return f"{self.work}/{name}"


@dataclass
class Request:
    method: str = "GET"
    path: str = "/bench/items/42"
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass
class Scenario:
    name: str
    kind: str  # "upstream" | "bare" | "nginx" | "portvakt"
    request: Callable[[Env], Request]
    config: Callable[[Env], dict[str, Any]] | None = None  # Portvakt config sections
    compare: str | None = None  # the row this one is compared with (besides the bare proxy)
    modules: tuple[str, ...] = ()  # "module:builder" that must exist
    expect_filters: tuple[str, ...] = ()
    expect_files: tuple[str, ...] = ()  # files in the work dir that must grow (audit trails)
    expect_upstream_headers: tuple[str, ...] = ()  # header names the upstream must receive
    needs: tuple[str, ...] = ()  # "redis", "crs", "nginx"
    tags: tuple[str, ...] = ()
    source: Any = None  # a directory with another revision's gateway/ and filters/ (run.py --compare)


# ---- request shapes ---------------------------------------------------------------------------


def _json_body() -> bytes:
    """A typical ~1 KB JSON API request (a case-file update), benign at any paranoia level 1 WAF."""
    doc = {
        "saksnummer": "2025/4711",
        "tittel": "Byggesak - tilbygg til enebolig, gnr 12 bnr 345",
        "status": "under_behandling",
        "saksbehandler": {"navn": "Kari Nordmann", "enhet": "Plan og bygg"},
        "mottatt": "2025-03-14T09:30:00+01:00",
        "frist": "2025-05-14",
        "parter": [
            {"rolle": "tiltakshaver", "navn": "Ola Hansen", "adresse": "Storgata 1, 0155 Oslo"},
            {"rolle": "ansvarlig_soker", "navn": "Byggmester Berg AS", "organisasjonsnummer": "974760673"},
        ],
        "dokumenter": [
            {
                "id": i,
                "tittel": f"Vedlegg {i}: situasjonsplan og fasadetegninger",
                "mimetype": "application/pdf",
                "storrelse": 183_000 + i * 1_337,
            }
            for i in range(1, 6)
        ],
        "merknad": "Naboene er varslet. Ingen merknader mottatt innen fristen.",
    }
    body = json.dumps(doc, ensure_ascii=False).encode()
    return body + b" " * max(0, 1024 - len(body))


JSON_BODY = _json_body()


def get_plain(env: Env) -> Request:
    return Request("GET", "/bench/items/42", {"Accept": "application/json"})


def post_json(env: Env) -> Request:
    return Request(
        "POST", "/bench/items", {"Accept": "application/json", "Content-Type": "application/json"}, JSON_BODY
    )


def _fiks_headers(env: Env) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {env.token}",
        "IntegrasjonId": INTEGRATION_ID,
        "IntegrasjonPassord": env.integration_password,
        "FiksOrgId": TARGET_ORG,
    }


def get_fiks(env: Env) -> Request:
    r = get_plain(env)
    r.headers.update(_fiks_headers(env))
    return r


def post_fiks(env: Env) -> Request:
    r = post_json(env)
    r.headers.update(_fiks_headers(env))
    return r


# ---- config pieces (shapes from the issues) ---------------------------------------------------


def minimal(env: Env) -> dict[str, Any]:
    """TLS, one route, ingress on (it is part of every route), every optional stage off."""
    return {
        "upstreams": {"bench": {"url": env.upstream_url, "max_connections": 100}},
        "routes": [{"name": "bench", "match": {"path_prefix": "/bench/"}, "upstream": "bench"}],
        "waf": {"mode": "off"},
        "audit": {"enabled": False},
        "identity": {"assertion": {"enabled": False}},
    }


def _route(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg["routes"][0]


AUDIENCE = "https://bench.portvakt.invalid/"  # what the bench issuer requires and its tokens carry


def with_identity(cfg: dict[str, Any], env: Env) -> dict[str, Any]:
    cfg["issuers"] = {
        "maskinporten": {
            "kind": "maskinporten",
            "issuer": "https://test.maskinporten.no/",
            "jwks_file": f"{env.pki_dir}/issuer-jwks.json",
            "audience": AUDIENCE,
        }
    }
    cfg["integrations"] = [
        {
            "id": INTEGRATION_ID,
            "password_hash": env.integration_hash,
            "authorized_org": CALLER_ORG,
            "grants": [{"organization": TARGET_ORG, "services": [SERVICE]}],
        }
    ]
    r = _route(cfg)
    r["service"] = SERVICE
    r["legal_basis"] = "bench (no personal data)"
    r["organization_from"] = "header:FiksOrgId"
    r["access"] = {"any_of": [{"integration": True, "scopes": ["ks:fiks"]}]}
    return cfg


def with_rate_limit(cfg: dict[str, Any], backend: str, identity: bool = False) -> dict[str, Any]:
    # Limits far above what the bench can send: every check runs, none refuses.
    cfg["rate_limit"] = {"backend": backend, "on_backend_error": "local"}
    if backend != "memory":
        # Every process sharing Redis must derive the same keys for client IPs and persons.
        cfg["rate_limit"]["pseudonym_key"] = "bench-pseudonym-key-not-a-secret-0123456789"
        # Leases (filters/rate_limit/README.md): the limits here are far above the load, so a
        # check takes 16 at once; without this line every request makes one round trip per rule.
        cfg["rate_limit"]["lease_checks"] = 16
    rules: list[dict[str, Any]] = [
        {
            "per": "client_ip",
            "limit": 10_000_000,
            "period_seconds": 1,
            "burst": 10_000_000,
            "stage": "pre_auth",
        }
    ]
    if identity:
        rules.append({"per": "integration", "limit": 10_000_000, "period_seconds": 1, "burst": 10_000_000})
    _route(cfg)["rate_limits"] = rules
    return cfg


def with_waf(cfg: dict[str, Any], env: Env, rules: str) -> dict[str, Any]:
    waf: dict[str, Any] = {"mode": "enforce", "rules": rules, "paranoia_level": 1}
    if rules == "crs":
        assert env.crs_dir is not None
        waf["crs_path"] = f"{env.crs_dir}/rules"
        waf["crs_setup"] = f"{env.crs_dir}/crs-setup.conf.example"
    cfg["waf"] = waf
    return cfg


def with_audit(cfg: dict[str, Any], env: Env, durability: str, tag: str) -> dict[str, Any]:
    cfg["audit"] = {
        "enabled": True,
        "path": env.path(f"audit-{tag}.jsonl"),
        "durability": durability,
        "key": "bench-audit-key-not-a-secret-0123456789",
    }
    return cfg


def with_assertion(cfg: dict[str, Any], env: Env) -> dict[str, Any]:
    # An ephemeral signing key (no key_dir): the signing cost is the same.
    cfg["identity"] = {"assertion": {"enabled": True}}
    return cfg


def catch_all(cfg: dict[str, Any], env: Env) -> dict[str, Any]:
    """One route for every path (the WAF corpora use /get, /post, /anything...)."""
    _route(cfg)["match"] = {"path_prefix": "/"}
    return cfg


def _c(*steps: Callable[[dict[str, Any], Env], dict[str, Any]]) -> Callable[[Env], dict[str, Any]]:
    def build(env: Env) -> dict[str, Any]:
        cfg = minimal(env)
        for s in steps:
            cfg = s(cfg, env)
        return cfg

    return build


TOKENS = ("filters.issuers:build_stage", "filters.access:build_stage")
INTEGRATIONS = TOKENS + ("filters.integrations:build_stage",)
RATELIMIT = ("filters.rate_limit:build_stage",)
WAF = ("filters.waf:build_stage",)
AUDIT = ("gateway.audit:build_audit",)
ASSERTION = ("gateway.identity:build_forwarder",)
IDENTITY_FILTERS = ("tokens", "integrations", "authorize")

BARE_GET = "bare aiohttp proxy, TLS"
BARE_POST = "bare aiohttp proxy, TLS, 1 KB JSON POST"
PV_GET = "Portvakt, TLS, minimal config"
PV_POST = "Portvakt, TLS, minimal, 1 KB JSON POST"
IDENTITY_GET = (
    "identity pipeline (TLS, token, integration, authorize, Redis limit leased 16, assertion, audit batch)"
)
IDENTITY_POST = "identity pipeline, 1 KB JSON POST"


def with_token_only(cfg: dict[str, Any], env: Env) -> dict[str, Any]:
    """The Maskinporten token alone: issuer configured, route admits the scope (authorize runs too,
    it is what reads the verified token)."""
    cfg = with_identity(cfg, env)
    del cfg["integrations"]
    r = _route(cfg)
    r["access"] = {"any_of": [{"organizations": [CALLER_ORG], "scopes": ["ks:fiks"]}]}
    del r["organization_from"]
    return cfg


def identity_pipeline(cfg: dict[str, Any], env: Env, tag: str) -> dict[str, Any]:
    """TLS + Maskinporten token + integration + authorize + Redis rate limit (client IP before,
    integration after authentication) + signed assertion + audit batch: the Fiks call without WAF."""
    cfg = with_identity(cfg, env)
    cfg = with_rate_limit(cfg, env.redis_url or "", identity=True)
    cfg = with_assertion(cfg, env)
    return with_audit(cfg, env, "batch", tag)


def _token_only_get(env: Env) -> Request:
    r = get_plain(env)
    r.headers["Authorization"] = f"Bearer {env.token}"
    return r


IDENTITY_EXPECT = dict(
    modules=INTEGRATIONS + RATELIMIT + AUDIT + ASSERTION,
    expect_filters=IDENTITY_FILTERS + ("rate_limit_pre", "rate_limit"),
    needs=("redis",),
    expect_upstream_headers=("x-portvakt-assertion",),
)

# Rows tagged "quick" are the --quick (CI smoke) set. Every Portvakt row is compared with the
# bare proxy of its request shape (the ratio the targets are stated in) and, where it adds one
# stage, with the minimal row ("compare").
SCENARIOS: list[Scenario] = [
    Scenario("upstream direct (HTTP, no proxy)", "upstream", get_plain, tags=("reference",)),
    Scenario(BARE_GET, "bare", get_plain, tags=("quick",)),
    Scenario("nginx proxy, TLS (reference)", "nginx", get_plain, needs=("nginx",), tags=("reference",)),
    Scenario(
        PV_GET, "portvakt", get_plain, _c(), compare=BARE_GET, expect_filters=("ingress",), tags=("quick",)
    ),
    Scenario(
        "+ token (Maskinporten RS256, verified once, cached)",
        "portvakt",
        _token_only_get,
        _c(with_token_only),
        compare=PV_GET,
        modules=TOKENS,
        expect_filters=("tokens", "authorize"),
        tags=("identity", "stage"),
    ),
    Scenario(
        "+ token + integration + authorize (grant)",
        "portvakt",
        get_fiks,
        _c(with_identity),
        compare=PV_GET,
        modules=INTEGRATIONS,
        expect_filters=IDENTITY_FILTERS,
        tags=("identity", "stage"),
    ),
    Scenario(
        "+ rate limit, in-process",
        "portvakt",
        get_plain,
        _c(lambda c, e: with_rate_limit(c, "memory")),
        compare=PV_GET,
        modules=RATELIMIT,
        expect_filters=("rate_limit_pre",),
        tags=("ratelimit", "stage"),
    ),
    Scenario(
        "+ rate limit, Redis (lease_checks 16)",
        "portvakt",
        get_plain,
        _c(lambda c, e: with_rate_limit(c, e.redis_url or "")),
        compare=PV_GET,
        modules=RATELIMIT,
        expect_filters=("rate_limit_pre",),
        needs=("redis",),
        tags=("ratelimit", "stage"),
    ),
    Scenario(
        "+ signed identity assertion (ES256)",
        "portvakt",
        get_plain,
        _c(with_assertion),
        compare=PV_GET,
        modules=ASSERTION,
        expect_upstream_headers=("x-portvakt-assertion",),
        tags=("identity", "assertion", "stage"),
    ),
    Scenario(
        "+ audit, batch (group commit)",
        "portvakt",
        get_plain,
        _c(lambda c, e: with_audit(c, e, "batch", "batch")),
        compare=PV_GET,
        modules=AUDIT,
        expect_files=("audit-batch.jsonl",),
        tags=("audit", "stage"),
    ),
    Scenario(
        IDENTITY_GET,
        "portvakt",
        get_fiks,
        _c(lambda c, e: identity_pipeline(c, e, "identity-get")),
        compare=PV_GET,
        expect_files=("audit-identity-get.jsonl",),
        tags=("identity", "pipeline", "quick"),
        **IDENTITY_EXPECT,
    ),
    Scenario(BARE_POST, "bare", post_json, tags=("quick",)),
    Scenario(PV_POST, "portvakt", post_json, _c(), compare=BARE_POST, expect_filters=("ingress",)),
    Scenario(
        IDENTITY_POST,
        "portvakt",
        post_fiks,
        _c(lambda c, e: identity_pipeline(c, e, "identity-post")),
        compare=PV_POST,
        expect_files=("audit-identity-post.jsonl",),
        tags=("identity", "pipeline"),
        **IDENTITY_EXPECT,
    ),
    Scenario(
        "full pipeline: identity pipeline + WAF built-in PL1, 1 KB JSON POST",
        "portvakt",
        post_fiks,
        _c(lambda c, e: identity_pipeline(c, e, "full"), lambda c, e: with_waf(c, e, "builtin")),
        compare=IDENTITY_POST,
        modules=INTEGRATIONS + RATELIMIT + WAF + AUDIT + ASSERTION,
        expect_filters=IDENTITY_FILTERS + ("waf", "rate_limit_pre", "rate_limit"),
        needs=("redis",),
        expect_files=("audit-full.jsonl",),
        expect_upstream_headers=("x-portvakt-assertion",),
        tags=("identity", "ratelimit", "waf", "audit", "pipeline", "quick"),
    ),
    Scenario(
        "full pipeline: identity pipeline + WAF OWASP CRS v4 PL1, 1 KB JSON POST",
        "portvakt",
        post_fiks,
        _c(lambda c, e: identity_pipeline(c, e, "full-crs"), lambda c, e: with_waf(c, e, "crs")),
        compare=IDENTITY_POST,
        modules=INTEGRATIONS + RATELIMIT + WAF + AUDIT + ASSERTION,
        expect_filters=IDENTITY_FILTERS + ("waf", "rate_limit_pre", "rate_limit"),
        needs=("redis", "crs"),
        expect_files=("audit-full-crs.jsonl",),
        expect_upstream_headers=("x-portvakt-assertion",),
        tags=("identity", "ratelimit", "waf", "audit", "pipeline"),
    ),
]
