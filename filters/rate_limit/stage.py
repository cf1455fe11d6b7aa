"""The rate-limit stage: rules compiled per route, the two filters (``rate_limit_pre`` before the
WAF and credentials, ``rate_limit`` after authorisation), the RateLimit headers, and the choice of
backend (in-process or Redis) with its ``on_backend_error`` fallback. See the package docstring."""

from __future__ import annotations

import base64
import functools
import hmac
import ipaddress
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from filters.rate_limit.config import RateLimitConfig, RateLimitRule
from filters.rate_limit.gcra import MemoryGcra, Policy, Verdict
from filters.rate_limit.redis_store import (
    CHECKS_ALLOWED,
    CHECKS_BACKEND_ERROR,
    CHECKS_FALLBACK,
    CHECKS_LIMITED,
    BackendUnavailable,
    RedisBackend,
)
from filters.redis_client import tls_files
from gateway import problems
from gateway.chain import (
    ALLOW,
    SKIP,
    BuildEnv,
    Decision,
    Deny,
    Filter,
    Mode,
    Stage,
)
from gateway.problems import Problem
from gateway.resources import Lease

if TYPE_CHECKING:  # pragma: no cover
    from gateway.configbase import RouteBase as RouteConfig
    from gateway.context import RequestContext

log = logging.getLogger("portvakt.ratelimit")

RATE_LIMITED = problems.register("rate_limited", 429, "Too many requests")
RATE_LIMIT_UNAVAILABLE = problems.register("rate_limit_unavailable", 503, "Rate limiting is unavailable")


# -- compiled rules ------------------------------------------------------------------------------


class MemoryBackend:
    """``backend: memory``: the GCRA in this process. Never unavailable."""

    kind = "memory"

    def __init__(self, cfg: RateLimitConfig) -> None:
        self.signature = cfg.backend_signature()
        self.local = MemoryGcra(max_keys=cfg.max_local_keys)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def readiness(self, on_backend_error: str) -> dict[str, str]:
        return {}


class _Rule:
    """A rule compiled for one route: subject extractor, key parts, header items."""

    __slots__ = (
        "name",
        "per",
        "policy",
        "head",
        "tail",
        "subject",
        "policy_item",
        "state_prefix",
        "quota",
        "beyond_quota",
    )

    def __init__(
        self,
        rule: RateLimitRule,
        name: str,
        route: str,
        prefix: str,
        subject: Callable[[RequestContext], str | None],
    ) -> None:
        self.name = name
        self.per = rule.per
        self.policy = Policy.of(rule.limit, rule.period_seconds, rule.burst)
        self.head = f"{prefix}:rl:{{{rule.per}:"
        # The state is keyed by the policy too (emission interval and tolerance, in µs): a
        # reloaded limit starts from its own state on the next request, never from a schedule
        # computed under the old numbers (5/hour used up must not outlive a change to 1000/s).
        self.tail = f"}}:{route}:{name}:{self.policy.interval_us}-{self.policy.tolerance_us}"
        self.subject = subject
        w = max(1, math.ceil(rule.period_seconds))
        q = (
            rule.limit
            if w == rule.period_seconds
            else max(1, math.floor(rule.limit * w / rule.period_seconds))
        )
        self.quota = q
        # Seconds of schedule the burst holds beyond the quota: while the schedule is that far
        # from empty, r is already back at q.
        self.beyond_quota = max(0, self.policy.burst - q) * self.policy.interval_us / 1_000_000
        self.policy_item = f'"{name}";q={q};w={w}'
        self.state_prefix = f'"{name}";r='

    def state_item(self, v: Verdict) -> str:
        """``"name";r=R;t=T`` relative to the announced quota ``q`` (draft-ietf-httpapi-ratelimit-
        headers): a burst above the quota lets more through at once than ``q``, but ``r`` never
        exceeds ``q``, and ``t`` is the time until ``r`` is back at its most (``min(q, burst)``),
        not until the whole burst is: never more than the window ``w``."""
        reset = v.reset - self.beyond_quota if self.beyond_quota else v.reset
        return f"{self.state_prefix}{min(v.remaining, self.quota)};t={max(0, math.ceil(reset - 1e-6))}"


def retry_after_seconds(seconds: float) -> int:
    """Retry-After in whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(seconds - 1e-6))


class _RateLimitFilter(Filter):
    """Checks the rules of one stage of one route. Subclasses fix name and position."""

    def __init__(self, stage: RateLimitStage, rules: Sequence[_Rule], mode: Mode) -> None:
        self.stage = stage
        self.rules = tuple(rules)
        self.mode = mode
        # Our own bound is timeout_ms; this is the chain's backstop.
        self.timeout = max(1.0, stage.cfg.timeout_ms / 1000 * 4)

    async def check(self, ctx: RequestContext) -> Decision:
        items: list[tuple[str, Policy]] = []
        rules: list[_Rule] = []
        for r in self.rules:
            s = r.subject(ctx)
            if s is not None:
                items.append((r.head + s + r.tail, r.policy))
                rules.append(r)
        if not items:
            return SKIP
        verdicts, source = await self.stage.evaluate(items)
        rl = ctx.rate_limit
        policies: list[str] = rl.setdefault("policies", [])
        states: list[str] = rl.setdefault("states", [])
        policies.extend(r.policy_item for r in rules)
        rl["source"] = source
        denied: tuple[_Rule, Verdict] | None = None
        if verdicts is not None:
            for r, v in zip(rules, verdicts):
                states.append(r.state_item(v))
                if not v.allowed and (denied is None or v.retry_after > denied[1].retry_after):
                    denied = (r, v)
        headers = ctx.response_headers
        headers["RateLimit-Policy"] = ", ".join(policies)
        if states:
            headers["RateLimit"] = ", ".join(states)
        if source == "deny":
            ra = retry_after_seconds(self.stage.backend_retry_after())
            ctx.audit[self.name] = {"source": source}
            return Deny(
                Problem(
                    RATE_LIMIT_UNAVAILABLE,
                    detail="The rate-limit service is unavailable; try again later.",
                    internal_reason="rate_limit_backend_down",
                    headers={"Retry-After": str(ra)},
                )
            )
        if denied is None:
            return ALLOW
        r, v = denied
        ra = retry_after_seconds(v.retry_after)
        rl["limited_by"] = r.name
        ctx.audit[self.name] = {"limited_by": r.name, "per": r.per, "retry_after": ra, "source": source}
        return Deny(
            Problem(
                RATE_LIMITED,
                detail=f"Rate limit {r.name!r} exceeded; retry after {ra} s.",
                headers={"Retry-After": str(ra)},
                extra={"policy": r.name, "retry_after": ra},
            )
        )


class PreAuthRateLimit(_RateLimitFilter):
    name = "rate_limit_pre"


class RateLimit(_RateLimitFilter):
    name = "rate_limit"


class RateLimitStage(Stage):
    name = "rate_limit"

    def __init__(
        self,
        cfg: RateLimitConfig,
        backend: Lease[RedisBackend | MemoryBackend] | RedisBackend | MemoryBackend,
        pseudonym_key: bytes,
    ) -> None:
        self.cfg = cfg
        # The backend (Redis pool, breaker, local limiter state) is kept across reloads with the
        # same backend settings: build_stage acquires it from BuildEnv.resources. A backend
        # handed in directly is this stage's alone.
        self._lease = backend if isinstance(backend, Lease) else Lease.sole(backend)
        self.backend = self._lease.resource
        self._key = pseudonym_key
        self._v6 = cfg.ipv6_prefix_length
        self._ip_pseudonyms: dict[object, str] = {}  # client address -> pseudonym (per stage)

    # -- subjects --------------------------------------------------------------------------

    def _pseudonym(self, kind: bytes, value: str) -> str:
        d = hmac.digest(self._key, kind + b"\0" + value.encode(), "sha256")[:15]
        return base64.urlsafe_b64encode(d).decode()

    def _subject_fn(self, per: str, route: str) -> Callable[[RequestContext], str | None]:
        if per == "client_ip":
            v6 = self._v6

            cache = self._ip_pseudonyms

            def client_ip(ctx: RequestContext) -> str | None:
                ip = ctx.client_ip
                hit = cache.get(ip)
                if hit is not None:
                    return hit
                key_ip = ip
                if ip.version == 6 and v6 < 128:
                    if ip.ipv4_mapped is not None:  # type: ignore[union-attr]
                        key_ip = ip.ipv4_mapped  # type: ignore[union-attr]
                    else:
                        key_ip = ipaddress.IPv6Network((ip, v6), strict=False).network_address
                if len(cache) >= 65536:  # bounded: a flood of addresses only costs HMACs
                    cache.clear()
                out = cache[ip] = self._pseudonym(b"ip", str(key_ip))
                return out

            return client_ip
        if per == "integration":
            return lambda ctx: ctx.integration.id.lower() if ctx.integration is not None else None
        if per == "organization":
            return lambda ctx: ctx.organization
        if per == "person":

            def person(ctx: RequestContext) -> str | None:
                tok = ctx.token
                if tok is None or not tok.pid:
                    return None
                return self._pseudonym(b"pid", tok.pid)

            return person
        if per == "route":
            return lambda ctx: "-"
        raise ValueError(f"unknown subject {per!r}")  # pragma: no cover - the model forbids it

    # -- stage contract --------------------------------------------------------------------

    def filters_for_route(self, route: RouteConfig) -> list[Filter]:
        rules = compile_rules(route.name, route.rate_limits, self.cfg.key_prefix, self._subject_fn)
        out: list[Filter] = []
        pre = [r for r, rc in zip(rules, route.rate_limits) if rc.stage == "pre_auth"]
        post = [r for r, rc in zip(rules, route.rate_limits) if rc.stage != "pre_auth"]
        if pre:
            out.append(PreAuthRateLimit(self, pre, self.cfg.mode))
        if post:
            out.append(RateLimit(self, post, self.cfg.mode))
        return out

    async def evaluate(self, items: list[tuple[str, Policy]]) -> tuple[list[Verdict] | None, str]:
        """Verdicts and their source: "memory"/"redis", or on Redis trouble "local", "allow"
        (verdicts None) or "deny" (verdicts None). Counts every check once."""
        b = self.backend
        if b.kind == "memory":
            local = b.local
            verdicts = [local.check(k, p) for k, p in items]
            _count(verdicts)
            return verdicts, "memory"
        try:
            verdicts = await b.check(items)  # type: ignore[union-attr]
        except BackendUnavailable as e:
            (CHECKS_FALLBACK if e.label == "fallback" else CHECKS_BACKEND_ERROR).inc(len(items))
            mode = self.cfg.on_backend_error
            if mode == "local":
                local = b.local
                return [local.check(k, p) for k, p in items], "local"
            return None, mode
        _count(verdicts)
        return verdicts, "redis"

    def backend_retry_after(self) -> float:
        return getattr(self.backend, "retry_after", lambda: 1.0)()

    async def start(self) -> None:
        await self._lease.start()  # a backend kept from the previous runtime is running already

    async def close(self) -> None:
        await self._lease.release()  # the last holder closes the backend

    def readiness(self) -> dict[str, str]:
        return self.backend.readiness(self.cfg.on_backend_error)


def _count(verdicts: list[Verdict]) -> None:
    n_ok = sum(1 for v in verdicts if v.allowed)
    if n_ok:
        CHECKS_ALLOWED.inc(n_ok)
    if n_ok != len(verdicts):
        CHECKS_LIMITED.inc(len(verdicts) - n_ok)


def compile_rules(
    route: str,
    rules: Sequence[RateLimitRule],
    prefix: str,
    subject_fn: Callable[[str, str], Callable[[RequestContext], str | None]],
) -> list[_Rule]:
    """Compile a route's rules; policy names are the rule's ``name``, else ``per`` (suffixed with
    its index when two rules share it). Raises ValueError on a duplicate explicit name."""
    counts: dict[str, int] = {}
    for r in rules:
        counts[r.per] = counts.get(r.per, 0) + 1
    out: list[_Rule] = []
    seen: set[str] = set()
    for i, r in enumerate(rules):
        name = r.name or (r.per if counts[r.per] == 1 else f"{r.per}-{i}")
        if name in seen:
            raise ValueError(f"route {route!r}: two rate_limits named {name!r}")
        seen.add(name)
        out.append(_Rule(r, name, route, prefix, subject_fn(r.per, route)))
    return out


def build_stage(env: BuildEnv) -> RateLimitStage | None:
    """The rate-limit stage, or None when no route has rate_limits (no Redis connection then).

    Raises ValueError when person/client_ip rules share a Redis backend without a
    ``pseudonym_key`` (each process would make up its own key and count apart)."""
    cfg: RateLimitConfig = env.config.rate_limit
    if cfg.mode is Mode.off:
        return None
    routes = [r for r in env.config.routes if r.rate_limits]
    persons = getattr(env.config, "persons", None)  # its login endpoints' own rules (filters.persons)
    extra = list(persons.rate_limits) if persons is not None and persons.enabled else []
    if not routes and not extra:
        return None
    pseudonymous = any(rule.per in ("person", "client_ip") for r in routes for rule in r.rate_limits)
    pseudonymous = pseudonymous or any(rule.per in ("person", "client_ip") for rule in extra)
    if cfg.pseudonym_key is not None:
        key = hmac.digest(b"portvakt-rate-limit", cfg.pseudonym_key.encode(), "sha256")
    elif cfg.backend == "memory" or not pseudonymous:
        # Per process is enough when the state is per process too; kept across reloads.
        key = env.secrets.setdefault("rate_limit_pseudonym_key", os.urandom(32))
    else:
        raise ValueError(
            "rate_limit.pseudonym_key is required with a Redis backend when a rule counts per person "
            "or client_ip (every gateway process must derive the same keys)"
        )
    make_backend: Callable[[], RedisBackend | MemoryBackend]
    if cfg.backend == "memory":
        make_backend = functools.partial(MemoryBackend, cfg)
    else:
        by_field = {
            "ssl_ca_certs": "tls_ca_file",
            "ssl_certfile": "tls_cert_file",
            "ssl_keyfile": "tls_key_file",
        }
        for option, p in tls_files(cfg.redis_target()):
            field = by_field[option] if getattr(cfg, by_field[option]) else f"backend ({option})"
            full = env.config.resolve_path(p)
            try:
                with open(full, "rb"):
                    pass
            except OSError as e:
                raise ValueError(f"rate_limit.{field}: cannot read {full}: {e.strerror or e}") from None

        def make_backend() -> RedisBackend:
            try:
                return RedisBackend(cfg, env.config.resolve_path)
            except ValueError as e:  # redis-py's URL parsing: names no field, never echoes the URL
                raise ValueError(f"rate_limit.backend: {e}") from None

    # Kept across reloads while the backend settings are the same (gateway.resources).
    backend: Lease[RedisBackend | MemoryBackend] = env.resources.acquire(
        ("rate_limit.backend", cfg.backend_signature()), make_backend
    )
    stage = RateLimitStage(cfg, backend, key)
    for r in routes:  # compile once now so a bad rule fails the load, not the first request
        stage.filters_for_route(r)
    return stage
