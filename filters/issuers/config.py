"""The ``issuers:`` section: one entry per token issuer (Maskinporten, ID-porten), and what
``portvakt check-config`` warns about in it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from filters.jwks import check_algorithms, check_jwks_uri
from gateway.chain import Mode
from gateway.configbase import Model


class IssuerConfig(Model):
    kind: Literal["maskinporten", "idporten"] = Field(description="What shape of token this issuer mints")
    issuer: str = Field(
        description="Exact `iss` value (Maskinporten: with trailing slash; ID-porten: without)"
    )
    jwks_uri: str | None = Field(None, description="Where the issuer publishes its keys (https)")
    jwks_file: str | None = Field(
        None, description="A JWKS file instead of jwks_uri (air-gapped setups, tests)"
    )
    algorithms: list[str] = Field(
        default_factory=lambda: ["RS256", "RS384", "RS512"],
        description="Accepted `alg` values: RS*, PS*, ES* only (never HMAC or none)",
    )
    audience: str | list[str] | None = Field(
        None,
        description="Who this issuer's tokens must be for: one `aud` value or several (any one must be in the "
        "token's `aud`). Required for idporten; for maskinporten unless tokens_without_audience: bound_by_scope",
    )
    tokens_without_audience: Literal["refuse", "bound_by_scope"] = Field(
        "refuse",
        description="maskinporten only: bound_by_scope accepts tokens that carry no `aud` at all (Maskinporten "
        "issues such tokens unless the client asks for an audience); only the route's required scopes then bind "
        "them to this API. A token that carries an `aud` must still match `audience`. check-config warns",
    )
    require_typ_at_jwt: bool = Field(
        False,
        description="Accept only tokens whose JOSE `typ` is at+jwt (RFC 9068): for issuers that mark every access token",
    )
    leeway_seconds: int = Field(30, ge=0, le=600, description="Clock skew tolerated on exp, nbf and iat")
    max_token_lifetime_seconds: int | None = Field(
        3600,
        ge=1,
        description="Refuse tokens living longer (exp - iat, or exp - now beyond the leeway; reason "
        "token_lifetime_too_long) and cache none longer than this. Maskinporten and ID-porten access tokens "
        "live 120 s by default; null: no bound",
    )
    jwks_cache_seconds: int = Field(3600, gt=0, description="Age after which the key set is refreshed")
    jwks_refetch_min_seconds: float = Field(
        30.0, ge=0, description="At most one on-demand refetch (unknown kid) per this many seconds"
    )
    jwks_timeout_seconds: float = Field(5.0, gt=0, le=60, description="Total time allowed for one JWKS fetch")
    jwks_retry_max_seconds: float = Field(
        60.0, gt=0, description="Longest backoff between retries while the keys were never obtained"
    )
    mode: Mode = Field(
        Mode.enforce, description="off: tokens from this issuer are ignored; detect: failures only recorded"
    )

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, v: list[str]) -> list[str]:
        return check_algorithms(v)

    @field_validator("jwks_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        return None if v is None else check_jwks_uri(v)

    @field_validator("audience")
    @classmethod
    def _audience(cls, v: str | list[str] | None) -> str | list[str] | None:
        values = [v] if isinstance(v, str) else v
        if values is not None and (not values or any(not a.strip() for a in values)):
            raise ValueError("must name at least one non-empty audience")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> IssuerConfig:
        if (self.jwks_uri is None) == (self.jwks_file is None):
            raise ValueError("set exactly one of jwks_uri and jwks_file")
        if self.kind == "idporten":
            if self.tokens_without_audience != "refuse":
                raise ValueError("tokens_without_audience: bound_by_scope is for maskinporten only")
            if self.audience is None:
                raise ValueError(
                    "audience is required for an idporten issuer: without it a token issued for another API "
                    "(or an id_token of another client) would be accepted"
                )
        elif self.audience is None and self.tokens_without_audience != "bound_by_scope":
            raise ValueError(
                "set audience (who this API is, as the issuer writes it in `aud`), or say explicitly that scope "
                "alone binds this issuer's tokens: tokens_without_audience: bound_by_scope"
            )
        return self

    @property
    def audiences(self) -> frozenset[str]:
        a = self.audience
        return frozenset() if a is None else frozenset([a] if isinstance(a, str) else a)


def config_warnings(cfg: Any) -> list[str]:
    """What ``portvakt check-config`` warns about (valid, but weaker than it looks): issuers whose
    tokens without ``aud`` are bound by scope alone, and routes that admit such tokens without
    requiring a scope (any token of that issuer, meant for any API, would pass them)."""
    out: list[str] = []
    scope_bound = [name for name, ic in cfg.issuers.items() if ic.tokens_without_audience == "bound_by_scope"]
    for name in scope_bound:
        out.append(
            f"issuers.{name}.tokens_without_audience: bound_by_scope: a token without `aud` is accepted on its "
            "scopes alone; every route admitting it must require a scope that only this API's clients get"
        )
    if scope_bound:
        for i, route in enumerate(cfg.routes):
            if route.access is None:
                continue
            for j, rule in enumerate(route.access.any_of):
                if (rule.integration or rule.organizations) and not rule.scopes:
                    out.append(
                        f"routes[{i}].access.any_of[{j}] (route {route.name!r}): admits Maskinporten tokens without "
                        f"requiring a scope while {', '.join(scope_bound)} accepts tokens without `aud`"
                    )
    return out
