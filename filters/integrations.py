"""Fiks integrations (``IntegrasjonId`` + ``IntegrasjonPassord``). Config section ``integrations:``.

An integration is a client system registered with an id (UUID), an argon2id password hash and the
organisation that owns its Maskinporten client. A request carrying the two headers passes this
stage only when the password verifies, the bearer token's consumer org equals the integration's
``authorized_org`` and, when a client certificate is present or required, the certificate's org
number equals it too. Every failure answers the same generic 401 (as Fiks does); the precise reason
goes to ``internal_reason`` (audit, log, metrics).

argon2id costs ~100-150 ms of CPU at default parameters, so it never runs on the event loop and
never twice for the same credential: a success is remembered per integration (keyed digest of the
password, process-random HMAC key) until that integration's hash changes; a failure is remembered
briefly; concurrent first attempts share one verification (single flight). Unknown ids run no
argon2 at all: their 401 is padded by a sleep (no CPU) to the calibrated cost of the costliest
configured hash, measured once at load, so the answer takes as long as a wrong password's. At most
``max_concurrent_verifications`` argon2 runs at once, and at most
``max_concurrent_verifications_per_address`` of them for one client address (further ones from that
address wait for its slot), so one address cannot take the verification capacity from the others.

Brute force: failures are counted per (integration id, client IP) and per client IP strictly (every
id alike, unknown ids included: an address spraying ids backs off after ``ip_free_failures``), and
per integration id loosely (a higher threshold, and never against an (id, IP) pair that
authenticated recently), so an attacker cannot lock the real integration out of its own address.
Counts drain over time (leaky bucket); repeated failures first space attempts out (exponential
delays) and then refuse them for ``lockout_seconds`` (429 with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import hmac
import logging
import math
import os
import re
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import argon2
from argon2 import PasswordHasher, profiles
from argon2.exceptions import InvalidHashError, VerificationError
from prometheus_client import Counter
from pydantic import Field, field_validator

from gateway import problems
from gateway.chain import ALLOW, POS_INTEGRATIONS, SKIP, BuildEnv, Decision, Deny, Filter, Mode, Stage
from gateway.configbase import Model
from gateway.context import IntegrationIdentity, RequestContext
from gateway.metrics import REGISTRY
from gateway.problems import Problem

if TYPE_CHECKING:  # pragma: no cover
    from gateway.config import RouteConfig

log = logging.getLogger("portvakt.integrations")

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
ORG_RE = re.compile(r"^[0-9]{9}\Z")
_now = time.monotonic  # the clock for caches and lockouts (tests substitute their own)
MAX_PASSWORD_LENGTH = 1024  # longer values are refused before argon2 (cheap DoS guard)

ID_HEADER = "IntegrasjonId"
PASSWORD_HEADER = "IntegrasjonPassord"
CHALLENGE = 'IntegrasjonPassord realm="portvakt"'
GENERIC_DETAIL = "The integration could not be authenticated."

# --- config --------------------------------------------------------------------------------


class GrantConfig(Model):
    organization: str = Field(description="The organisation (org number) that granted access")
    services: list[str] = Field(description="Services of that organisation this integration may use")

    @field_validator("organization")
    @classmethod
    def _org(cls, v: str) -> str:
        if not ORG_RE.match(v):
            raise ValueError("must be a 9-digit organisation number")
        return v

    @field_validator("services")
    @classmethod
    def _services(cls, v: list[str]) -> list[str]:
        if not v or any(not s.strip() for s in v):
            raise ValueError("must list at least one non-empty service name")
        return v


class IntegrationConfig(Model):
    id: str = Field(description="IntegrasjonId (UUID)")
    password_hash: str = Field(description="argon2id hash from `portvakt hash-password`")
    authorized_org: str = Field(description="Org number that owns the Maskinporten client")
    require_certificate: bool = Field(
        False, description="Require an enterprise client cert with the same org"
    )
    grants: list[GrantConfig] = Field(default_factory=list)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not UUID_RE.match(v):
            raise ValueError("must be a UUID like 7b1c9a52-0d3e-4a8f-9c61-2f5e8d4b1a07")
        return v.lower()

    @field_validator("password_hash")
    @classmethod
    def _hash(cls, v: str) -> str:
        try:
            params = argon2.extract_parameters(v)
        except InvalidHashError:
            raise ValueError("not an argon2 hash: make one with `portvakt hash-password`") from None
        if params.type is not argon2.Type.ID:
            raise ValueError("must be an argon2id hash ($argon2id$...)")
        return v

    @field_validator("authorized_org")
    @classmethod
    def _org(cls, v: str) -> str:
        if not ORG_RE.match(v):
            raise ValueError("must be a 9-digit organisation number")
        return v


class BruteForceConfig(Model):
    enabled: bool = Field(True, description="Count failed integration logins and refuse repeated ones")
    free_failures: int = Field(3, ge=0, description="Failures per (id, client IP) answered without any delay")
    max_failures: int = Field(10, ge=1, description="Failures per (id, client IP) that lock that pair out")
    ip_free_failures: int = Field(
        10,
        ge=0,
        description="Failures from one client IP (any id, unknown ids too) answered without delay; "
        "each further one makes that IP wait 1 s, 2 s, 4 s ... (429 meanwhile) until ip_max_failures locks it",
    )
    ip_max_failures: int = Field(
        30, ge=1, description="Failures from one client IP (any id) that lock the IP out"
    )
    id_max_failures: int = Field(
        100,
        ge=1,
        description="Failures for one id (any IP) that lock the id out, except for recently good (id, IP) pairs",
    )
    lockout_seconds: float = Field(
        300.0, gt=0, description="How long a lockout lasts (also the longest delay)"
    )
    decay_seconds: float = Field(
        60.0, gt=0, description="One counted failure is forgotten every decay_seconds"
    )
    known_good_seconds: float = Field(
        86400.0,
        ge=0,
        description="An (id, IP) pair that authenticated is exempt from the per-id lockout this long",
    )
    max_tracked: int = Field(100_000, ge=100, description="Bound on remembered keys per table (LRU)")
    redis_url: str | None = Field(
        None,
        description="Redis URL, any form of the README's Redis section (use ${ENV} for a password): counts and "
        "lockouts shared by every worker and host using it. Absent: in-process (per process). Redis failing: in-process fallback",
    )
    redis_key_prefix: str = Field("portvakt", description="Prefix of the brute-force keys in Redis")
    redis_timeout_ms: int = Field(
        1000,
        gt=0,
        le=10_000,
        description="Per Redis call; then the in-process fallback (which has mirrored this process's counts)",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        from filters.redis_client import check_url

        return v if v is None else check_url(v)


class IntegrationsPolicyConfig(Model):
    mode: Mode = Field(Mode.enforce, description="off | detect | enforce for the integrations filter")
    brute_force: BruteForceConfig = Field(default_factory=BruteForceConfig)
    failure_cache_seconds: float = Field(
        60.0,
        ge=0,
        description="How long a failed (id, password) is remembered so argon2 does not rerun for it",
    )
    max_concurrent_verifications: int = Field(
        0, ge=0, description="argon2 threads (0: the number of CPUs); further verifications queue"
    )
    max_concurrent_verifications_per_address: int = Field(
        1,
        ge=1,
        description="argon2 verifications one client address may have running or queued in the "
        "pool at once; its further attempts wait for its own slot (unknown ids never take one)",
    )
    password_hash_floor: Literal["owasp", "none"] = Field(
        "owasp",
        description="owasp: refuse argon2id hashes cheaper than OWASP's minimum (memory KiB per time cost: t=1 "
        "47104, t=2 19456, t=3 12288, t=4 9216, t>=5 7168; parallelism 1 or more). none: accept any (tests only)",
    )


# --- problems and metrics ------------------------------------------------------------------

INTEGRATION_AUTH_FAILED = problems.register(
    "integration_auth_failed", 401, "Integration authentication failed"
)
TOO_MANY_FAILED_ATTEMPTS = problems.register(
    "too_many_failed_attempts", 429, "Too many failed authentication attempts"
)

# Internal reasons (audit/log/metrics only; the client sees integration_auth_failed).
INTEGRATION_UNKNOWN = "integration_unknown"
INTEGRATION_BAD_PASSWORD = "integration_bad_password"
INTEGRATION_ORG_MISMATCH = "integration_org_mismatch"
INTEGRATION_CERT_MISMATCH = "integration_cert_mismatch"
INTEGRATION_CERT_REQUIRED = "integration_cert_required"
INTEGRATION_TOKEN_MISSING = "integration_token_missing"
INTEGRATION_CREDENTIALS_INCOMPLETE = "integration_credentials_incomplete"
INTEGRATION_ID_MALFORMED = "integration_id_malformed"

ARGON2_RUNS = Counter(
    "portvakt_argon2_verifications_total",
    "argon2id verifications actually run, by result (match, mismatch; unknown ids run none)",
    ["result"],
    registry=REGISTRY,
)
CREDENTIAL_CACHE = Counter(
    "portvakt_integration_credential_cache_total",
    "Integration password checks answered from memory (hit, negative_hit), by argon2 (miss) or without "
    "argon2 for an unknown id (unknown: a padded sleep)",
    ["result"],
    registry=REGISTRY,
)
_CACHE_HIT = CREDENTIAL_CACHE.labels("hit")
_CACHE_NEGATIVE_HIT = CREDENTIAL_CACHE.labels("negative_hit")
_CACHE_MISS = CREDENTIAL_CACHE.labels("miss")
_CACHE_UNKNOWN = CREDENTIAL_CACHE.labels("unknown")
LOCKOUTS = Counter(
    "portvakt_integration_lockouts_total",
    "Brute-force lockouts started, by scope (pair, ip, id)",
    ["scope"],
    registry=REGISTRY,
)

# --- argon2 off the event loop ---------------------------------------------------------------

_executors: dict[int, ThreadPoolExecutor] = {}
_dummy_hashes: dict[tuple[int, int, int], str] = {}
_dummy_costs: dict[tuple[int, int, int], float] = {}  # seconds making each dummy hash took


def _executor(workers: int) -> ThreadPoolExecutor:
    """One process-wide pool per size, so reloads do not leak threads."""
    ex = _executors.get(workers)
    if ex is None:
        ex = _executors[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="argon2")
    return ex


def _verify(hasher: PasswordHasher, pw_hash: str, password: str) -> bool:
    try:
        return bool(hasher.verify(pw_hash, password))
    except VerificationError:  # includes VerifyMismatchError
        return False
    except InvalidHashError:  # validated at load; fail closed anyway
        return False


# --- brute-force accounting ------------------------------------------------------------------

LOCK_PAIR, LOCK_IP, LOCK_ID = 1, 2, 4  # which lockouts a counted failure started


def record_lockouts(locks: int) -> None:
    for bit, scope in ((LOCK_PAIR, "pair"), (LOCK_IP, "ip"), (LOCK_ID, "id")):
        if locks & bit:
            LOCKOUTS.labels(scope).inc()


@dataclass(slots=True)
class _Count:
    score: int = 0
    updated: float = 0.0  # when the last whole failure drained (or the count started)
    blocked_until: float = 0.0


class FailureTracker:
    """Leaky-bucket failure counts per (id, IP), per IP and per id, with lockouts.

    ``retry_after(id, ip, now)`` says how long a new attempt must wait (0: go ahead); ``failure``
    and ``success`` record outcomes. Blocked attempts are refused before any check and are not
    counted, so a lockout ends on time.
    """

    def __init__(self, cfg: BruteForceConfig):
        self.cfg = cfg
        self.pairs: OrderedDict[tuple[str, Any], _Count] = OrderedDict()
        self.ips: OrderedDict[Any, _Count] = OrderedDict()
        self.ids: OrderedDict[str, _Count] = OrderedDict()
        self.known_good: OrderedDict[tuple[str, Any], float] = OrderedDict()

    def take_over(self, old: FailureTracker) -> None:
        """Keep the old tracker's counts (a reload must not lift lockouts); use our thresholds."""
        self.pairs, self.ips, self.ids, self.known_good = old.pairs, old.ips, old.ids, old.known_good

    def _get(self, table: OrderedDict, key: Any, now: float) -> _Count:
        c = table.get(key)
        if c is None:
            c = table[key] = _Count(updated=now)
            if len(table) > self.cfg.max_tracked:
                table.popitem(last=False)
        else:
            table.move_to_end(key)
            # Whole failures drain, one per decay_seconds, so thresholds compare exact counts.
            drained = int((now - c.updated) // self.cfg.decay_seconds)
            if drained > 0:
                c.score = max(0, c.score - drained)
                c.updated = now if c.score == 0 else c.updated + drained * self.cfg.decay_seconds
        return c

    def _known_good(self, iid: str, ip: Any, now: float) -> bool:
        t = self.known_good.get((iid, ip))
        return t is not None and now - t <= self.cfg.known_good_seconds

    def retry_after(self, iid: str, ip: Any, now: float) -> float:
        if not self.cfg.enabled:
            return 0.0
        until = 0.0
        c = self.pairs.get((iid, ip))
        if c is not None:
            until = max(until, c.blocked_until)
        c = self.ips.get(ip)
        if c is not None:
            until = max(until, c.blocked_until)
        c = self.ids.get(iid)
        if c is not None and c.blocked_until > now and not self._known_good(iid, ip, now):
            until = max(until, c.blocked_until)
        return max(0.0, until - now)

    def failure(self, iid: str, ip: Any, now: float, count_lockouts: bool = True) -> int:
        """Count one failure. Returns the lockouts it started (``LOCK_PAIR | LOCK_IP | LOCK_ID``
        bits), counted in the metric unless ``count_lockouts`` is False (an advance count: the
        metric waits for the attempt to fail, see ``record_lockouts``)."""
        if not self.cfg.enabled:
            return 0
        cfg = self.cfg
        locks = 0
        pair = self._get(self.pairs, (iid, ip), now)
        pair.score += 1
        if pair.score >= cfg.max_failures:
            pair.blocked_until = now + cfg.lockout_seconds
            locks |= LOCK_PAIR
        elif pair.score > cfg.free_failures:
            # Space attempts out: 1 s, 2 s, 4 s ... before the lockout proper.
            delay = min(cfg.lockout_seconds, 2.0 ** (pair.score - cfg.free_failures - 1))
            pair.blocked_until = now + delay
        ipc = self._get(self.ips, ip, now)
        ipc.score += 1
        if ipc.score >= cfg.ip_max_failures:
            ipc.blocked_until = now + cfg.lockout_seconds
            locks |= LOCK_IP
        elif ipc.score > cfg.ip_free_failures:
            # An address spraying ids (or guessing for many) is spaced out like a pair.
            delay = min(cfg.lockout_seconds, 2.0 ** (ipc.score - cfg.ip_free_failures - 1))
            ipc.blocked_until = max(ipc.blocked_until, now + delay)
        idc = self._get(self.ids, iid, now)
        idc.score += 1
        if idc.score >= cfg.id_max_failures:
            idc.blocked_until = now + cfg.lockout_seconds
            locks |= LOCK_ID
        if count_lockouts:
            record_lockouts(locks)
        return locks

    def admit(self, iid: str, ip: Any, now: float, count: bool = True) -> tuple[float, int]:
        """Refuse (the wait, > 0) or admit (0.0) one attempt. With ``count`` an admitted attempt
        is counted as a failure at once, before its password is checked, and ``refund`` takes
        it back when it succeeds: concurrent guesses can never all pass the check before the
        first failure is recorded, so exactly ``max_failures`` guesses reach the password check."""
        wait = self.retry_after(iid, ip, now)
        locks = 0
        if wait <= 0 and count:
            locks = self.failure(iid, ip, now, count_lockouts=False)
        return wait, locks

    def refund(self, iid: str, ip: Any, admitted_at: float, now: float) -> None:
        """The attempt admitted (and counted) at ``admitted_at`` succeeded: its count is taken
        back, and a lockout that only it completed (started since ``admitted_at``) is lifted."""
        if not self.cfg.enabled:
            return
        cfg = self.cfg
        for table, key, limit in ((self.ips, ip, cfg.ip_max_failures), (self.ids, iid, cfg.id_max_failures)):
            c = table.get(key)
            if c is not None and c.score > 0:
                c.score -= 1
                if c.score < limit and c.blocked_until >= admitted_at + cfg.lockout_seconds:
                    c.blocked_until = 0.0
                elif (
                    table is self.ips
                    and c.score <= cfg.ip_free_failures
                    and c.blocked_until < admitted_at + cfg.lockout_seconds
                ):
                    c.blocked_until = 0.0  # a back-off delay the address no longer earns
        self.success(iid, ip, now)

    def success(self, iid: str, ip: Any, now: float) -> None:
        if not self.cfg.enabled:
            return
        key = (iid, ip)
        if self.pairs:
            self.pairs.pop(key, None)
        last = self.known_good.get(key)
        if last is not None and now - last < min(60.0, self.cfg.known_good_seconds / 2):
            return  # refreshed recently: spare the LRU bookkeeping on every request
        self.known_good[key] = now
        self.known_good.move_to_end(key)
        if len(self.known_good) > self.cfg.max_tracked:
            self.known_good.popitem(last=False)


class Admission(NamedTuple):
    """A brute-force store's answer to one attempt: ``wait`` > 0 refuses it; ``at`` is the
    store's time of admission (for ``refund``); ``local``: the in-process store counted it."""

    wait: float
    at: float
    local: bool
    locks: int = 0  # lockouts the advance count started: recorded in the metric if the attempt fails
    mirrored_at: float | None = None  # Redis admissions: when the in-process mirror counted it too


class LocalFailureStore:
    """The in-process ``FailureTracker`` behind the store interface the filter awaits (the
    Redis store, ``filters.bruteforce_redis``, has the same methods and falls back to this)."""

    def __init__(self, tracker: FailureTracker) -> None:
        self.tracker = tracker

    async def admit(self, iid: str, ip: Any, count: bool = True) -> Admission:
        now = _now()
        wait, locks = self.tracker.admit(iid, ip, now, count)
        return Admission(wait, now, True, locks)

    async def refund(self, iid: str, ip: Any, admission: Admission) -> None:
        self.tracker.refund(iid, ip, admission.at, _now())

    async def failure(self, iid: str, ip: Any) -> None:
        self.tracker.failure(iid, ip, _now())

    async def success(self, iid: str, ip: Any) -> None:
        self.tracker.success(iid, ip, _now())

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def readiness(self) -> dict[str, str]:
        return {}


# --- the stage -------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class _Integration:
    id: str
    password_hash: str
    authorized_org: str
    require_certificate: bool

    @property
    def params(self) -> tuple[int, int, int]:
        p = argon2.extract_parameters(self.password_hash)
        return (p.time_cost, p.memory_cost, p.parallelism)

    @property
    def identity(self) -> IntegrationIdentity:
        return _IDENTITIES.setdefault(
            (self.id, self.authorized_org), IntegrationIdentity(self.id, self.authorized_org)
        )


# Immutable, so one instance per (id, org) serves every request.
_IDENTITIES: dict[tuple[str, str], IntegrationIdentity] = {}


class IntegrationsStage(Stage):
    name = "integrations"

    def __init__(
        self, integrations: list[IntegrationConfig], policy: IntegrationsPolicyConfig, hmac_key: bytes
    ):
        self.policy = policy
        self.integrations: dict[str, _Integration] = {
            i.id: _Integration(i.id, i.password_hash, i.authorized_org, i.require_certificate)
            for i in integrations
        }
        self.hasher = PasswordHasher()  # verify() reads the parameters from each hash
        self.tracker = FailureTracker(policy.brute_force)
        self.store: Any = LocalFailureStore(self.tracker)
        if policy.brute_force.redis_url is not None and policy.brute_force.enabled:
            from filters.bruteforce_redis import RedisFailureStore

            try:
                self.store = RedisFailureStore(policy.brute_force, self.store)
            except ValueError as e:  # redis-py's URL parsing: names no field, never echoes the URL
                raise ValueError(f"integrations_policy.brute_force.redis_url: {e}") from None
        # Every failure answers after about one argon2 run at the costliest configured parameters
        # (calibrated once at load by hashing at them, then a moving average of real verifications
        # at them): seconds. Unknown ids sleep this long instead of computing anything.
        self.failure_seconds = 0.0
        self.good_seen: dict[tuple[str, Any], float] = {}  # (id, IP) -> when the store last heard of it
        self.admissions: dict[tuple[str, bytes, Any], asyncio.Future[Admission]] = {}  # guesses in flight
        self._key = hmac_key
        # id -> keyed digest of the password that verified against the current hash.
        self._good: dict[str, bytes] = {}
        # (id, digest) -> expiry (monotonic) of a remembered failure. Bounded, oldest first out.
        self._bad: OrderedDict[tuple[str, bytes], float] = OrderedDict()
        self._bad_max = 10_000
        self._inflight: dict[tuple[str, bytes], asyncio.Future[bool]] = {}
        self._workers = policy.max_concurrent_verifications or (os.cpu_count() or 2)
        # client address -> [its semaphore, holders + waiters]: argon2 capacity per address.
        self._address_slots: dict[Any, list[Any]] = {}
        self._dummy_params = self._common_params()
        self._filter = IntegrationsFilter(self, policy.mode)

    # Stage interface

    def filters_for_route(self, route: RouteConfig) -> list[Filter]:
        # Only protected routes look at credentials; elsewhere the headers mean nothing.
        if route.access is None or self.policy.mode is Mode.off:
            return []
        return [self._filter]

    async def start(self) -> None:
        await self._dummy_hash()
        await self.store.start()
        if self.failure_seconds == 0.0 and self.integrations:
            # The first estimate of the failure time: what making the dummy hash cost (the same
            # argon2 work as verifying against it), so no extra run delays the start.
            self.failure_seconds = _dummy_costs.get(self._dummy_params, 0.0)

    async def close(self) -> None:
        await self.store.close()

    @contextlib.asynccontextmanager
    async def address_slot(self, ip: Any) -> AsyncIterator[None]:
        """Hold one of ``ip``'s ``max_concurrent_verifications_per_address`` verification slots."""
        entry = self._address_slots.get(ip)
        if entry is None:
            entry = self._address_slots[ip] = [
                asyncio.Semaphore(self.policy.max_concurrent_verifications_per_address),
                0,
            ]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                self._address_slots.pop(ip, None)

    def _observe_max_cost(self, seconds: float) -> None:
        prev = self.failure_seconds
        self.failure_seconds = seconds if prev == 0.0 else prev + 0.2 * (seconds - prev)

    async def pad_failure(self, started: float) -> None:
        """Sleep until a failed attempt has taken as long as an argon2 run at the costliest
        configured parameters (unknown id, wrong password of a cheaper hash, answers from the
        failure cache and lockouts all end alike). A sleep: no CPU is spent on it."""
        left = self.failure_seconds - (time.perf_counter() - started)
        if left > 0:
            await asyncio.sleep(left)

    def adopt(self, previous: Stage) -> None:
        if not isinstance(previous, IntegrationsStage):
            return
        self._key = previous._key
        self.tracker.take_over(previous.tracker)
        if self._dummy_params == previous._dummy_params:
            self.failure_seconds = previous.failure_seconds
        unchanged = {
            iid for iid, integ in self.integrations.items() if previous.integrations.get(iid) == integ
        }
        self._good = {iid: d for iid, d in previous._good.items() if iid in unchanged}
        for (iid, digest), exp in previous._bad.items():
            if iid in unchanged or (iid not in self.integrations and iid not in previous.integrations):
                self._bad[(iid, digest)] = exp

    def readiness(self) -> dict[str, str]:
        return self.store.readiness()

    # Password checking

    def _common_params(self) -> tuple[int, int, int]:
        """argon2 parameters for the dummy hash: the costliest among configured hashes (time cost
        x memory, then parallelism), so an unknown id costs what the slowest real one does and
        ``pad_failure`` brings every cheaper failure up to it."""
        params = set()
        for integ in self.integrations.values():
            p = argon2.extract_parameters(integ.password_hash)
            params.add((p.time_cost, p.memory_cost, p.parallelism))
        if not params:
            d = profiles.RFC_9106_LOW_MEMORY
            return (d.time_cost, d.memory_cost, d.parallelism)
        return max(params, key=lambda k: (k[0] * k[1], k[2]))

    async def _dummy_hash(self) -> str:
        """Hash a random password at the costliest parameters once per process and parameter set:
        the calibration of ``failure_seconds`` (the hash itself is no longer verified against)."""
        h = _dummy_hashes.get(self._dummy_params)
        if h is None:
            t, m, p = self._dummy_params
            hasher = PasswordHasher(time_cost=t, memory_cost=m, parallelism=p)
            loop = asyncio.get_running_loop()
            t0 = time.perf_counter()
            h = await loop.run_in_executor(_executor(self._workers), hasher.hash, os.urandom(24).hex())
            _dummy_costs.setdefault(self._dummy_params, time.perf_counter() - t0)
            h = _dummy_hashes.setdefault(self._dummy_params, h)
        return h

    def cached_good(self, iid: str, password: str) -> bool:
        """Whether ``password`` verified for ``iid`` before (against the current hash)."""
        good = self._good.get(iid)
        return good is not None and hmac.compare_digest(good, self._digest(iid, password))

    def good_refresh_due(self, iid: str, ip: Any) -> bool:
        """For a known-good credential: whether to tell the store again that this (id, IP) pair
        authenticated (at most once a minute per pair, so a shared store is not written per request)."""
        key = (iid, ip)
        now = time.monotonic()
        last = self.good_seen.get(key)
        if last is not None and now - last < 60.0:
            return False
        if len(self.good_seen) >= 100_000:
            self.good_seen.clear()
        self.good_seen[key] = now
        return True

    def _digest(self, iid: str, password: str) -> bytes:
        return hmac.digest(self._key, iid.encode() + b"\0" + password.encode("utf-8"), "sha256")

    async def password_ok(self, iid: str, password: str) -> bool:
        """Whether ``password`` is the password of integration ``iid`` (False for unknown ids,
        answered at once without argon2: the caller pads every failure with ``pad_failure``).
        argon2 runs at most once per (id, password) while the answer is remembered; concurrent
        callers share one run."""
        if iid not in self.integrations:
            _CACHE_UNKNOWN.inc()
            return False
        digest = self._digest(iid, password)
        good = self._good.get(iid)
        if good is not None and hmac.compare_digest(good, digest):
            _CACHE_HIT.inc()
            return True
        key = (iid, digest)
        exp = self._bad.get(key)
        now = _now()
        if exp is not None:
            if exp > now:
                _CACHE_NEGATIVE_HIT.inc()
                return False
            del self._bad[key]
        fut = self._inflight.get(key)
        if fut is None:
            _CACHE_MISS.inc()
            fut = self._inflight[key] = asyncio.ensure_future(self._run_verification(iid, digest, password))
        # shield: a cancelled waiter (client gone, filter timeout) must not cancel the shared run.
        return await asyncio.shield(fut)

    async def _run_verification(self, iid: str, digest: bytes, password: str) -> bool:
        key = (iid, digest)
        try:
            integ = self.integrations.get(iid)
            loop = asyncio.get_running_loop()
            ex = _executor(self._workers)
            t0 = time.perf_counter()
            if integ is None:  # removed by a reload meanwhile: nothing to verify against
                ok = False
            else:
                ok = await loop.run_in_executor(ex, _verify, self.hasher, integ.password_hash, password)
                ARGON2_RUNS.labels("match" if ok else "mismatch").inc()
                if integ.params == self._dummy_params:
                    self._observe_max_cost(time.perf_counter() - t0)
            if ok:
                self._good[iid] = digest
            elif self.policy.failure_cache_seconds > 0:
                self._bad[key] = _now() + self.policy.failure_cache_seconds
                self._bad.move_to_end(key)
                while len(self._bad) > self._bad_max:
                    self._bad.popitem(last=False)
            return ok
        finally:
            self._inflight.pop(key, None)


def _usable(password: str) -> bool:
    """Non-empty, bounded, and valid UTF-8 (aiohttp keeps undecodable header bytes as surrogates,
    which no hash made by `portvakt hash-password` can match)."""
    if not password or len(password) > MAX_PASSWORD_LENGTH:
        return False
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _same(a: str | None, b: str) -> bool:
    return a is not None and hmac.compare_digest(a.encode(), b.encode())


class IntegrationsFilter(Filter):
    name = "integrations"
    position = POS_INTEGRATIONS

    def __init__(self, stage: IntegrationsStage, mode: Mode):
        self.stage = stage
        self.mode = mode

    def _fail(self, ctx: RequestContext, reason: str) -> Deny:
        ctx.audit["integrations"] = {"id": ctx.integration_id_claimed, "result": "denied", "reason": reason}
        return Deny(
            Problem(
                INTEGRATION_AUTH_FAILED,
                detail=GENERIC_DETAIL,
                internal_reason=reason,
                headers={"WWW-Authenticate": CHALLENGE},
            )
        )

    async def check(self, ctx: RequestContext) -> Decision:
        ids = ctx.headers.getall(ID_HEADER, [])
        pws = ctx.headers.getall(PASSWORD_HEADER, [])
        if not ids and not pws:
            return SKIP
        iid = ids[0].strip().lower() if len(ids) == 1 and UUID_RE.match(ids[0].strip()) else None
        ctx.integration_id_claimed = iid
        if len(ids) != 1 or len(pws) != 1:
            return self._fail(ctx, INTEGRATION_CREDENTIALS_INCOMPLETE)
        if iid is None:
            return self._fail(ctx, INTEGRATION_ID_MALFORMED)
        stage = self.stage
        started = time.perf_counter()
        ip = ctx.client_ip
        if ctx.token is None:
            # Checked before the password, so it reveals nothing about it: not counted.
            return self._fail(ctx, INTEGRATION_TOKEN_MISSING)
        password = pws[0]
        integ = stage.integrations.get(iid)
        usable = _usable(password)
        # A password this process verified before for this id needs no advance count (it cannot
        # be a guess); it still has to wait out a lockout, or a lockout would be an oracle.
        known_good = usable and integ is not None and stage.cached_good(iid, password)
        # Concurrent attempts with the same (id, password, address) are one guess: the first is
        # admitted (and counted); the others share its admission and its argon2 run, and leave
        # the accounting to it.
        guess = (iid, stage._digest(iid, password), ip) if usable else None
        first = stage.admissions.get(guess) if guess is not None else None  # type: ignore[arg-type]
        shared = False
        if first is not None:
            try:
                admission = await asyncio.shield(first)
                shared = True
            except asyncio.CancelledError:
                if not first.cancelled():
                    raise  # this request itself was cancelled
                # The first attempt was abandoned before its admission: admit this one alone.
                guess = None
        if not shared:
            pending: asyncio.Future[Admission] | None = None
            if guess is not None:
                pending = stage.admissions[guess] = asyncio.get_running_loop().create_future()
            try:
                admission = await stage.store.admit(iid, ip, count=not known_good)
            except BaseException:
                if pending is not None:
                    stage.admissions.pop(guess, None)  # type: ignore[arg-type]
                    pending.cancel()
                raise
            if pending is not None:
                pending.set_result(admission)
        try:
            return await self._attempt(
                ctx, iid, ip, password, integ, usable, known_good, shared, admission, started
            )
        finally:
            if not shared and guess is not None:
                stage.admissions.pop(guess, None)

    async def _attempt(
        self,
        ctx: RequestContext,
        iid: str,
        ip: Any,
        password: str,
        integ: _Integration | None,
        usable: bool,
        known_good: bool,
        shared: bool,
        admission: Admission,
        started: float,
    ) -> Decision:
        stage = self.stage
        if admission.wait > 0:
            ctx.audit["integrations"] = {"id": iid, "result": "refused", "reason": TOO_MANY_FAILED_ATTEMPTS}
            await stage.pad_failure(started)
            return Deny(
                Problem(
                    TOO_MANY_FAILED_ATTEMPTS,
                    detail="Too many failed attempts; retry later.",
                    headers={"Retry-After": str(max(1, math.ceil(admission.wait)))},
                )
            )
        if known_good:
            _CACHE_HIT.inc()
            ok = True
        elif usable and (integ is None or shared):
            # Unknown ids run no argon2 (padded below); a shared guess waits for its first's run.
            ok = await stage.password_ok(iid, password)
        elif usable:
            async with stage.address_slot(ip):  # this address's share of the argon2 capacity
                ok = await stage.password_ok(iid, password)
        else:  # nothing argon2 could match: answered without it (the padding hides that)
            ok = False
        reason: str | None = None
        if integ is None:
            reason = INTEGRATION_UNKNOWN
        elif not ok:
            reason = INTEGRATION_BAD_PASSWORD
        elif ctx.token is None or not _same(ctx.token.consumer_org, integ.authorized_org):
            reason = INTEGRATION_ORG_MISMATCH
        elif ctx.certificate is not None or integ.require_certificate:
            if ctx.certificate is None:
                reason = INTEGRATION_CERT_REQUIRED
            elif not _same(ctx.certificate.org_number, integ.authorized_org):
                reason = INTEGRATION_CERT_MISMATCH
        if reason is not None:
            # Every failure after the password check counts alike (admit counted it already,
            # unless the password was known good), so lockouts cannot tell an attacker which
            # part failed; and every failure takes as long as the costliest argon2 run.
            stage.good_seen.pop((iid, ip), None)
            if known_good and not shared:
                await stage.store.failure(iid, ip)
            elif not shared:
                record_lockouts(admission.locks)
            await stage.pad_failure(started)
            return self._fail(ctx, reason)
        assert integ is not None and ctx.token is not None
        if shared:
            pass  # the first attempt of this guess does the accounting
        elif not known_good:
            await stage.store.refund(iid, ip, admission)
            stage.good_seen[(iid, ip)] = time.monotonic()
        elif stage.good_refresh_due(iid, ip):
            await stage.store.success(iid, ip)
        ctx.integration = integ.identity
        ctx.audit["integrations"] = {"id": integ.id, "result": "ok", "authorized_org": integ.authorized_org}
        return ALLOW


def build_stage(env: BuildEnv) -> IntegrationsStage | None:
    """The integrations stage: built when integrations are configured (else there is nothing to
    verify against, and requests with the headers fall to the authorize stage's rules)."""
    cfg = env.config
    policy: IntegrationsPolicyConfig = getattr(cfg, "integrations_policy", None) or IntegrationsPolicyConfig()
    if policy.password_hash_floor == "owasp":
        for i, integ in enumerate(cfg.integrations):
            weak = below_floor(integ.password_hash)
            if weak:
                raise ValueError(f"integrations[{i}].password_hash: {weak}")
    key = env.secrets.setdefault("integrations.hmac_key", os.urandom(32))
    return IntegrationsStage(list(cfg.integrations), policy, key)


# OWASP Password Storage Cheat Sheet, argon2id minimums: memory (KiB) for each time cost, all
# equally strong; any parallelism of 1 or more. Costlier settings (RFC 9106's are) pass.
ARGON2_FLOOR_KIB = {1: 47104, 2: 19456, 3: 12288, 4: 9216, 5: 7168}


def below_floor(password_hash: str) -> str | None:
    """Why an argon2id hash is weaker than the floor (``ARGON2_FLOOR_KIB``), or None."""
    p = argon2.extract_parameters(password_hash)
    need = ARGON2_FLOOR_KIB[min(p.time_cost, 5)]
    if p.memory_cost < need:
        return (
            f"argon2 parameters m={p.memory_cost} KiB, t={p.time_cost} are below the floor (t={min(p.time_cost, 5)} "
            f"needs m >= {need} KiB, OWASP's argon2id minimum): re-hash with `portvakt hash-password`"
        )
    return None


# --- `portvakt hash-password` ----------------------------------------------------------------


def register_commands(subparsers: Any) -> None:
    """Add ``hash-password`` to the ``portvakt`` CLI (argparse sub-parsers)."""
    d = profiles.RFC_9106_LOW_MEMORY
    p = subparsers.add_parser(
        "hash-password",
        help="Print the argon2id hash of an integration password",
        description="Reads the password from stdin when it is not a terminal, else prompts twice. "
        "Prints the argon2id hash for an integrations[].password_hash entry.",
    )
    p.add_argument(
        "--time-cost", type=int, default=d.time_cost, help=f"argon2 iterations (default {d.time_cost})"
    )
    p.add_argument(
        "--memory-cost",
        type=int,
        default=d.memory_cost,
        help=f"argon2 memory in KiB (default {d.memory_cost})",
    )
    p.add_argument(
        "--parallelism", type=int, default=d.parallelism, help=f"argon2 lanes (default {d.parallelism})"
    )
    p.set_defaults(func=cmd_hash_password)


def cmd_hash_password(args: Any) -> int:
    if sys.stdin is not None and not sys.stdin.isatty():
        password = sys.stdin.read()
        # Drop exactly one line ending (echo adds one); keep any other whitespace, it may be meant.
        if password.endswith("\r\n"):
            password = password[:-2]
        elif password.endswith("\n"):
            password = password[:-1]
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != password:
            print("portvakt hash-password: passwords differ", file=sys.stderr)
            return 2
    if not password:
        print("portvakt hash-password: empty password", file=sys.stderr)
        return 2
    if len(password) > MAX_PASSWORD_LENGTH:
        print(f"portvakt hash-password: longer than {MAX_PASSWORD_LENGTH} characters", file=sys.stderr)
        return 2
    try:
        hasher = PasswordHasher(
            time_cost=args.time_cost, memory_cost=args.memory_cost, parallelism=args.parallelism
        )
        print(hasher.hash(password))
    except (argon2.exceptions.HashingError, ValueError) as e:
        print(f"portvakt hash-password: {e}", file=sys.stderr)
        return 2
    return 0
