"""Runtime: everything built from one config, swapped in one assignment on reload.

``build_runtime(config, previous)`` builds each policy stage of the pipeline (gateway/pipeline.py)
once, compiles routes with their filters in the declared chain order, and prepares the audit
sink, the identity forwarder and the upstream pools: named, typed fields of ``Runtime``. A request
reads ``server.runtime`` once and keeps that object until it finishes, so a reload never changes
the rules under an in-flight request.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from filters.delegation import DelegationStage
from filters.ingress import BodyLimit
from filters.persons import LOGIN_COOKIE, PersonsStage
from gateway.audit import AuditSink, build_audit
from gateway.canonical import host_for_match, route_host
from gateway.chain import BuildEnv, Filter, Stage
from gateway.config import Config, RouteConfig, UpstreamConfig
from gateway.configbase import MatchConfig
from gateway.identity import Forwarder, build_forwarder
from gateway.pipeline import AUDIT, FORWARDER, PIPELINE, StageDecl, build_env, chain_positions
from gateway.proxy import FORWARDED_CERT_HEADERS, FORWARDED_USER_HEADERS, REQUEST_DROP, UpstreamPool
from gateway.resources import Registry, Scope
from gateway.tracing import build_otel

if TYPE_CHECKING:  # pragma: no cover
    from gateway.otel import Otel  # imported only with tracing.otlp (the optional SDK)

log = logging.getLogger("portvakt.runtime")


@dataclass(slots=True, frozen=True)
class CompiledRoute:
    config: RouteConfig
    name: str
    prefix: str
    methods: frozenset[str]
    hosts: frozenset[str]
    upstream_name: str
    upstream: UpstreamConfig
    filters: tuple[Filter, ...]
    # Body bytes the server reads before the chain runs (the WAF inspects them; an oversize body
    # is refused before the upstream is contacted): min(max_body_bytes + 1, max(64 KiB, 1 + the
    # largest ``body_inspection_bytes`` any of this route's filters asks for)).
    body_prefix_bytes: int = 65536

    def matches_path(self, path: str) -> bool:
        p = self.prefix
        if p == "/" or p.endswith("/"):
            return path.startswith(p)
        return path == p or path.startswith(p + "/")


@dataclass(slots=True, eq=False)
class RequestAccounting:
    """The requests running on one runtime, and the event its retirement waits on."""

    inflight: int = 0
    drained: asyncio.Event | None = None


@dataclass(frozen=True, eq=False)
class Runtime:
    """Everything one config built. The fields are set once by ``build_runtime`` and never
    reassigned (frozen); only the contents of the request accounting and the trust cache change
    while it serves."""

    config: Config
    routes: tuple[CompiledRoute, ...]
    stages: tuple[Stage, ...]
    audit: AuditSink
    forwarder: Forwarder
    upstreams: UpstreamPool
    body_limit: BodyLimit  # ingress.max_body_bytes under ingress.mode (filters/ingress.py)
    generation: int = 0
    # OpenTelemetry span export (gateway/otel.py), None unless tracing.otlp is set.
    otel: Otel | None = None
    # Prepared for the request path (read once per request, never recomputed).
    trusted_networks: tuple[Any, ...] = ()
    request_drop: frozenset[str] = frozenset()  # client headers never forwarded (lower-case, '-')
    request_drop_prefixes: tuple[str, ...] = ()  # ...nor any whose name starts with one of these
    # request_drop plus the forwarded client-certificate headers: what a peer that is not a
    # trusted proxy never gets through (Envoy's XFCC SANITIZE).
    request_drop_untrusted: frozenset[str] = frozenset()
    max_body_bytes: int = 0  # ingress.max_body_bytes whatever the mode (body prefix, chunk sizes)
    persons: PersonsStage | None = None  # its endpoints are served before routing
    # Cookies the gateway owns (the persons' session and login cookies): an upstream's Set-Cookie
    # for one of them never reaches the browser (lower-case names).
    guarded_cookies: frozenset[str] = frozenset()
    delegation: DelegationStage | None = None  # parties + admin endpoints, under persons.prefix
    # http.case_sensitive_upstream false: (route, lower-cased prefix) of every route that is not a
    # catch-all, for ``case_variant``; ``prefixes_lower``: every such prefix is lower case already,
    # so a path without upper-case letters needs no check (the common case stays one str.lower()).
    case_guard: tuple[tuple[CompiledRoute, str], ...] = ()
    prefixes_lower: bool = True
    # http.case_sensitive_upstream false and a persons: section: the persons' endpoint prefix,
    # lower-cased, with its "/" ("/portvakt/"): a case variant ("/PORTVAKT/login") is refused
    # rather than routed to a catch-all.
    persons_case_prefix: str | None = None
    # The shared resources this runtime holds (gateway.resources); released when it is closed.
    resources: Scope = field(default_factory=lambda: Registry().scope())
    # What changes while the runtime serves: the request accounting and the trust cache (the
    # objects are replaced never; their contents change).
    accounting: RequestAccounting = field(default_factory=lambda: RequestAccounting(), repr=False)
    _trust_cache: dict[Any, bool] = field(default_factory=dict, repr=False)

    @property
    def inflight(self) -> int:
        """Requests running on this runtime."""
        return self.accounting.inflight

    def enter(self) -> None:
        """One request started on this runtime (the server calls it; ``leave`` when it ends)."""
        self.accounting.inflight += 1

    def is_trusted(self, ip: Any) -> bool:
        """Whether the TCP peer ``ip`` is one of ``trusted_proxies`` (cached per address)."""
        if not self.trusted_networks:
            return False
        hit = self._trust_cache.get(ip)
        if hit is None:
            hit = any(ip.version == n.version and ip in n for n in self.trusted_networks)
            if len(self._trust_cache) > 4096:
                self._trust_cache.clear()
            self._trust_cache[ip] = hit
        return hit

    def leave(self) -> None:
        """One request finished on this runtime."""
        acc = self.accounting
        acc.inflight -= 1
        if acc.inflight == 0 and acc.drained is not None:
            acc.drained.set()

    async def retire(self, max_wait: float) -> None:
        """Wait (at most ``max_wait`` seconds) for requests still running on this runtime, then
        close it. Called on the old runtime after a reload swapped in the new one."""
        acc = self.accounting
        if acc.inflight > 0:
            acc.drained = asyncio.Event()
            try:
                async with asyncio.timeout(max_wait):
                    await acc.drained.wait()
            except TimeoutError:
                log.warning(
                    "runtime %d retired with %d requests still running", self.generation, self.inflight
                )
        await self.close()

    def match(self, host: str, path: str) -> CompiledRoute | None:
        """First route, in config order, whose host list (if any) and path prefix match. ``host``
        and ``path`` are canonical (gateway.canonical)."""
        h = host_for_match(host)
        for r in self.routes:
            if r.hosts and h not in r.hosts:
                continue
            if r.matches_path(path):
                return r
        return None

    def case_variant(self, host: str, path: str) -> CompiledRoute | None:
        """The route (not a catch-all) whose prefix the path matches only case-insensitively
        (``/INNSYN/x`` for ``/innsyn/``), else None. A case-insensitive upstream (IIS, ASP.NET)
        serves such a path as the protected one, so the server refuses it; see
        ``http.case_sensitive_upstream``."""
        guard = self.case_guard
        if not guard:
            return None
        lower = path.lower()
        if lower == path and self.prefixes_lower:
            return None
        h = None
        for r, lp in guard:
            if r.hosts:
                if h is None:
                    h = host_for_match(host)
                if h not in r.hosts:
                    continue
            if (
                lower.startswith(lp) if lp.endswith("/") else (lower == lp or lower.startswith(lp + "/"))
            ) and not r.matches_path(path):
                return r
        return None

    def stage(self, name: str) -> Stage | None:
        for s in self.stages:
            if s.name == name:
                return s
        return None

    async def start(self) -> None:
        for s in self.stages:
            await s.start()
        await self.audit.start()
        await self.forwarder.start()
        await self.upstreams.start()

    async def close(self) -> None:
        for name, close in (
            ("audit", self.audit.close),
            ("forwarder", self.forwarder.close),
            ("upstreams", self.upstreams.close),
            *((("otel", self.otel.close),) if self.otel is not None else ()),
        ):
            try:
                await close()
            except Exception:  # closing must not stop the others from closing
                log.exception("closing %s failed", name)
        for s in self.stages:
            try:
                await s.close()
            except Exception:
                log.exception("closing stage %s failed", s.name)
        await self.resources.release_all()  # what a stage did not release itself

    def readiness(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for s in self.stages:
            for k, v in s.readiness().items():
                out[f"{s.name}.{k}"] = v
        for name, part in (("audit", self.audit), ("forwarder", self.forwarder)):
            for k, v in part.readiness().items():
                out[f"{name}.{k}"] = v
        return out


def build_runtime(
    config: Config,
    previous: Runtime | None = None,
    secrets: dict[str, Any] | None = None,
    pipeline: tuple[StageDecl, ...] = PIPELINE,
) -> Runtime:
    """Build a complete runtime (not yet started). Raises on any problem; the caller keeps the old
    runtime when this fails. ``pipeline``: the stages to build (tests pass their own). Resources
    are shared with ``previous`` through its registry; a failed build gives back what it acquired."""
    registry = previous.resources.registry if previous is not None else Registry()
    scope = registry.scope()
    try:
        return _build(config, previous, secrets, scope, pipeline)
    except BaseException:
        scope.abandon()
        raise


def _build(
    config: Config,
    previous: Runtime | None,
    secrets: dict[str, Any] | None,
    scope: Scope,
    pipeline: tuple[StageDecl, ...],
) -> Runtime:
    base_dir = os.path.dirname(os.path.abspath(config.source_path)) if config.source_path else os.getcwd()
    secrets = secrets if secrets is not None else {}
    positions = chain_positions(pipeline)
    stages: list[Stage] = []
    for decl in pipeline:
        stage = decl.builder(build_env(decl, config, base_dir, secrets, scope))
        if stage is None:  # not configured (e.g. no persons: section)
            continue
        if previous is not None:
            old = previous.stage(stage.name)
            if old is not None:
                stage.adopt(old)
        stages.append(stage)
    max_body = config.ingress.max_body_bytes
    routes: list[CompiledRoute] = []
    for rc in config.routes:
        filters = compile_chain(stages, rc, positions)
        # +1: a filter asking for N bytes then learns exactly whether the body was longer than N.
        wanted = max([65536] + [int(getattr(f, "body_inspection_bytes", 0) or 0) + 1 for f in filters])
        routes.append(
            CompiledRoute(
                config=rc,
                name=rc.name,
                prefix=rc.match.path_prefix,
                methods=frozenset(rc.match.methods),
                hosts=frozenset(route_host(h) for h in rc.match.hosts),
                upstream_name=rc.upstream,
                upstream=config.upstreams[rc.upstream],
                filters=filters,
                body_prefix_bytes=min(max_body + 1, wanted),
            )
        )
    audit = build_audit(build_env(AUDIT, config, base_dir, secrets, scope))
    forwarder = build_forwarder(build_env(FORWARDER, config, base_dir, secrets, scope))
    otel = build_otel(BuildEnv(config=config, base_dir=base_dir, secrets=secrets, resources=scope))
    if previous is not None:
        audit.adopt(previous.audit)
        forwarder.adopt(previous.forwarder)
    strip = frozenset(forwarder.strip_names) | config.http.strip_names()
    cert_headers = set(FORWARDED_CERT_HEADERS) | FORWARDED_USER_HEADERS
    fwd_cert = config.certificates.forwarded_header
    if fwd_cert:
        cert_headers |= {fwd_cert.lower().replace("_", "-"), fwd_cert.lower().replace("_", "-") + "-chain"}
    gen = previous.generation + 1 if previous is not None else 1
    persons = next((s for s in stages if isinstance(s, PersonsStage)), None)
    delegation = next((s for s in stages if isinstance(s, DelegationStage)), None)
    if persons is not None:
        persons.attach_audit(audit)
        persons.set_endpoint_filters(*_persons_endpoint_chains(persons, stages, positions))
    if delegation is not None:
        delegation.attach_audit(audit)
    return Runtime(
        config=config,
        routes=tuple(routes),
        stages=tuple(stages),
        audit=audit,
        forwarder=forwarder,
        otel=otel,
        upstreams=UpstreamPool(config),
        body_limit=BodyLimit(config.ingress),
        generation=gen,
        resources=scope,
        trusted_networks=tuple(ipaddress.ip_network(c, strict=False) for c in config.trusted_proxies),
        request_drop=REQUEST_DROP | strip,
        request_drop_untrusted=REQUEST_DROP | strip | cert_headers,
        request_drop_prefixes=tuple(forwarder.strip_prefixes),
        max_body_bytes=max_body,
        persons=persons,
        guarded_cookies=frozenset(
            {config.persons.cookie_name.lower(), LOGIN_COOKIE.lower()} if config.persons is not None else ()
        ),
        delegation=delegation,
        case_guard=()
        if config.http.case_sensitive_upstream
        else tuple((r, r.prefix.lower()) for r in routes if r.prefix != "/"),
        prefixes_lower=all(r.prefix == r.prefix.lower() for r in routes),
        persons_case_prefix=None
        if config.http.case_sensitive_upstream or persons is None
        else persons.prefix.lower() + "/",
    )


def compile_chain(
    stages: Iterable[Stage], route: RouteConfig, positions: dict[str, int]
) -> tuple[Filter, ...]:
    """The filters every stage contributes to ``route`` (``off`` ones left out), in the chain
    order the pipeline declares. A filter whose name the pipeline does not declare is an error."""
    out: list[Filter] = []
    for s in stages:
        for f in s.filters_for_route(route):
            if f.name not in positions:
                raise ValueError(f"filter {f.name!r} of stage {s.name!r} has no position in the pipeline")
            if f.mode.value != "off":
                out.append(f)
    out.sort(key=lambda f: positions[f.name])
    return tuple(out)


def _persons_endpoint_chains(
    persons: PersonsStage, stages: list[Stage], positions: dict[str, int]
) -> tuple[tuple[Filter, ...], tuple[Filter, ...]]:
    """The persons' endpoints run before routing, so they get their own small chains: the ingress
    stage's checks (CIDRs, hosts, methods, sizes) on every endpoint, plus the rate limit
    (``persons.rate_limits``, per client IP by default) on login start and callback."""

    def route(name: str, rules: list[Any]) -> RouteConfig:
        return RouteConfig.model_validate(
            {
                "name": name,
                "upstream": "-",
                "rate_limits": rules,
                "match": MatchConfig(
                    path_prefix=persons.prefix + "/", methods=["GET", "HEAD", "POST", "DELETE"]
                ),
            }
        )

    def chain(rc: RouteConfig, names: tuple[str, ...]) -> tuple[Filter, ...]:
        return compile_chain([s for s in stages if s.name in names], rc, positions)

    return (
        chain(route("portvakt", []), ("ingress",)),
        chain(route("portvakt-login", list(persons.cfg.rate_limits)), ("ingress", "rate_limit")),
    )
