"""The gateway's config: one YAML file -> one typed, frozen model.

``load_config(path)`` returns a ``Config`` or raises ``ConfigError`` listing every problem at once as
``file: yaml.path: reason``. ``${ENV_VAR}`` (and ``${ENV_VAR:-default}``) in string values is
replaced from the environment before validation.

The gateway's own sections (server, admin, upstreams, logging, problems, http, tracing) are
declared here; every section a policy stage or role owns is declared in that stage's package and
listed once in gateway/pipeline.py, from which ``Config`` and ``RouteConfig`` are assembled
(``pydantic.create_model``). For a type checker they read as ``GatewayConfig`` / ``RouteBase``,
whose assembled sections are ``Any``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model, field_validator

from gateway.canonical import HttpConfig, NotCanonical, canonical_path, route_host
from gateway.configbase import (
    HTTP_METHODS,
    ConfigBase,
    MatchConfig,
    Model,
    RouteAuditConfig,
    RouteBase,
)
from gateway.pipeline import PIPELINE, ROLES, RoleDecl, Section, StageDecl
from gateway.tracing import TracingConfig

__all__ = [
    "HTTP_METHODS",
    "AdminConfig",
    "Config",
    "ConfigError",
    "GatewayConfig",
    "LoggingConfig",
    "MatchConfig",
    "ProblemsConfig",
    "RouteAuditConfig",
    "RouteConfig",
    "ServerConfig",
    "TLSConfig",
    "UpstreamConfig",
    "load_config",
    "parse_config",
]


def _check_listen(v: str) -> str:
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) <= 65535) or not host:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8443 or [::1]:8443")
    return v


class TLSConfig(Model):
    certificate: str = Field(description="PEM server certificate (chain) file")
    private_key: str = Field(description="PEM private key file")
    client_ca: str | None = Field(None, description="PEM CA bundle that client certificates must chain to")
    client_certificate: Literal["off", "optional", "required"] = Field(
        "off", description="mTLS: off | optional | required"
    )
    min_version: Literal["TLSv1.2", "TLSv1.3"] = Field("TLSv1.2", description="Lowest TLS version accepted")

    @field_validator("client_certificate")
    @classmethod
    def _v(cls, v: str) -> str:
        return v


class ServerConfig(Model):
    listen: str = Field("127.0.0.1:8443", description="Public listener HOST:PORT")
    tls: TLSConfig | None = Field(None, description="TLS settings; required unless plain_http is true")
    plain_http: bool = Field(
        False, description="Serve plain HTTP (only behind a TLS-terminating load balancer)"
    )
    workers: int = Field(1, ge=1, le=64, description="Worker processes sharing the port (SO_REUSEPORT)")
    shutdown_grace_seconds: float = Field(
        10.0, ge=0, description="How long SIGTERM waits for in-flight requests"
    )
    keepalive_timeout_seconds: float = Field(
        75.0, gt=0, description="Idle time before a client keep-alive connection is closed"
    )
    # Edge bounds (gateway/edge.py). Defaults after Envoy's edge recommendations and nginx.
    request_headers_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="From a request's first byte until its headers are complete (Envoy request_headers_timeout)",
    )
    request_body_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="Longest silence while the gateway waits for request body bytes: 408 (nginx client_body_timeout)",
    )
    request_body_min_rate_bytes_per_second: float = Field(
        100.0,
        ge=0,
        description="After request_body_timeout_seconds, a body arriving slower than this on average is "
        "refused: 408 (Apache mod_reqtimeout MinRate; 0: off)",
    )
    response_write_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="Longest time a client may leave response bytes unread: its stream is aborted (nginx send_timeout)",
    )
    tls_handshake_timeout_seconds: float = Field(10.0, gt=0, description="Bound on a client's TLS handshake")
    max_connections: int = Field(
        4096,
        gt=0,
        description="Open client connections per listener (per worker); beyond: 503 overloaded, closed",
    )
    max_concurrent_requests: int = Field(
        1024, gt=0, description="Requests in flight per worker; beyond: 503 overloaded"
    )
    overload_retry_after_seconds: int = Field(
        1, ge=1, description="Retry-After of the 503 overloaded problem"
    )
    body_on_bodiless_methods: Literal["refuse", "forward"] = Field(
        "refuse",
        description="A body on GET/HEAD/DELETE/OPTIONS: refuse (400 body_not_allowed) or forward "
        "with an exact Content-Length on an upstream connection closed after the exchange (chunked is refused)",
    )

    _listen = field_validator("listen")(classmethod(lambda cls, v: _check_listen(v)))


class AdminConfig(Model):
    listen: str = Field(
        "127.0.0.1:9090", description="Admin listener (metrics, health, reload); never public"
    )
    reload_token: str | None = Field(
        None,
        description="Bearer token POST /-/reload requires (use ${ENV_VAR}); unset: no token (loopback only)",
    )
    reload_token_file: str | None = Field(
        None, description="File holding that token (e.g. a mounted Secret); read at load and on reload"
    )

    _listen = field_validator("listen")(classmethod(lambda cls, v: _check_listen(v)))

    @field_validator("reload_token")
    @classmethod
    def _token(cls, v: str | None) -> str | None:
        if v is None or not v.strip():  # "${PORTVAKT_ADMIN_TOKEN:-}" with the variable unset: no token
            return None
        if len(v.strip()) < 16:
            raise ValueError("must be at least 16 characters (or leave it unset)")
        return v.strip()


class UpstreamConfig(Model):
    url: str = Field(description="Base URL of the upstream service (http:// or https://)")
    connect_timeout_seconds: float = Field(2.0, gt=0, description="Time to open a connection to the upstream")
    timeout_seconds: float = Field(30.0, gt=0, description="Total time for the upstream's response headers")
    max_connections: int = Field(100, gt=0, description="Pooled connections to this upstream (per worker)")
    pool_timeout_seconds: float = Field(
        5.0,
        gt=0,
        description="Longest wait for a free connection when max_connections are busy: 503 overloaded",
    )
    ca_file: str | None = Field(None, description="CA bundle for an https upstream")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http:// or https:// URL")
        return v.rstrip("/")


class LoggingConfig(Model):
    format: Literal["text", "json"] = Field(
        "text", description="Application logs: text (one line per event) or json (one JSON object per line)"
    )
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Application log level (--log-level / PORTVAKT_LOG_LEVEL override it)"
    )
    access_log: Literal["stdout", "logging", "off"] = Field(
        "stdout",
        description="Access log: stdout (bare JSON lines, batched), logging (the portvakt.access logger, "
        "in logging.format) or off",
    )


class ProblemsConfig(Model):
    type_base: str = Field(
        "https://portvakt.dev/problems/",
        description="Prefix of the problem+json type; the reason id is appended (host docs/reasons.md there)",
    )

    @field_validator("type_base")
    @classmethod
    def _base(cls, v: str) -> str:
        if not re.match(r"^(https?://[^\s]+|urn:[^\s]+|tag:[^\s]+)\Z", v):
            raise ValueError("must be an http(s):// URL, a urn: or a tag: URI prefix")
        return v


class GatewayConfig(ConfigBase):
    """The gateway's own sections; ``Config`` adds every stage's and role's (gateway/pipeline.py)."""

    server: ServerConfig = Field(default_factory=ServerConfig, description="The public listener")
    admin: AdminConfig = Field(default_factory=AdminConfig, description="The admin listener")
    trusted_proxies: list[str] = Field(
        default_factory=list, description="CIDRs whose X-Forwarded-For / forwarded client certs are believed"
    )
    upstreams: dict[str, UpstreamConfig] = Field(
        default_factory=dict, description="Upstream services by name"
    )
    routes: list[RouteBase] = Field(
        default_factory=list, description="Routes, first match in file order wins"
    )
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Application and access logs")
    problems: ProblemsConfig = Field(default_factory=ProblemsConfig, description="Problem+json responses")
    http: HttpConfig = Field(
        default_factory=HttpConfig,
        description="Canonical request (path normalisation) and client headers never forwarded",
    )
    tracing: TracingConfig = Field(
        default_factory=TracingConfig, description="W3C trace context (traceparent) to the upstream"
    )


def _field(s: Section) -> tuple[Any, Any]:
    if s.default_factory is not None:
        return s.annotation, Field(default_factory=s.default_factory, description=s.description)
    return s.annotation, Field(s.default, description=s.description)


def _assemble() -> tuple[type[RouteBase], type[GatewayConfig]]:
    """``RouteConfig`` and ``Config`` from the pipeline's declarations."""
    decls: tuple[StageDecl | RoleDecl, ...] = (*PIPELINE, *ROLES)
    route_fields: dict[str, Any] = {s.key: _field(s) for d in decls for s in d.route_sections}
    route_model = create_model("RouteConfig", __base__=RouteBase, __module__=__name__, **route_fields)
    fields: dict[str, Any] = {s.key: _field(s) for d in decls for s in d.sections}
    fields["routes"] = (
        list[route_model],  # type: ignore[valid-type]
        Field(default_factory=list, description="Routes, first match in file order wins"),
    )
    config_model = create_model("Config", __base__=GatewayConfig, __module__=__name__, **fields)
    return route_model, config_model


if TYPE_CHECKING:
    RouteConfig = RouteBase
    Config = GatewayConfig
else:
    RouteConfig, Config = _assemble()


class ConfigError(Exception):
    """Every problem found in a config file, each ``file: yaml.path: reason``."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _yaml_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(root)"


def _interpolate(node: Any, loc: tuple[Any, ...], errors: list[tuple[tuple[Any, ...], str]]) -> Any:
    if isinstance(node, str):

        def sub(m: re.Match[str]) -> str:
            val = os.environ.get(m.group(1))
            if val is None:
                if m.group(2) is not None:
                    return m.group(2)
                errors.append((loc, f"environment variable {m.group(1)} is not set"))
                return ""
            return val

        return _ENV.sub(sub, node)
    if isinstance(node, dict):
        return {k: _interpolate(v, loc + (k,), errors) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, loc + (i,), errors) for i, v in enumerate(node)]
    return node


def _cross_checks(cfg: Config) -> list[tuple[tuple[Any, ...], str]]:
    """Checks across sections that one field's validator cannot see."""
    errs: list[tuple[tuple[Any, ...], str]] = []
    if not cfg.server.plain_http and cfg.server.tls is None:
        errs.append((("server", "tls"), "required unless server.plain_http is true"))
    if cfg.server.tls and cfg.server.tls.client_certificate != "off" and not cfg.server.tls.client_ca:
        errs.append(
            (("server", "tls", "client_ca"), "required when client_certificate is optional or required")
        )
    for key in ("trusted_proxies",):
        for i, c in enumerate(getattr(cfg, key)):
            try:
                ipaddress.ip_network(c, strict=False)
            except ValueError:
                errs.append(((key, i), f"not a CIDR: {c!r}"))
    for key in ("allow_cidrs", "deny_cidrs"):
        for i, c in enumerate(getattr(cfg.ingress, key)):
            try:
                ipaddress.ip_network(c, strict=False)
            except ValueError:
                errs.append((("ingress", key, i), f"not a CIDR: {c!r}"))
    names: set[str] = set()
    for i, r in enumerate(cfg.routes):
        if r.upstream not in cfg.upstreams:
            known = ", ".join(sorted(cfg.upstreams)) or "none defined"
            errs.append((("routes", i, "upstream"), f"unknown upstream {r.upstream!r} (known: {known})"))
        if r.name in names:
            errs.append((("routes", i, "name"), f"duplicate route name {r.name!r}"))
        names.add(r.name)
        for decl in PIPELINE:
            if decl.route_checks is not None:
                errs += [(("routes", i) + loc, msg) for loc, msg in decl.route_checks(r)]
        errs += _route_canonical_problems(i, r, cfg)
        if r.organization_from and not re.match(
            r"^(path:/.*\{organization\}.*|header:[A-Za-z0-9-]+)\Z", r.organization_from
        ):
            errs.append(
                (
                    ("routes", i, "organization_from"),
                    'must be "path:/.../{organization}/..." or "header:Name"',
                )
            )
    for decl in PIPELINE:
        if decl.checks is not None:
            errs += decl.checks(cfg)
    from gateway.tracing import config_problems as tracing_problems

    errs += tracing_problems(cfg)
    ids: set[str] = set()
    for i, integ in enumerate(cfg.integrations):
        if integ.id.lower() in ids:
            errs.append((("integrations", i, "id"), f"duplicate integration id {integ.id!r}"))
        ids.add(integ.id.lower())
    return errs


def _route_canonical_problems(i: int, r: RouteConfig, cfg: Config) -> list[tuple[tuple[Any, ...], str]]:
    """A route names a canonical path prefix and valid hosts: requests are matched in canonical
    form, so any other spelling would never match (or would match what it does not say)."""
    errs: list[tuple[tuple[Any, ...], str]] = []
    prefix = r.match.path_prefix
    try:
        canon = canonical_path(prefix, cfg.http)[0]
    except Exception as e:  # NotCanonical or Redirect
        errs.append(
            (
                ("routes", i, "match", "path_prefix"),
                f"not a canonical path ({getattr(e, 'reason', 'escaped slash')})",
            )
        )
    else:
        if canon != prefix:
            errs.append((("routes", i, "match", "path_prefix"), f"not canonical: write {canon!r}"))
    for j, h in enumerate(r.match.hosts):
        try:
            route_host(h)
        except NotCanonical:
            errs.append((("routes", i, "match", "hosts", j), f"not a host name or address: {h!r}"))
    return errs


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last one
    silently: a second ``grants:`` or ``password_hash:`` would win without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the model accepts at the mapping ``loc`` points into (``("routes", 0, "match")``);
    empty when ``loc`` does not lead to a model."""
    import types
    import typing

    from pydantic import BaseModel

    def models(tp: Any) -> list[Any]:
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType) or origin is typing.Annotated:
            return [m for a in typing.get_args(tp) for m in models(a)]
        return [tp]

    current: list[Any] = [Config]
    for part in loc:
        nxt: list[Any] = []
        for tp in current:
            origin = typing.get_origin(tp)
            if isinstance(tp, type) and issubclass(tp, BaseModel) and isinstance(part, str):
                f = tp.model_fields.get(part) or next(
                    (f for f in tp.model_fields.values() if f.alias == part), None
                )
                if f is not None:
                    nxt += models(f.annotation)
            elif origin is dict and isinstance(part, str):
                nxt += models(typing.get_args(tp)[1])
            elif origin in (list, tuple) and isinstance(part, int):
                nxt += models(typing.get_args(tp)[0])
        current = nxt
    keys: list[str] = []
    for tp in current:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            keys += [f.alias or n for n, f in tp.model_fields.items() if not f.exclude]
    return keys


def schema_message(err: Any) -> str:
    """The message for one pydantic error: "unknown key" (with a did-you-mean when a known key is
    close), "required", or pydantic's own."""
    if err["type"] == "missing":
        return "required"
    if err["type"] != "extra_forbidden":
        return str(err["msg"])
    import difflib

    loc = tuple(err["loc"])
    if loc and isinstance(loc[-1], str):
        close = difflib.get_close_matches(loc[-1], allowed_keys(loc[:-1]), n=1, cutoff=0.6)
        if close:
            return f"unknown key (did you mean {close[0]!r}?)"
    return "unknown key"


def load_raw(text: str, source: str = "<config>") -> tuple[dict[str, Any], list[str]]:
    """YAML text -> (interpolated mapping, ``${ENV}`` problems). Raises ConfigError when the text
    is not YAML or not a mapping (nothing further can be checked then)."""
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark else "?"
        raise ConfigError([f"{source}: {where}: invalid YAML: {getattr(e, 'problem', e)}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: (root): must be a mapping of sections"])
    env_errors: list[tuple[tuple[Any, ...], str]] = []
    raw = _interpolate(raw, (), env_errors)
    return raw, [f"{source}: {_yaml_path(loc)}: {msg}" for loc, msg in env_errors]


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse and validate YAML text. Raises ConfigError with every problem found."""
    raw, problems = load_raw(text, source)
    try:
        cfg = Config.model_validate({**raw, "source_path": source if source != "<config>" else None})
    except ValidationError as e:
        problems += [
            f"{source}: {_yaml_path(tuple(err['loc']))}: {schema_message(err)}" for err in e.errors()
        ]
        raise ConfigError(problems) from None
    problems += [f"{source}: {_yaml_path(loc)}: {msg}" for loc, msg in _cross_checks(cfg)]
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, interpolate and validate a config file. Raises ConfigError (never a traceback)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{p}: (file): cannot read: {e}"]) from None
    return parse_config(text, str(p))
