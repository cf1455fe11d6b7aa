"""Brute-force counts and lockouts of the integrations filter in Redis
(``integrations_policy.brute_force.redis_url``), shared by every worker and host.

The same leaky-bucket accounting as ``filters.integrations.FailureTracker`` (per (id, IP), per IP,
per id; delays after ``free_failures`` per pair and ``ip_free_failures`` per IP; lockouts), run atomically by one Lua script per call on the
Redis server's clock, so processes on hosts with skewed clocks agree. An attempt is *admitted and
counted in the same script call* (``admit``); a success takes the count back (``refund``). Two
processes, or two workers, can therefore never both admit the guess that crosses a threshold:
exactly ``max_failures`` guesses per (id, IP) reach the password check, however they are spread.

Keys (one hash each, fields s = score, u = last drain time, b = blocked until; ms):
``{<prefix>:bf}:pair:<id>:<ip>``, ``{<prefix>:bf}:ip:<ip>``, ``{<prefix>:bf}:id:<id>``, and
``{<prefix>:bf}:good:<id>:<ip>`` (an (id, IP) pair that authenticated, with its TTL). ``<ip>`` is a
SHA-256 digest of the client address, not the address. The braces are the Redis Cluster hash tag:
all four keys of an attempt (one script call) are on one slot, so the lockout runs on a single
Redis, a Sentinel-managed master or a Redis Cluster alike (every URL form of
``filters.redis_client``).

Every count admitted through Redis is mirrored in the in-process tracker. When Redis fails (error
or ``redis_timeout_ms``), that tracker answers, going on from what this process counted (per
process then: N processes may admit up to N times the limit while Redis is away), and Redis is not
tried again for a second; ``/readyz`` says ``fallback``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any

from filters import integrations
from filters.integrations import Admission, BruteForceConfig, LocalFailureStore, record_lockouts
from filters.redis_client import ClientOptions, close_async_client, make_async_client, parse_redis_url

log = logging.getLogger("portvakt.integrations")

BRUTE_FORCE_LUA = """
local mode = ARGV[1]
local free = tonumber(ARGV[2])
local maxf = tonumber(ARGV[3])
local ipmax = tonumber(ARGV[4])
local idmax = tonumber(ARGV[5])
local lockout = tonumber(ARGV[6])
local decay = tonumber(ARGV[7])
local goodms = tonumber(ARGV[8])
local admitted = tonumber(ARGV[9])
local ttl = tonumber(ARGV[10])
local ipfree = tonumber(ARGV[11])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function load(k)
  local v = redis.call('HMGET', k, 's', 'u', 'b')
  local s = tonumber(v[1])
  local b = tonumber(v[3]) or 0
  if s == nil then return 0, now, b end
  local u = tonumber(v[2])
  local drained = math.floor((now - u) / decay)
  if drained > 0 then
    s = math.max(0, s - drained)
    if s == 0 then u = now else u = u + drained * decay end
  end
  return s, u, b
end

local function save(k, s, u, b)
  redis.call('HSET', k, 's', string.format('%d', s), 'u', string.format('%.0f', u), 'b', string.format('%.0f', b))
  redis.call('PEXPIRE', k, ttl)
end

local function count()
  local locks = 0
  local ps, pu, pb = load(KEYS[1])
  ps = ps + 1
  if ps >= maxf then
    pb = now + lockout
    locks = locks + 1
  elseif ps > free then
    pb = now + math.min(lockout, (2 ^ (ps - free - 1)) * 1000)
  end
  save(KEYS[1], ps, pu, pb)
  local is, iu, ib = load(KEYS[2])
  is = is + 1
  if is >= ipmax then
    ib = now + lockout
    locks = locks + 2
  elseif is > ipfree then
    ib = math.max(ib, now + math.min(lockout, (2 ^ (is - ipfree - 1)) * 1000))
  end
  save(KEYS[2], is, iu, ib)
  local ds, du, db = load(KEYS[3])
  ds = ds + 1
  if ds >= idmax then
    db = now + lockout
    locks = locks + 4
  end
  save(KEYS[3], ds, du, db)
  return locks
end

if mode == 'admit' or mode == 'check' then
  local _, _, pb = load(KEYS[1])
  local _, _, ib = load(KEYS[2])
  local _, _, db = load(KEYS[3])
  local until_ = math.max(pb, ib)
  if db > now and redis.call('EXISTS', KEYS[4]) == 0 then until_ = math.max(until_, db) end
  if until_ > now then return {0, string.format('%.0f', until_ - now), string.format('%.0f', now), 0} end
  if mode == 'check' then return {1, '0', string.format('%.0f', now), 0} end
  return {1, '0', string.format('%.0f', now), count()}
end
if mode == 'fail' then
  return {1, '0', string.format('%.0f', now), count()}
end
if mode == 'refund' then
  local limits = {ipmax, idmax}
  for i = 2, 3 do
    local s, u, b = load(KEYS[i])
    if s > 0 then
      s = s - 1
      if s < limits[i - 1] and b >= admitted + lockout then b = 0
      elseif i == 2 and s <= ipfree and b < admitted + lockout then b = 0 end
      save(KEYS[i], s, u, b)
    end
  end
end
-- refund and good: the pair's count is cleared and the pair is known good
redis.call('DEL', KEYS[1])
if goodms > 0 then redis.call('SET', KEYS[4], '1', 'PX', goodms) end
return {1, '0', string.format('%.0f', now), 0}
"""

RETRY_AFTER_FAILURE = 1.0  # seconds the in-process fallback answers alone after a Redis failure


def address_digest(ip: Any) -> str:
    """The key part for a client address: a digest, so no address is stored in Redis."""
    return hashlib.sha256(b"portvakt-brute-force\0" + str(ip).encode()).hexdigest()[:32]


class RedisFailureStore:
    """``admit`` / ``refund`` / ``failure`` / ``success`` against Redis, with the in-process
    store as fallback. Same interface as ``LocalFailureStore``; times are Redis server ms."""

    def __init__(self, cfg: BruteForceConfig, fallback: LocalFailureStore) -> None:
        assert cfg.redis_url is not None
        self.cfg = cfg
        self.fallback = fallback
        self.timeout = cfg.redis_timeout_ms / 1000
        # One hash tag for every brute-force key: the script reads and writes the pair, address,
        # id and known-good keys of an attempt atomically, so on a Redis Cluster they must share
        # a slot (one master holds all of them; the traffic is one script call per attempt).
        self.prefix = f"{{{cfg.redis_key_prefix}:bf}}"
        self._url = cfg.redis_url
        self.client: Any = None
        self._script: Any = None
        self._down_until = 0.0
        self.last_error = ""
        # The last exchange's outcome: /readyz says fallback until Redis has answered again, not
        # only for the retry second after a failure (red team 2, F14).
        self._reachable = True
        longest = max(cfg.max_failures, cfg.ip_max_failures, cfg.id_max_failures)
        self._static = [
            str(cfg.free_failures),
            str(cfg.max_failures),
            str(cfg.ip_max_failures),
            str(cfg.id_max_failures),
            str(int(cfg.lockout_seconds * 1000)),
            str(max(1, int(cfg.decay_seconds * 1000))),
            str(int(cfg.known_good_seconds * 1000)),
        ]
        self._ttl = str(int((cfg.lockout_seconds + cfg.decay_seconds * longest) * 1000) + 60_000)
        self._make_client()  # a bad URL fails the config load, not the first request

    def _make_client(self) -> None:
        self.client = make_async_client(
            parse_redis_url(self._url),
            ClientOptions(
                timeout=self.timeout,
                connect_timeout=max(self.timeout, 1.0),
                client_name="portvakt-brute-force",
            ),
        )
        self._script = self.client.register_script(BRUTE_FORCE_LUA)

    async def start(self) -> None:
        try:
            async with asyncio.timeout(max(self.timeout, 1.0)):
                await self.client.ping()
        except Exception as e:  # noqa: BLE001 - unreachable now: the fallback answers until it is back
            self._down(e)

    async def close(self) -> None:
        await close_async_client(self.client)

    def readiness(self) -> dict[str, str]:
        if not self._reachable or time.monotonic() < self._down_until:
            return {
                "brute_force_redis": f"fallback: redis unreachable ({self.last_error}), counting per process"
            }
        return {"brute_force_redis": "ok"}

    def _down(self, e: BaseException) -> None:
        self.last_error = type(e).__name__
        self._reachable = False
        if time.monotonic() >= self._down_until:
            log.warning("brute force: redis unreachable (%s): counting in-process", self.last_error)
        self._down_until = time.monotonic() + RETRY_AFTER_FAILURE

    def _keys(self, iid: str, ip: Any) -> list[str]:
        a = address_digest(ip)
        p = self.prefix
        return [f"{p}:pair:{iid}:{a}", f"{p}:ip:{a}", f"{p}:id:{iid}", f"{p}:good:{iid}:{a}"]

    async def _run(self, mode: str, iid: str, ip: Any, admitted_at: float = 0.0) -> list[Any] | None:
        if time.monotonic() < self._down_until:
            return None
        try:
            async with asyncio.timeout(self.timeout):
                out = await self._script(
                    keys=self._keys(iid, ip),
                    args=[
                        mode,
                        *self._static,
                        f"{admitted_at:.0f}",
                        self._ttl,
                        str(self.cfg.ip_free_failures),
                    ],
                )
        except Exception as e:  # noqa: BLE001 - any failure: the in-process fallback decides
            self._down(e)
            return None
        self._reachable = True
        if mode == "fail":
            record_lockouts(int(out[3]))
        return out

    async def admit(self, iid: str, ip: Any, count: bool = True) -> Admission:
        if not self.cfg.enabled:
            return Admission(0.0, 0.0, False)
        out = await self._run("admit" if count else "check", iid, ip)
        if out is None:
            return await self.fallback.admit(iid, ip, count)
        wait_ms, now_ms = float(out[1]), float(out[2])
        admitted = int(out[0]) == 1
        mirrored_at = None
        if admitted and count:
            # Mirror the count in-process: should Redis fail (or time out) later, the fallback
            # goes on from what this process counted instead of from zero.
            mirrored_at = integrations._now()
            self.fallback.tracker.failure(iid, ip, mirrored_at, count_lockouts=False)
        return Admission(0.0 if admitted else wait_ms / 1000, now_ms, False, int(out[3]), mirrored_at)

    async def refund(self, iid: str, ip: Any, admission: Admission) -> None:
        if not self.cfg.enabled:
            return
        if admission.local:  # counted by the fallback: taken back there
            await self.fallback.refund(iid, ip, admission)
            return
        if admission.mirrored_at is not None:
            self.fallback.tracker.refund(iid, ip, admission.mirrored_at, integrations._now())
        if await self._run("refund", iid, ip, admission.at) is None:
            await self.fallback.success(iid, ip)

    async def failure(self, iid: str, ip: Any) -> None:
        if self.cfg.enabled and await self._run("fail", iid, ip) is None:
            await self.fallback.failure(iid, ip)

    async def success(self, iid: str, ip: Any) -> None:
        if self.cfg.enabled and await self._run("good", iid, ip) is None:
            await self.fallback.success(iid, ip)
