"""The config base of the core: the frozen ``Model`` every config section derives from, and the
two base models the gateway assembles its config from (``ConfigBase``, ``RouteBase``).

Part of the core layer (tests/test_layers.py): it imports nothing of the project. A stage
declares its own section next to the code that uses it (``filters/rate_limit`` declares
``rate_limit:``); gateway/pipeline.py lists the stages and gateway/config.py assembles the
``Config`` and ``RouteConfig`` models from that list. A stage that needs to name the whole
config or a route in a type annotation uses ``ConfigBase`` / ``RouteBase``: their sections are
added at assembly, so a type checker reads them as ``Any``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# The methods a route (and ingress.allowed_methods) may name; gateway.config re-exports it.
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class MatchConfig(Model):
    path_prefix: str = Field("/", description="Route matches paths starting with this prefix")
    methods: list[str] = Field(
        default_factory=lambda: list(HTTP_METHODS),
        description="Methods this route serves; checked after the match (others get 405, no fall-through)",
    )
    hosts: list[str] = Field(default_factory=list, description="Host header values (empty: any)")

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with /")
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        out = [m.upper() for m in v]
        bad = [m for m in out if m not in HTTP_METHODS]
        if bad:
            raise ValueError(f"unknown methods {bad}; allowed: {', '.join(HTTP_METHODS)}")
        return out


class RouteAuditConfig(Model):
    query_string: bool = Field(False, description="Keep the query string in audit records of this route")


class RouteBase(Model):
    """A route's own fields; each stage's per-route section (``access``, ``rate_limits``, ``waf``,
    ...) is added by gateway/config.py from the pipeline's declarations."""

    name: str = Field(description="Route name: a metric label and audit field")
    match: MatchConfig = Field(
        default_factory=MatchConfig,
        description="What requests this route takes (first match in file order wins)",
    )
    upstream: str = Field(description="Name of an entry under upstreams:")
    service: str | None = Field(None, description="The service this route exposes (what grants name)")
    legal_basis: str | None = Field(
        None, description="Legal basis recorded in audit (e.g. 'offentleglova § 3')"
    )
    organization_from: str | None = Field(
        None,
        description='Where the target organisation is: "path:/orgs/{organization}/" or "header:FiksOrgId"; '
        "needs access: rules (an integration's grant is checked in it)",
    )
    audit: RouteAuditConfig = Field(
        default_factory=RouteAuditConfig, description="Audit options of this route"
    )

    @field_validator("access", "person", "party", "privilege", mode="before", check_fields=False)
    @classmethod
    def _policy_section_not_empty(cls, v: Any, info: Any) -> Any:
        # ``person:`` with nothing under it (or every setting commented out) is YAML null, which
        # would mean "no such policy": a login route silently public. Refused instead.
        if v is None:
            raise ValueError(
                f"is empty (YAML null), which would switch the {info.field_name} policy off; give its "
                f"settings ({{}} for the defaults), or remove {info.field_name}: for a route without it"
            )
        return v

    if TYPE_CHECKING:  # the per-route sections assembled from the pipeline

        def __getattr__(self, name: str) -> Any: ...


class ConfigBase(Model):
    """The whole config's base: where the file was. Every section is assembled onto it."""

    # Set by load_config: where the file was, so relative paths resolve against it.
    source_path: str | None = Field(None, exclude=True)

    def resolve_path(self, p: str) -> str:
        """Resolve a path from the config relative to the config file's directory."""
        if os.path.isabs(p) or not self.source_path:
            return p
        return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(self.source_path)), p))

    if TYPE_CHECKING:  # the sections assembled from the pipeline

        def __getattr__(self, name: str) -> Any: ...
