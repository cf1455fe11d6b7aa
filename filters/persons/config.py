"""Config of persons' login: the ``persons:`` section and a route's ``person:`` policy.

The section turns Portvakt into an OpenID Connect relying party for ID-porten (or any OP that
speaks the same protocol): authorization code + PKCE S256, PAR, RFC 9207 ``iss``, client
authentication by ``private_key_jwt`` or a client secret, a server-side session behind a small
encrypted ``__Host-`` cookie. Every field is documented where it is declared.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from filters.issuers import ACR_RANKS
from filters.rate_limit import RateLimitRule
from gateway.configbase import Model

LOCALES = ("nb", "nn", "en", "se")


class ProviderConfig(Model):
    issuer: str = Field(
        description="The OP's issuer, compared exactly with discovery, id_token iss and the callback's iss"
    )
    discovery_url: str | None = Field(
        None, description="Metadata URL (default: issuer + /.well-known/openid-configuration)"
    )
    client_id: str = Field(description="This relying party's client_id at the OP")
    client_auth: Literal["private_key_jwt", "client_secret_basic", "client_secret_post"] = Field(
        "private_key_jwt", description="How Portvakt authenticates at the token, PAR and revocation endpoints"
    )
    client_key_file: str | None = Field(
        None, description="PEM RSA private key for private_key_jwt (RS256, 2048+ bits)"
    )
    client_key_id: str | None = Field(None, description="kid of the registered key (private_key_jwt)")
    client_secret: str | None = Field(None, description="Client secret (test environments); use ${ENV}")
    scopes: list[str] = Field(default_factory=lambda: ["openid", "profile"], description="Scopes asked for")
    par: Literal["auto", "required", "off"] = Field(
        "auto", description="Pushed authorization requests: when offered, always, never"
    )
    algorithms: list[str] = Field(
        default_factory=lambda: ["RS256"], description="id_token signature algorithms accepted"
    )
    require_sid: Literal["auto", "always", "never"] = Field(
        "auto",
        description="id_token sid: required when the OP advertises frontchannel_logout_session_supported (auto)",
    )
    frame_ancestors: list[str] = Field(
        default_factory=list,
        description="Origins allowed to frame the front-channel logout endpoint (default: the authorize endpoint's origin)",
    )
    end_session_method: Literal["post", "get"] = Field(
        "post",
        description="RP-initiated logout: an auto-submitted POST form (ID-porten recommends it) or a GET redirect",
    )
    timeout_seconds: float = Field(
        5.0, gt=0, le=60, description="Each call to the OP (discovery, PAR, token, JWKS)"
    )
    discovery_cache_seconds: float = Field(
        86400.0, gt=0, description="How long metadata is kept (ID-porten: 24 h)"
    )
    leeway_seconds: int = Field(5, ge=0, le=300, description="Clock skew allowed on exp/iat/auth_time")
    ca_file: str | None = Field(None, description="CA bundle for an https OP with a private CA")
    acr_values_default: str = Field(
        "idporten-loa-substantial", description="Level asked for when a route names none"
    )
    eidas_high_as_high: bool = Field(False, description="Treat eidas-loa-high as idporten-loa-high")

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http(s) URL")
        return v

    @field_validator("acr_values_default")
    @classmethod
    def _acr(cls, v: str) -> str:
        if v not in ACR_RANKS:
            raise ValueError(f"unknown acr {v!r}; known: {', '.join(ACR_RANKS)}")
        return v

    @model_validator(mode="after")
    def _auth(self) -> ProviderConfig:
        if self.client_auth == "private_key_jwt" and not self.client_key_file:
            raise ValueError("client_auth private_key_jwt needs client_key_file")
        if self.client_auth != "private_key_jwt" and not self.client_secret:
            raise ValueError(f"client_auth {self.client_auth} needs client_secret")
        return self


class CookieKey(Model):
    id: str = Field(description="Key id written into each cookie (rotation: newest first)")
    secret: str = Field(
        description="At least 32 characters; a SHA-256 of it is the AES-256-GCM key. Use ${ENV}"
    )

    @field_validator("secret")
    @classmethod
    def _len(cls, v: str) -> str:
        if len(v) < 32:
            raise ValueError("must be at least 32 characters")
        return v

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,16}", v):
            raise ValueError("1-16 letters, digits, '-' or '_'")
        return v


class SessionStoreConfig(Model):
    backend: Literal["memory", "redis"] = Field(
        "memory", description="memory: one process only; redis: fleets"
    )
    url: str | None = Field(
        None,
        description="Redis URL (backend redis): redis(s)://, unix://, redis(s)+sentinel://, redis(s)+cluster://",
    )
    key_prefix: str = Field("portvakt:sess:", description="Prefix of every key Portvakt writes")
    timeout_seconds: float = Field(
        1.0, gt=0, le=30, description="Per Redis operation; past it the request gets 503"
    )

    @model_validator(mode="after")
    def _url(self) -> SessionStoreConfig:
        from filters.redis_client import check_store_url

        check_store_url(self.backend, self.url)
        return self


class PersonsConfig(Model):
    enabled: bool = Field(True, description="Serve persons' login (routes with person: need it)")
    provider: ProviderConfig
    prefix: str = Field(
        "/portvakt", description="Reserved path prefix of the login endpoints (never proxied)"
    )
    redirect_uri: str | None = Field(
        None, description="Registered redirect URI (default: <scheme>://<host><prefix>/callback)"
    )
    post_logout_redirect_uri: str | None = Field(
        None, description="Registered URI the OP returns to after logout"
    )
    cookie_name: str = Field(
        "__Host-portvakt-session", description="Session cookie name (keep the __Host- prefix)"
    )
    cookie_keys: list[CookieKey] = Field(
        min_length=1, description="AEAD keys; the first encrypts, all decrypt"
    )
    store: SessionStoreConfig = Field(default_factory=SessionStoreConfig)
    idle_timeout_seconds: float = Field(
        1800, gt=0, description="Session ends after this long without a request (ID-porten: at most 30 min)"
    )
    absolute_timeout_seconds: float = Field(
        7200, gt=0, description="Session ends this long after login, whatever the activity"
    )
    refresh_leeway_seconds: float = Field(
        30, ge=0, description="Refresh the access token this long before it expires"
    )
    refresh_lock_seconds: float = Field(10, gt=0, description="Single-flight refresh lock lifetime")
    login_attempt_seconds: int = Field(600, ge=30, description="How long a started login may take")
    max_open_attempts: int = Field(
        10, ge=1, le=100, description="Open login attempts per browser (several tabs)"
    )
    login_loop_limit: int = Field(
        5, ge=1, description="Login starts per browser within login_loop_window_seconds before 429"
    )
    login_loop_window_seconds: float = Field(60, gt=0)
    ui_locales: list[str] = Field(
        default_factory=lambda: list(LOCALES), description="ui_locales a ?locale= may ask for"
    )
    allowed_redirect_hosts: list[str] = Field(
        default_factory=list, description="Absolute redirect targets allowed besides relative paths"
    )
    after_logout_path: str = Field("/", description="Where the browser lands after logout")
    rate_limits: list[RateLimitRule] = Field(
        default_factory=lambda: [
            RateLimitRule(
                per="client_ip", limit=300, period_seconds=60, stage="pre_auth", name="persons_login"
            )
        ],
        description="Rate limits of login start and callback (one budget for both; through rate_limit:'s "
        "backend); [] turns them off. The other login endpoints pass ingress only",
    )
    revoke_on_logout: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: revoke the refresh token when scopes go beyond openid profile"
    )

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not re.fullmatch(r"/[A-Za-z0-9._-]+", v):
            raise ValueError("one path segment, e.g. /portvakt")
        return v

    @field_validator("cookie_name")
    @classmethod
    def _cookie(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v):
            raise ValueError("cookie token characters only")
        return v

    @field_validator("ui_locales")
    @classmethod
    def _locales(cls, v: list[str]) -> list[str]:
        bad = [x for x in v if x not in LOCALES]
        if bad:
            raise ValueError(f"unknown locales {bad}; ID-porten knows {', '.join(LOCALES)}")
        return v

    @field_validator("after_logout_path")
    @classmethod
    def _after(cls, v: str) -> str:
        if not v.startswith("/") or v.startswith("//"):
            raise ValueError("a path starting with /")
        return v

    @model_validator(mode="after")
    def _times(self) -> PersonsConfig:
        if self.idle_timeout_seconds > self.absolute_timeout_seconds:
            raise ValueError("idle_timeout_seconds cannot exceed absolute_timeout_seconds")
        return self


class RoutePersonPolicy(Model):
    """A route's ``person:`` block: a logged-in person is required."""

    min_acr: str | None = Field(
        None, description="Lowest level admitted (step-up below it); default provider.acr_values_default"
    )
    prompt: Literal["login"] | None = Field(
        None, description="login: a login started for this route forces re-authentication"
    )
    forward_access_token: bool = Field(
        True, description="Send the session's access token as Authorization: Bearer"
    )

    @field_validator("min_acr")
    @classmethod
    def _acr(cls, v: str | None) -> str | None:
        if v is not None and v not in ACR_RANKS:
            raise ValueError(f"unknown acr {v!r}; known: {', '.join(ACR_RANKS)}")
        return v
