"""Integration password verification: argon2id off the event loop, at most once per credential.

argon2id costs ~100-150 ms of CPU at default parameters, so it never runs on the event loop and
never twice for the same credential: a success is remembered per integration (keyed BLAKE2b digest
of the password, process-random key) until that integration's hash changes; a failure is remembered
briefly; concurrent first attempts share one verification (single flight). Unknown ids run no
argon2 at all: their 401 is padded by a sleep (no CPU) to the calibrated cost of the costliest
configured hash, measured once at load, so the answer takes as long as a wrong password's. At most
``max_concurrent_verifications`` argon2 runs at once, and at most
``max_concurrent_verifications_per_address`` of them for one client address (further ones from that
address wait for its slot), so one address cannot take the verification capacity from the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import argon2
from argon2 import PasswordHasher, profiles
from argon2.exceptions import InvalidHashError, VerificationError
from prometheus_client import Counter

from filters.integrations import clock
from filters.integrations.config import IntegrationsPolicyConfig
from gateway.context import IntegrationIdentity
from gateway.metrics import REGISTRY

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


class CredentialVerifier:
    """Answers "is this the password of integration ``iid``?" for one stage (one runtime), with
    the caches, the single flight, the argon2 pool and the per-address share of it."""

    def __init__(
        self, integrations: dict[str, _Integration], policy: IntegrationsPolicyConfig, hmac_key: bytes
    ):
        self.integrations = integrations
        self.policy = policy
        self.hasher = PasswordHasher()  # verify() reads the parameters from each hash
        # Every failure answers after about one argon2 run at the costliest configured parameters
        # (calibrated once at load by hashing at them, then a moving average of real verifications
        # at them): seconds. Unknown ids sleep this long instead of computing anything.
        self.failure_seconds = 0.0
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

    async def start(self) -> None:
        await self._dummy_hash()
        if self.failure_seconds == 0.0 and self.integrations:
            # The first estimate of the failure time: what making the dummy hash cost (the same
            # argon2 work as verifying against it), so no extra run delays the start.
            self.failure_seconds = _dummy_costs.get(self._dummy_params, 0.0)

    def adopt(self, previous: CredentialVerifier) -> None:
        """Reload: keep the key, the calibration and what is remembered for unchanged integrations."""
        self._key = previous._key
        if self._dummy_params == previous._dummy_params:
            self.failure_seconds = previous.failure_seconds
        unchanged = {
            iid for iid, integ in self.integrations.items() if previous.integrations.get(iid) == integ
        }
        self._good = {iid: d for iid, d in previous._good.items() if iid in unchanged}
        for (iid, digest), exp in previous._bad.items():
            if iid in unchanged or (iid not in self.integrations and iid not in previous.integrations):
                self._bad[(iid, digest)] = exp

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

    def cached_good(self, iid: str, password: str, digest: bytes | None = None) -> bool:
        """Whether ``password`` verified for ``iid`` before (against the current hash); ``digest``:
        ``self.digest(iid, password)`` when the caller has it already."""
        good = self._good.get(iid)
        if good is None:
            return False
        return hmac.compare_digest(good, self.digest(iid, password) if digest is None else digest)

    def digest(self, iid: str, password: str) -> bytes:
        """A keyed hash of (id, password) under this process's random key: what the caches hold
        instead of the password. BLAKE2b in its keyed mode is a MAC (RFC 7693) and costs ~1 µs
        where ``hmac.digest`` (SHA-256) costs ~3 µs with OpenSSL 3; it runs on every request."""
        return hashlib.blake2b(
            iid.encode() + b"\0" + password.encode("utf-8"), key=self._key, digest_size=32
        ).digest()

    async def password_ok(self, iid: str, password: str) -> bool:
        """Whether ``password`` is the password of integration ``iid`` (False for unknown ids,
        answered at once without argon2: the caller pads every failure with ``pad_failure``).
        argon2 runs at most once per (id, password) while the answer is remembered; concurrent
        callers share one run."""
        if iid not in self.integrations:
            _CACHE_UNKNOWN.inc()
            return False
        digest = self.digest(iid, password)
        good = self._good.get(iid)
        if good is not None and hmac.compare_digest(good, digest):
            _CACHE_HIT.inc()
            return True
        key = (iid, digest)
        exp = self._bad.get(key)
        now = clock.now()
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
                self._bad[key] = clock.now() + self.policy.failure_cache_seconds
                self._bad.move_to_end(key)
                while len(self._bad) > self._bad_max:
                    self._bad.popitem(last=False)
            return ok
        finally:
            self._inflight.pop(key, None)
