"""Brute-force accounting for integration logins: leaky-bucket failure counts and lockouts.

Failures are counted per (integration id, client IP) and per client IP strictly (every id alike,
unknown ids included: an address spraying ids backs off after ``ip_free_failures``), and per
integration id loosely (a higher threshold, and never against an (id, IP) pair that authenticated
recently), so an attacker cannot lock the real integration out of its own address. Counts drain
over time (leaky bucket); repeated failures first space attempts out (exponential delays) and then
refuse them for ``lockout_seconds`` (429 with ``Retry-After``).

``LocalFailureStore`` is the in-process store; ``filters.bruteforce_redis`` shares the counts
through Redis and falls back to it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

from prometheus_client import Counter

from filters.integrations import clock
from filters.integrations.config import BruteForceConfig
from gateway.metrics import REGISTRY

LOCKOUTS = Counter(
    "portvakt_integration_lockouts_total",
    "Brute-force lockouts started, by scope (pair, ip, id)",
    ["scope"],
    registry=REGISTRY,
)

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
        now = clock.now()
        wait, locks = self.tracker.admit(iid, ip, now, count)
        return Admission(wait, now, True, locks)

    async def refund(self, iid: str, ip: Any, admission: Admission) -> None:
        self.tracker.refund(iid, ip, admission.at, clock.now())

    async def failure(self, iid: str, ip: Any) -> None:
        self.tracker.failure(iid, ip, clock.now())

    async def success(self, iid: str, ip: Any) -> None:
        self.tracker.success(iid, ip, clock.now())

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def readiness(self) -> dict[str, str]:
        return {}
