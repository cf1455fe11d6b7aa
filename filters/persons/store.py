"""Session store: in-process (one process: ``make run``) or Redis (fleets: every worker and node
sees the same sessions, refresh locks and login attempts).

Keys (under ``store.key_prefix``, default ``portvakt:sess:``):

- ``s:<session id>``: the session, AES-GCM sealed with the session's own data key (which only the
  browser's cookie holds): a dump of Redis reveals no token. TTL: until the idle or absolute limit.
- ``i:<sha256(iss|sid)>``: session ids of one OP session, for front-channel logout (no cookie).
- ``a:<state hash>``: one login attempt (PKCE verifier, nonce, target); taken once (GETDEL).
- ``l:<session id>``: the single-flight refresh lock.
- ``c:<name>``: counters (login-loop guard, open attempts per browser).

The Redis URL takes every form of ``filters.redis_client`` (TLS, Sentinel, Cluster). Every
operation touches one key, so a Redis Cluster needs no hash tag here.

Any backend failure raises ``StoreUnavailable``: the caller answers 503, never anonymous access.
"""

from __future__ import annotations

import builtins
import secrets
import time
from typing import Any

from filters.persons.config import SessionStoreConfig
from filters.redis_bounded import BoundedRedisCalls
from filters.redis_client import ClientOptions, close_async_client, make_async_client, parse_redis_url


class StoreUnavailable(Exception):
    """The session store did not answer (Redis down, timeout)."""


class MemoryStore:
    """Process-local store with the same semantics as the Redis one (TTLs, GETDEL, NX locks)."""

    kind = "memory"

    def __init__(self, cfg: SessionStoreConfig):
        self._data: dict[str, tuple[Any, float]] = {}
        self._last_sweep = 0.0

    def _get(self, key: str) -> Any:
        hit = self._data.get(key)
        if hit is None:
            return None
        if hit[1] <= time.monotonic():
            self._data.pop(key, None)
            return None
        return hit[0]

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep < 30:
            return
        self._last_sweep = now
        for k in [k for k, (_, exp) in self._data.items() if exp <= now]:
            self._data.pop(k, None)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def readiness(self) -> str:
        return "ok"

    async def get(self, key: str) -> bytes | None:
        return self._get(key)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self._sweep()
        self._data[key] = (value, time.monotonic() + max(ttl, 0.001))

    async def delete(self, *keys: str) -> None:
        for k in keys:
            self._data.pop(k, None)

    async def take(self, key: str) -> bytes | None:
        v = self._get(key)
        self._data.pop(key, None)
        return v

    async def add_member(self, key: str, member: str, ttl: float) -> None:
        cur = self._get(key) or frozenset()
        self._data[key] = (frozenset(cur | {member}), time.monotonic() + ttl)

    async def members(self, key: str) -> builtins.set[str]:  # the class has a set() method
        return set(self._get(key) or ())

    async def incr(self, key: str, ttl: float) -> int:
        hit = self._data.get(key)
        now = time.monotonic()
        if hit is None or hit[1] <= now:
            self._data[key] = (1, now + ttl)
            return 1
        self._data[key] = (hit[0] + 1, hit[1])
        return hit[0] + 1

    async def decr(self, key: str) -> None:
        hit = self._data.get(key)
        if hit is not None and hit[0] > 0:
            self._data[key] = (hit[0] - 1, hit[1])

    async def lock(self, key: str, ttl: float) -> str | None:
        if self._get(key) is not None:
            return None
        token = secrets.token_hex(8)
        self._data[key] = (token, time.monotonic() + ttl)
        return token

    async def unlock(self, key: str, token: str) -> None:
        if self._get(key) == token:
            self._data.pop(key, None)


# Every operation touches one key (a script too), so the store runs unchanged on a Redis Cluster:
# no hash tag is needed, and a multi-key DEL is split by slot by the cluster client.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_ADD_MEMBER = """
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
_INCR = """
local n = redis.call('INCR', KEYS[1])
if n == 1 or redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""


class RedisStore(BoundedRedisCalls):
    kind = "redis"
    unavailable = StoreUnavailable

    def __init__(self, cfg: SessionStoreConfig):
        self.timeout = cfg.timeout_seconds
        self.client = make_async_client(
            parse_redis_url(cfg.url or ""),
            ClientOptions(timeout=cfg.timeout_seconds, client_name="portvakt-sessions"),
        )

    async def start(self) -> None:
        try:
            await self._run(self.client.ping())
        except StoreUnavailable:
            pass  # readiness says so; requests answer 503 until it is back

    async def close(self) -> None:
        await close_async_client(self.client)

    def readiness(self) -> str:
        # Not "down": every instance shares the store, and public routes must stay served while
        # session routes answer 503. Readiness says what is degraded.
        return (
            "ok"
            if self._error is None
            else f"fallback: unreachable ({self._error}); session routes answer 503"
        )

    async def get(self, key: str) -> bytes | None:
        return await self._run(self.client.get(key))

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self._run(self.client.set(key, value, px=max(1, int(ttl * 1000))))

    async def delete(self, *keys: str) -> None:
        if keys:
            await self._run(self.client.delete(*keys))

    async def take(self, key: str) -> bytes | None:
        return await self._run(self.client.getdel(key))

    async def add_member(self, key: str, member: str, ttl: float) -> None:
        await self._run(self.client.eval(_ADD_MEMBER, 1, key, member, max(1, int(ttl * 1000))))

    async def members(self, key: str) -> builtins.set[str]:  # the class has a set() method
        return {m.decode() for m in await self._run(self.client.smembers(key))}

    async def incr(self, key: str, ttl: float) -> int:
        return int(await self._run(self.client.eval(_INCR, 1, key, max(1, int(ttl * 1000)))))

    async def decr(self, key: str) -> None:
        await self._run(self.client.decr(key))

    async def lock(self, key: str, ttl: float) -> str | None:
        token = secrets.token_hex(8)
        ok = await self._run(self.client.set(key, token, nx=True, px=max(1, int(ttl * 1000))))
        return token if ok else None

    async def unlock(self, key: str, token: str) -> None:
        await self._run(self.client.eval(_UNLOCK, 1, key, token))


def build_store(cfg: SessionStoreConfig) -> MemoryStore | RedisStore:
    return RedisStore(cfg) if cfg.backend == "redis" else MemoryStore(cfg)
