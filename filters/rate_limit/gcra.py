"""GCRA (generic cell rate algorithm): the one rate-limit algorithm, in Lua for Redis and in Python.

A policy "``limit`` requests per ``period``, ``burst`` at once" becomes two numbers:

- the emission interval ``T = period / limit`` (the steady spacing between admitted requests),
- the tolerance ``tau = burst * T`` (how far ahead of "now" the schedule may run).

Each subject keeps one value, its theoretical arrival time ``TAT``: the moment its schedule would
be empty again. A request at ``now`` is admitted iff ``max(TAT, now) + T - tau <= now``; admitting
it moves ``TAT`` to ``max(TAT, now) + T``. A refused request changes nothing. Consequences:

- an idle subject can send ``burst`` requests at once, then one every ``T``;
- in any window of length ``w`` at most ``burst + floor(w / T)`` requests are admitted;
- with the default ``burst = limit`` an idle subject gets exactly ``limit`` per ``period`` back;
- ``TAT - now`` is all the state there is, so the key expires (TTL) when the schedule is empty.

All times are integer microseconds. Lua numbers are doubles, exact for integers below 2**53
(µs since 1970 are ~1.8e15), so the Redis and the Python versions compute the same values. The
Redis version reads the server's clock (``TIME``) so hosts with skewed clocks agree; tests may pass
an explicit ``now`` instead (the gateway never does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

US = 1_000_000


@dataclass(slots=True, frozen=True)
class Policy:
    """A compiled GCRA policy: ``limit`` per ``period`` seconds, ``burst`` admitted at once."""

    limit: int
    period: float
    burst: int
    interval_us: int  # T
    tolerance_us: int  # tau = burst * T
    resp_args: bytes  # ARGV of the script (T, tau, "") in RESP, packed once for the Redis hot path

    @classmethod
    def of(cls, limit: int, period: float, burst: int | None = None) -> Policy:
        if limit <= 0 or period <= 0:
            raise ValueError("limit and period must be positive")
        b = limit if burst is None else burst
        if b < 1:
            raise ValueError("burst must be at least 1")
        t = max(1, round(period * US / limit))
        argv = b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in (b"%d" % t, b"%d" % (b * t), b""))
        return cls(limit, period, b, t, b * t, argv)


class Verdict(NamedTuple):
    """The outcome of one check. ``remaining``: requests admissible right now after this one.
    ``retry_after``: seconds until this request would have been admitted (0 when allowed).
    ``reset``: seconds until the subject's full burst is available again. (A NamedTuple: made
    once per check on the request path, it is several times cheaper than a frozen dataclass.)"""

    allowed: bool
    remaining: int
    retry_after: float
    reset: float

    @classmethod
    def from_us(cls, allowed: int, remaining: int, retry_us: float, reset_us: float) -> Verdict:
        return cls(allowed == 1, int(remaining), retry_us / US, max(0.0, reset_us / US))


def gcra_step(
    tat: int | None, now: int, interval: int, tolerance: int
) -> tuple[tuple[int, int, int, int], int | None]:
    """One GCRA decision. Returns ``((allowed, remaining, retry_us, reset_us), new_tat)``; ``new_tat``
    is None when the request is refused (state unchanged). Mirrors ``GCRA_LUA`` line by line."""
    if tat is None or tat < now:
        tat = now
    new_tat = tat + interval
    allow_at = new_tat - tolerance
    diff = now - allow_at
    if diff < 0:
        return (0, 0, -diff, tat - now), None
    return (1, diff // interval, 0, new_tat - now), new_tat


# KEYS[1]: the subject's TAT key. ARGV[1]: T (µs). ARGV[2]: tau (µs). ARGV[3]: optional "now" in µs
# (tests only; empty: the Redis server clock). Returns {allowed, remaining, retry_us, reset_us}.
# TIME before a write is fine: Redis >= 5 replicates the script's effects, not the script.
# The decision both scripts share: the subject's TAT, the next one, and how far ``now`` is past the
# earliest moment this request may pass (``diff`` < 0: refused).
_GCRA_DECIDE = """
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local now
if ARGV[3] ~= nil and ARGV[3] ~= '' then
  now = tonumber(ARGV[3])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then
  tat = now
end
local new_tat = tat + interval
local allow_at = new_tat - tolerance
local diff = now - allow_at
"""

GCRA_LUA = (
    _GCRA_DECIDE
    + """if diff < 0 then
  return {0, 0, -diff, tat - now}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
return {1, math.floor(diff / interval), 0, new_tat - now}
"""
)


# The same GCRA taking a lease (``rate_limit.lease_checks``): ARGV[4] = n, ARGV[5] = floor. The
# request is decided exactly as by GCRA_LUA; when it is admitted and n units (this request and n - 1
# more) fit with at least ``floor`` requests still admissible after them, all n are taken at once
# (the TAT moves n intervals) and the reply's 5th element says n; otherwise one unit is taken and it
# says 1 (0 when refused). The caller admits the n - 1 leased requests without asking Redis again:
# they are already on the subject's schedule, so no process can admit more than the policy allows.
GCRA_LEASE_LUA = (
    _GCRA_DECIDE
    + """local n = tonumber(ARGV[4])
local floor_units = tonumber(ARGV[5])
if diff < 0 then
  return {0, 0, -diff, tat - now, 0}
end
local taken = 1
if n > 1 then
  local lease_tat = tat + n * interval
  local lease_diff = now - (lease_tat - tolerance)
  if lease_diff >= 0 and math.floor(lease_diff / interval) >= floor_units then
    new_tat = lease_tat
    diff = lease_diff
    taken = n
  end
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
return {1, math.floor(diff / interval), 0, new_tat - now, taken}
"""
)


def gcra_lease_step(
    tat: int | None, now: int, interval: int, tolerance: int, n: int, floor_units: int
) -> tuple[tuple[int, int, int, int, int], int | None]:
    """``GCRA_LEASE_LUA`` in Python, line by line: ``((allowed, remaining, retry_us, reset_us,
    taken), new_tat)``; ``new_tat`` None when refused."""
    if tat is None or tat < now:
        tat = now
    new_tat = tat + interval
    diff = now - (new_tat - tolerance)
    if diff < 0:
        return (0, 0, -diff, tat - now, 0), None
    taken = 1
    if n > 1:
        lease_tat = tat + n * interval
        lease_diff = now - (lease_tat - tolerance)
        if lease_diff >= 0 and lease_diff // interval >= floor_units:
            new_tat, diff, taken = lease_tat, lease_diff, n
    return (1, diff // interval, 0, new_tat - now, taken), new_tat


def monotonic_us() -> int:
    return time.monotonic_ns() // 1000


class MemoryGcra:
    """The same GCRA in-process: ``backend: memory`` and the per-process ``local`` fallback.

    A dict key -> TAT. Idle keys (TAT in the past) are swept every ``sweep_every`` checks and
    whenever the dict reaches ``max_keys``; if it is still full after a sweep, the oldest-inserted
    entries are dropped (a flood of distinct subjects cannot exhaust memory; the price is that a
    dropped subject starts afresh). Not thread-safe; one event loop owns it.
    """

    def __init__(self, max_keys: int = 100_000, clock=monotonic_us, sweep_every: int = 4096) -> None:
        self.max_keys = max_keys
        self.clock = clock
        self.sweep_every = sweep_every
        self._tat: dict[str, int] = {}
        self._since_sweep = 0

    def __len__(self) -> int:
        return len(self._tat)

    def check(self, key: str, policy: Policy, now: int | None = None) -> Verdict:
        if now is None:
            now = self.clock()
        self._since_sweep += 1
        if self._since_sweep >= self.sweep_every or len(self._tat) >= self.max_keys:
            self.sweep(now)
        out, new_tat = gcra_step(self._tat.get(key), now, policy.interval_us, policy.tolerance_us)
        if new_tat is not None:
            self._tat[key] = new_tat
        return Verdict.from_us(*out)

    def ttl_us(self, key: str, now: int | None = None) -> int | None:
        """Microseconds until the key would expire (what Redis' PX holds); None when absent/idle."""
        now = self.clock() if now is None else now
        tat = self._tat.get(key)
        if tat is None or tat <= now:
            return None
        return tat - now

    def sweep(self, now: int) -> None:
        self._since_sweep = 0
        tat = self._tat
        for k in [k for k, v in tat.items() if v <= now]:
            del tat[k]
        excess = len(tat) - int(self.max_keys * 0.9)
        if excess > 0 and len(tat) >= self.max_keys:
            for k in list(tat)[:excess]:
                del tat[k]
