"""Rate limiting (GCRA) on Redis or in-process. Config section ``rate_limit:``; rules per route.

Rooms: ``config`` (the models), ``stage`` (compiled rules, the two filters, headers, fallback),
``gcra`` (the algorithm, Lua and Python), ``redis_store`` (the Redis backend: pipelining, breaker);
the Redis client itself comes from ``filters.redis_client`` like every other component's.

```yaml
rate_limit:
  backend: "redis://:${REDIS_PASSWORD}@127.0.0.1:6379/0"   # memory | redis(s):// | unix:// |
  key_prefix: portvakt                                      #   redis(s)+sentinel:// | sentinel |
                                                            #   redis(s)+cluster://
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

from filters.rate_limit.config import PRE_AUTH_SUBJECTS, RateLimitConfig, RateLimitRule, SentinelConfig
from filters.rate_limit.stage import (
    RATE_LIMIT_UNAVAILABLE,
    RATE_LIMITED,
    MemoryBackend,
    PreAuthRateLimit,
    RateLimit,
    RateLimitStage,
    build_stage,
    compile_rules,
    retry_after_seconds,
)

__all__ = [
    "PRE_AUTH_SUBJECTS",
    "RATE_LIMITED",
    "RATE_LIMIT_UNAVAILABLE",
    "MemoryBackend",
    "PreAuthRateLimit",
    "RateLimit",
    "RateLimitConfig",
    "RateLimitRule",
    "RateLimitStage",
    "SentinelConfig",
    "build_stage",
    "compile_rules",
    "retry_after_seconds",
]
