"""Rate limiting (GCRA) on Redis or in-process. Config section ``rate_limit:``; rules per route.

```yaml
rate_limit:
  backend: "redis://:${REDIS_PASSWORD}@127.0.0.1:6379/0"   # memory | redis:// | rediss:// |
  key_prefix: portvakt                                      #   redis+sentinel:// | sentinel
  timeout_ms: 50
  on_backend_error: local                                   # local | allow | deny
routes:
  - name: innsyn-api
    rate_limits:
      - {per: client_ip, limit: 50, period_seconds: 1, burst: 100, stage: pre_auth}
      - {per: integration, limit: 100, period_seconds: 1, burst: 20}
      - {per: organization, limit: 1000, period_seconds: 60}
```

A rule admits ``limit`` requests per ``period_seconds`` with ``burst`` admitted at once (default
``burst = limit``); the algorithm is GCRA (see ``gcra.py``). The subject of a rule:

- ``client_ip`` (IPv6 grouped by ``ipv6_prefix_length``), ``route`` (everyone together),
- ``integration`` (the verified ``ctx.integration.id``), ``organization`` (``ctx.organization``:
  the token's consumer org, else the client certificate's), ``person`` (``ctx.token.pid``).

A rule whose subject is absent from the request (``per: integration`` on a request without an
integration, ``per: person`` without an ID-porten token) does not apply to that request. Person
and client IP subjects are keyed pseudonyms (HMAC-SHA256 with ``pseudonym_key``): neither a
fødselsnummer nor an address appears in a Redis key.

Two filters per route: ``rate_limit_pre`` (``stage: pre_auth`` rules, which may only be
``client_ip`` or ``route``) runs before the WAF and every credential check, so a flood of bad
passwords never reaches argon2; ``rate_limit`` (the others) runs after authorisation. Rules are
independent limiters: each rule of the filter is checked (in one Redis round trip), and a request
refused by one rule still counts against the others of the same filter, as Envoy's descriptors do.
Keys are per route, rule and policy: ``{prefix}:rl:{{per}:{subject}}:{route}:{rule}:{T}-{tau}``
(the GCRA emission interval and tolerance in µs), so a limit changed by reload applies from the
next request, raised or lowered, in Redis and in-process alike (the old key expires by its TTL
or the in-process sweep); the hash tag keeps one subject's keys on one Redis Cluster slot.

Headers (draft-ietf-httpapi-ratelimit-headers-09): every response of a route with applicable
rules carries ``RateLimit-Policy: "integration";q=100;w=1`` and ``RateLimit:
"integration";r=57;t=1`` (``r``: requests admissible right now, never more than the policy's
``q`` even when ``burst`` exceeds the limit; ``t``: seconds until the full quota is back, rounded
up). A refusal is a 429 problem (reason ``rate_limited``) with
``Retry-After`` in whole seconds (>= 1).

When Redis fails (timeout, error, breaker open), ``on_backend_error`` decides: ``local`` runs the
same policy in-process (per process: N processes admit up to N times the limit), ``allow`` lets
requests through (no ``RateLimit`` field then, the policy is still announced), ``deny`` answers
503 ``rate_limit_unavailable``. ``/readyz``: "fallback: ..." (still ready) for local and allow;
"down: ..." for deny, because an instance that refuses every limited route should leave the load
balancer's rotation (a Redis partition seen by one host then moves traffic to the others).
"""

from __future__ import annotations

import base64
import functools
import hmac
import ipaddress
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

from filters.rate_limit.gcra import MemoryGcra, Policy, Verdict
from filters.rate_limit.redis_store import (
    CHECKS_ALLOWED,
    CHECKS_BACKEND_ERROR,
    CHECKS_FALLBACK,
    CHECKS_LIMITED,
    BackendUnavailable,
    RedisBackend,
)
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
from gateway.configbase import Model
from gateway.problems import Problem
from gateway.resources import Lease

if TYPE_CHECKING:  # pragma: no cover
    from gateway.configbase import RouteBase as RouteConfig
    from gateway.context import RequestContext

log = logging.getLogger("portvakt.ratelimit")

RATE_LIMITED = problems.register("rate_limited", 429, "Too many requests")
RATE_LIMIT_UNAVAILABLE = problems.register("rate_limit_unavailable", 503, "Rate limiting is unavailable")

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
_PREFIX = re.compile(r"^[A-Za-z0-9_.:-]{1,64}\Z")
PRE_AUTH_SUBJECTS = ("client_ip", "route")


class SentinelConfig(Model):
    hosts: list[str] = Field(min_length=1, description="Sentinels as HOST:PORT")
    service_name: str = Field(description="The monitored master's name (sentinel monitor NAME ...)")
    db: int = Field(0, ge=0, description="Database number on the master")
    username: str | None = Field(None, description="ACL user for the sentinels themselves")
    password: str | None = Field(None, description="Password for the sentinels themselves (use ${ENV})")


class RateLimitConfig(Model):
    mode: Mode = Field(Mode.enforce, description="off | detect (headers, no 429) | enforce")
    backend: str = Field(
        "memory",
        description='"memory" (in-process), redis://[user:pass@]host:port/db, rediss:// (TLS), '
        "redis+sentinel://[user:pass@]h:p[,h:p]/service[/db], redis+cluster://[user:pass@]h:p[,h:p] "
        '(Redis Cluster; rediss+cluster:// with TLS), or "sentinel" (use the sentinel block)',
    )
    key_prefix: str = Field("portvakt", description="Prefix of every Redis key")
    timeout_ms: int = Field(
        50, gt=0, le=10_000, description="Per Redis operation; a request never waits longer"
    )
    connect_timeout_ms: int = Field(1000, gt=0, description="Connect/probe timeout, off the request path")
    on_backend_error: Literal["local", "allow", "deny"] = Field(
        "local", description="When Redis fails: local in-process GCRA | allow | deny (503)"
    )
    username: str | None = Field(None, description="Redis ACL user (overrides the URL's)")
    password: str | None = Field(None, description="Redis password (overrides the URL's; use ${ENV})")
    tls_ca_file: str | None = Field(None, description="CA bundle to verify a rediss:// server")
    tls_cert_file: str | None = Field(None, description="Client certificate for Redis mTLS")
    tls_key_file: str | None = Field(None, description="Client key for Redis mTLS")
    tls_check_hostname: bool = Field(True, description="Verify the Redis server's host name")
    sentinel: SentinelConfig | None = Field(None, description='Sentinel set-up when backend is "sentinel"')
    max_connections: int = Field(16, ge=1, le=1024, description="Redis connection pool size per process")
    autopipeline: bool = Field(True, description="Send checks of one event-loop tick in one round trip")
    max_inflight_batches: int = Field(4, ge=1, le=1024, description="Pipelined batches on the wire at once")
    breaker_failures: int = Field(3, ge=1, description="Consecutive failed round trips that open the breaker")
    breaker_backoff_ms: int = Field(1000, gt=0, description="First wait before a half-open probe")
    breaker_max_backoff_ms: int = Field(
        1000,
        gt=0,
        description="Longest wait between probes (doubling from breaker_backoff_ms). The default equals "
        "breaker_backoff_ms: a probe every second, so the breaker closes within a second of Redis returning",
    )
    pseudonym_key: str | None = Field(
        None,
        min_length=16,
        description="HMAC key for person / client-IP subjects; required with Redis if such rules exist "
        "(the same on every gateway process; use ${ENV})",
    )
    ipv6_prefix_length: int = Field(64, ge=1, le=128, description="client_ip: one subject per IPv6 prefix")
    max_local_keys: int = Field(100_000, ge=100, description="Subjects kept by the in-process limiter")

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not _PREFIX.match(v):
            raise ValueError("letters, digits, '_', '.', ':', '-' only (no braces: they are the hash tag)")
        return v

    @model_validator(mode="after")
    def _backend(self) -> RateLimitConfig:
        b = self.backend
        if b == "sentinel":
            if self.sentinel is None:
                raise ValueError('backend "sentinel" needs a sentinel: block')
        elif self.sentinel is not None:
            raise ValueError('a sentinel: block needs backend: "sentinel"')
        elif b.startswith("redis+sentinel://"):
            from filters.rate_limit.redis_store import parse_sentinel_url

            parse_sentinel_url(b)
        elif b.startswith(("redis+cluster://", "rediss+cluster://")):
            from filters.rate_limit.redis_store import parse_cluster_url

            parse_cluster_url(b)
        elif b != "memory" and not b.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                'backend must be "memory", redis://, rediss://, unix://, redis+sentinel://, '
                'redis+cluster:// or "sentinel"'
            )
        if self.autopipeline and self.max_inflight_batches > self.max_connections:
            raise ValueError("max_inflight_batches cannot exceed max_connections")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if (self.tls_ca_file or self.tls_cert_file) and b.startswith(("redis://", "unix://")):
            raise ValueError("TLS options need a rediss:// backend")
        return self

    def backend_signature(self) -> tuple[object, ...]:
        """What decides whether a reload can keep the Redis client (see Stage.adopt)."""
        return (
            self.backend,
            self.timeout_ms,
            self.connect_timeout_ms,
            self.username,
            self.password,
            self.tls_ca_file,
            self.tls_cert_file,
            self.tls_key_file,
            self.tls_check_hostname,
            self.sentinel,
            self.max_connections,
            self.autopipeline,
            self.max_inflight_batches,
            self.breaker_failures,
            self.breaker_backoff_ms,
            self.breaker_max_backoff_ms,
            self.max_local_keys,
        )


class RateLimitRule(Model):
    per: Literal["client_ip", "integration", "organization", "person", "route"] = Field(
        description="Subject the limit counts per"
    )
    limit: int = Field(gt=0, description="Requests per period")
    period_seconds: float = Field(gt=0, description="The period of `limit`")
    burst: int | None = Field(None, ge=1, description="Admitted at once from idle (default: limit)")
    stage: Literal["pre_auth", "post_auth"] = Field(
        "post_auth", description="pre_auth: before WAF and credentials (client_ip/route only)"
    )
    name: str | None = Field(None, description="Policy name in the RateLimit headers (default: per)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _NAME.match(v):
            raise ValueError("letters, digits, '_', '.', '-' only (max 64)")
        return v

    @model_validator(mode="after")
    def _stage(self) -> RateLimitRule:
        if self.stage == "pre_auth" and self.per not in PRE_AUTH_SUBJECTS:
            raise ValueError(
                f"a pre_auth rule can only count per {' or '.join(PRE_AUTH_SUBJECTS)} (no identity yet)"
            )
        return self


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

    __slots__ = ("name", "per", "policy", "head", "tail", "subject", "policy_item", "state_prefix", "quota")

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
        self.policy_item = f'"{name}";q={q};w={w}'
        self.state_prefix = f'"{name}";r='

    def state_item(self, v: Verdict) -> str:
        # A burst above the quota lets more through at once than q, but the announced remaining
        # never exceeds the announced quota (clients size their sending by it).
        return f"{self.state_prefix}{min(v.remaining, self.quota)};t={max(0, math.ceil(v.reset - 1e-6))}"


def retry_after_seconds(seconds: float) -> int:
    """Retry-After in whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(seconds - 1e-6))


class _RateLimitFilter(Filter):
    """Checks the rules of one stage of one route. Subclasses fix the name (the pipeline places it)."""

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
        for field in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            p = getattr(cfg, field)
            if p is None:
                continue
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
