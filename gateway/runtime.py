"""Runtime: everything built from one config, swapped in one assignment on reload.

``build_runtime(config, previous)`` compiles routes, builds each policy stage once, collects each
route's filters in chain order, and prepares the audit sink and the identity forwarder. A request
reads ``server.runtime`` once and keeps that object until it finishes, so a reload never changes
the rules under an in-flight request.
"""

from __future__ import annotations

import asyncio
import importlib
import ipaddress
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from gateway.canonical import host_for_match, route_host
from gateway.chain import BuildEnv, Filter, Stage
from gateway.config import Config, RouteConfig, UpstreamConfig
from gateway.proxy import FORWARDED_CERT_HEADERS, REQUEST_DROP, UpstreamPool

log = logging.getLogger("portvakt.runtime")

# Stage modules in chain order; each exposes ``build_stage(env) -> Stage``. Positions inside the
# chain come from each Filter's ``position`` (gateway.chain.POS_*), not from this order.
STAGE_MODULES = (
    "filters.ingress",
    "filters.rate_limit",
    "filters.waf",
    "filters.certificates",
    "filters.issuers",
    "filters.integrations",
    "filters.access",
    "filters.persons",
    "filters.delegation",
)


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


@dataclass
class Runtime:
    config: Config
    routes: tuple[CompiledRoute, ...]
    stages: tuple[Stage, ...]
    components: dict[str, Any] = field(default_factory=dict)  # "audit", "forwarder", "upstreams"
    generation: int = 0
    # Prepared for the request path (read once per request, never recomputed).
    trusted_networks: tuple[Any, ...] = ()
    request_drop: frozenset[str] = frozenset()  # client headers never forwarded (lower-case, '-')
    request_drop_prefixes: tuple[str, ...] = ()  # ...nor any whose name starts with one of these
    # request_drop plus the forwarded client-certificate headers: what a peer that is not a
    # trusted proxy never gets through (Envoy's XFCC SANITIZE).
    request_drop_untrusted: frozenset[str] = frozenset()
    max_body_bytes: int = 0
    persons: Any = None  # filters.persons.PersonsStage: its endpoints are served before routing
    delegation: Any = (
        None  # filters.delegation.DelegationStage: parties + admin endpoints, under persons.prefix
    )
    # http.case_sensitive_upstream false: (route, lower-cased prefix) of every route that is not a
    # catch-all, for ``case_variant``; ``prefixes_lower``: every such prefix is lower case already,
    # so a path without upper-case letters needs no check (the common case stays one str.lower()).
    case_guard: tuple[tuple[CompiledRoute, str], ...] = ()
    prefixes_lower: bool = True
    inflight: int = 0
    _drained: asyncio.Event | None = field(default=None, repr=False)
    _trust_cache: dict[Any, bool] = field(default_factory=dict, repr=False)

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
        """One request finished on this runtime (``inflight`` is incremented by the server)."""
        self.inflight -= 1
        if self.inflight == 0 and self._drained is not None:
            self._drained.set()

    async def retire(self, max_wait: float) -> None:
        """Wait (at most ``max_wait`` seconds) for requests still running on this runtime, then
        close it. Called on the old runtime after a reload swapped in the new one."""
        if self.inflight > 0:
            self._drained = asyncio.Event()
            try:
                async with asyncio.timeout(max_wait):
                    await self._drained.wait()
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
        for c in self.components.values():
            start = getattr(c, "start", None)
            if start is not None:
                await start()

    async def close(self) -> None:
        for c in self.components.values():
            close = getattr(c, "close", None)
            if close is not None:
                try:
                    await close()
                except Exception:  # closing must not stop the others from closing
                    log.exception("closing component %r failed", c)
        for s in self.stages:
            try:
                await s.close()
            except Exception:
                log.exception("closing stage %s failed", s.name)

    def readiness(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for s in self.stages:
            for k, v in s.readiness().items():
                out[f"{s.name}.{k}"] = v
        for name, c in self.components.items():
            r = getattr(c, "readiness", None)
            if r is not None:
                for k, v in r().items():
                    out[f"{name}.{k}"] = v
        return out


def _component_builders() -> dict[str, Any]:
    """Non-filter components: module path -> builder name. Each builder takes a BuildEnv."""
    out: dict[str, Any] = {}
    for key, modname, fn in (
        ("audit", "gateway.audit", "build_audit"),
        ("forwarder", "gateway.identity", "build_forwarder"),
        ("otel", "gateway.tracing", "build_otel"),  # None unless tracing.otlp is set
    ):
        mod = importlib.import_module(modname)
        builder = getattr(mod, fn, None)
        if builder is not None:
            out[key] = builder
    return out


def build_runtime(
    config: Config, previous: Runtime | None = None, secrets: dict[str, Any] | None = None
) -> Runtime:
    """Build a complete runtime (not yet started). Raises on any problem; the caller keeps the old
    runtime when this fails."""
    base_dir = os.path.dirname(os.path.abspath(config.source_path)) if config.source_path else os.getcwd()
    env = BuildEnv(config=config, base_dir=base_dir, secrets=secrets if secrets is not None else {})
    stages: list[Stage] = []
    for modname in STAGE_MODULES:
        mod = importlib.import_module(modname)
        builder = getattr(mod, "build_stage", None)
        if builder is None:
            continue
        stage = builder(env)
        if stage is None:
            continue
        if previous is not None:
            old = previous.stage(stage.name)
            if old is not None:
                stage.adopt(old)
        stages.append(stage)
    max_body = config.ingress.max_body_bytes
    routes: list[CompiledRoute] = []
    for rc in config.routes:
        filters: list[Filter] = []
        for s in stages:
            filters.extend(f for f in s.filters_for_route(rc) if f.mode.value != "off")
        filters.sort(key=lambda f: f.position)
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
                filters=tuple(filters),
                body_prefix_bytes=min(max_body + 1, wanted),
            )
        )
    components: dict[str, Any] = {}
    for key, builder in _component_builders().items():
        comp = builder(env)
        if previous is not None:
            old = previous.components.get(key)
            adopt = getattr(comp, "adopt", None)
            if old is not None and adopt is not None:
                adopt(old)
        components[key] = comp
    components["upstreams"] = UpstreamPool(config)
    forwarder = components.get("forwarder")
    strip = (
        frozenset(getattr(forwarder, "strip_names", frozenset())) if forwarder is not None else frozenset()
    )
    strip |= config.http.strip_names()
    cert_headers = set(FORWARDED_CERT_HEADERS)
    fwd_cert = config.certificates.forwarded_header
    if fwd_cert:
        cert_headers |= {fwd_cert.lower().replace("_", "-"), fwd_cert.lower().replace("_", "-") + "-chain"}
    gen = previous.generation + 1 if previous is not None else 1
    return Runtime(
        config=config,
        routes=tuple(routes),
        stages=tuple(stages),
        components=components,
        generation=gen,
        trusted_networks=tuple(ipaddress.ip_network(c, strict=False) for c in config.trusted_proxies),
        request_drop=REQUEST_DROP | strip,
        request_drop_untrusted=REQUEST_DROP | strip | cert_headers,
        request_drop_prefixes=tuple(getattr(forwarder, "strip_prefixes", ()) or ()),
        max_body_bytes=max_body,
        persons=_attach_persons(stages, components),
        delegation=_attach_delegation(stages, components),
        case_guard=()
        if config.http.case_sensitive_upstream
        else tuple((r, r.prefix.lower()) for r in routes if r.prefix != "/"),
        prefixes_lower=all(r.prefix == r.prefix.lower() for r in routes),
    )


def _attach_delegation(stages: list[Stage], components: dict[str, Any]) -> Any:
    d = next((s for s in stages if s.name == "delegation"), None)
    if d is not None:
        d.attach_audit(components.get("audit"))  # type: ignore[attr-defined]
    return d


def _attach_persons(stages: list[Stage], components: dict[str, Any]) -> Any:
    persons = next((s for s in stages if s.name == "persons"), None)
    if persons is not None:
        persons.attach_audit(components.get("audit"))  # type: ignore[attr-defined]
        persons.attach_endpoint_filters(stages)  # type: ignore[attr-defined]
    return persons
